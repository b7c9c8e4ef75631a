"""gather_shards on the CPU against mos_ext.reference."""
import pytest
import torch

from mos_ext import ops
from mos_ext import reference as R
from problems import make_table


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("lead,r,l,s,P", [((), 1, 1, 1, 1), ((3,), 4, 4, 37, 50), ((2, 5), 16, 1, 2049, 40),
                                          ((128,), 64, 4, 111, 9000), ((7,), 8, 8, 2, 3)])
def test_gather(dtype, lead, r, l, s, P):
    gen = torch.Generator().manual_seed(r * 100 + l)
    pool = torch.randn(P, s, generator=gen, dtype=torch.float64).to(dtype)
    T = 1
    for d in lead:
        T *= d
    idx = make_table(T, r, l, P, gen, ranks=torch.randint(0, r + 1, (T,), generator=gen).tolist())
    idx = idx.reshape(*lead, r, l)
    torch.full((T * r * l * s + 64,), float("nan"))  # leave garbage behind for a careless allocation
    out = ops.gather_shards(pool, idx)
    assert out.shape == (*lead, r, l * s) and out.dtype == dtype
    assert torch.equal(out, R.gather_shards(pool, idx))
    # -1 entries give exact zeros
    pad = (idx == -1).unsqueeze(-1).expand(*idx.shape, s).reshape(out.shape)
    assert torch.all(out[pad] == 0)


def test_gather_is_the_adapter_matrix():
    """A = gather(pool_a, idx_a[t]) and B^T = gather(pool_b, idx_b[t]) give sgmv's y += scale * B A x."""
    from problems import make_problem

    p = make_problem(T=3, N=10, h=32, o=24, r=4, l_a=4, l_b=3, S=3, popularity="identical", dtype=torch.float64, seed=9)
    t = int(p.seg_tenant[0])
    A = ops.gather_shards(p.pool_a, p.idx_a[t])
    Bt = ops.gather_shards(p.pool_b, p.idx_b[t])
    y = p.y.clone()
    ops.sgmv(y, *p.sgmv_args())
    ip = p.seg_indptr.tolist()
    s, e = ip[0], ip[-1]
    torch.testing.assert_close(y[s:e], p.y[s:e] + p.scale[t].double() * (p.x[s:e] @ A.T) @ Bt)
