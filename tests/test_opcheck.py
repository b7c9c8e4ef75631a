"""torch.library.opcheck (schema, fake impl, autograd registration, aot dispatch) on every op,
and torch.compile(fullgraph=True) through them."""
import pytest
import torch

from mos_ext import ops
from mos_ext import reference as R
from problems import make_problem

DTYPES = [torch.float32, torch.bfloat16, torch.float64]
BACKEND = "inductor"


def problem(dtype, **kw):
    return make_problem(T=3, N=17, h=24, o=20, r=4, l_a=3, l_b=2, S=4, popularity="none", dtype=dtype,
                        mixed_ranks=True, seed=3, **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_opcheck_all(dtype):
    p = problem(dtype)
    seg = (p.seg_indptr, p.seg_tenant)
    v = ops.sgmv_shrink(p.x, p.pool_a, p.idx_a, *seg)
    grad = torch.zeros(p.pool_a.shape, dtype=v.dtype)
    samples = [
        (torch.ops.mos.gather_shards.default, (p.pool_a, p.idx_a)),
        (torch.ops.mos.sgmv_shrink.default, (p.x, p.pool_a, p.idx_a, *seg)),
        (torch.ops.mos.sgmv_expand.default, (p.y.clone(), v, p.pool_b, p.idx_b, p.scale, *seg)),
        (torch.ops.mos.sgmv.default, (p.y.clone(), *p.sgmv_args())),
        (torch.ops.mos.shard_grad.default, (grad, v, p.x, p.idx_a, p.scale, *seg, False)),
        (torch.ops.mos.sharded_lora.default, p.sgmv_args()),
    ]
    for op, args in samples:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_opcheck_with_grad(dtype):
    p = problem(dtype)
    seg = (p.seg_indptr, p.seg_tenant)
    x = p.x.clone().requires_grad_()
    pa = p.pool_a.clone().requires_grad_()
    pb = p.pool_b.clone().requires_grad_()
    torch.library.opcheck(torch.ops.mos.sharded_lora.default, (x, pa, pb, p.idx_a, p.idx_b, p.scale, *seg))
    torch.library.opcheck(torch.ops.mos.sgmv_shrink.default, (x, pa, p.idx_a, *seg))
    torch.library.opcheck(torch.ops.mos.gather_shards.default, (pa, p.idx_a))


def test_compile_fullgraph_sgmv():
    p = problem(torch.float32)

    def step(y, x):
        y = y.clone()
        ops.sgmv(y, x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
        return y * 2

    compiled = torch.compile(step, fullgraph=True, backend=BACKEND)
    out = compiled(p.y, p.x)
    torch.testing.assert_close(out, 2 * R.sgmv(p.y, *p.sgmv_args()))


def test_compile_fullgraph_training_step():
    """Forward + fused backward of sharded_lora inside torch.compile(fullgraph=True)."""
    p = problem(torch.float32)
    rest = (p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)

    def loss_fn(x, pa, pb):
        return (ops.sharded_lora(x, pa, pb, *rest) ** 2).sum()

    compiled = torch.compile(loss_fn, fullgraph=True, backend=BACKEND)
    leaves = [t.clone().requires_grad_() for t in (p.x, p.pool_a, p.pool_b)]
    compiled(*leaves).backward()
    ref = [t.clone().double().requires_grad_() for t in (p.x, p.pool_a, p.pool_b)]
    (R.sharded_lora(ref[0], ref[1], ref[2], *rest) ** 2).sum().backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-4, atol=1e-5)
