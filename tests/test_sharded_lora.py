"""The differentiable entry point: mos_ext.ops.sharded_lora (forward, fused backward, gradcheck)."""
import pytest
import torch

from mos_ext import ops
from mos_ext import reference as R
from problems import TOL, make_problem


def _grads(fn, p, dy, pa_dtype=None):
    x = p.x.clone().requires_grad_()
    pa = p.pool_a.clone().requires_grad_()
    pb = p.pool_b.clone().requires_grad_()
    out = fn(x, pa, pb, p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
    out.backward(dy)
    return out.detach(), x.grad, pa.grad, pb.grad


@pytest.mark.parametrize("kw", [
    # -1 tenants, mixed ranks
    dict(T=3, N=11, h=12, o=10, r=3, l_a=3, l_b=2, S=4, popularity="none", mixed_ranks=True, seed=1),
    # shards shared across tenants and repeated inside a table accumulate their gradients
    dict(T=4, N=14, h=8, o=6, r=4, l_a=2, l_b=3, S=6, pool_rows=5, seed=2),
], ids=["mixed_ranks", "shared_rows"])
def test_gradcheck_fp64(kw, cpu_path):
    p = make_problem(dtype=torch.float64, **kw)
    leaves = tuple(t.clone().requires_grad_() for t in (p.x, p.pool_a, p.pool_b))
    rest = (p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
    assert torch.autograd.gradcheck(lambda a, b, c: ops.sharded_lora(a, b, c, *rest), leaves)


def test_gradcheck_both_outputs():
    """Gradients through the rank-space output v as well as delta."""
    p = make_problem(T=2, N=9, h=8, o=6, r=2, l_a=2, l_b=1, S=3, dtype=torch.float64, seed=3)
    rest = (p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)

    def f(a, b, c):
        d, v = torch.ops.mos.sharded_lora(a, b, c, *rest)
        return d.sum(1, keepdim=True) * 0.3 + v

    args = tuple(t.clone().requires_grad_() for t in (p.x, p.pool_a, p.pool_b))
    assert torch.autograd.gradcheck(f, args)


def test_gradcheck_shrink_and_gather():
    p = make_problem(T=3, N=10, h=12, o=6, r=3, l_a=3, l_b=1, S=4, dtype=torch.float64, pool_rows=8, seed=4)
    x = p.x.clone().requires_grad_()
    pa = p.pool_a.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: ops.sgmv_shrink(a, b, p.idx_a, p.seg_indptr, p.seg_tenant), (x, pa))
    idx = p.idx_a.clone()
    idx[0, 1] = -1
    assert torch.autograd.gradcheck(lambda b: ops.gather_shards(b, idx), (pa,))


@pytest.mark.parametrize(
    "dtype,pool_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
     (torch.bfloat16, torch.bfloat16)],
    ids=str,
)
@pytest.mark.parametrize("popularity", ["identical", "zipf", "none"])
def test_grads_match_naive_autograd(dtype, pool_dtype, popularity, cpu_path):
    """Gradients of the fused backward against autograd through gather + matmul (float64)."""
    p = make_problem(T=5, N=70, h=96, o=80, r=8, l_a=4, l_b=2, S=8, popularity=popularity, dtype=dtype,
                     pool_dtype=pool_dtype, mixed_ranks=True, seed=5)
    dy = torch.randn(p.y.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64).to(dtype)
    out, gx, gpa, gpb = _grads(ops.sharded_lora, p, dy)
    q = make_problem(T=5, N=70, h=96, o=80, r=8, l_a=4, l_b=2, S=8, popularity=popularity, dtype=torch.float64,
                     mixed_ranks=True, seed=5)
    q.x, q.pool_a, q.pool_b = p.x.double(), p.pool_a.double(), p.pool_b.double()
    ref, rx, rpa, rpb = _grads(R.sharded_lora, q, dy.double())
    assert out.dtype == dtype and gx.dtype == dtype and gpa.dtype == pool_dtype and gpb.dtype == pool_dtype
    tol = TOL[dtype] if pool_dtype == torch.float32 or dtype == torch.float32 else TOL[torch.bfloat16]
    for name, a, b in (("delta", out, ref), ("dx", gx, rx), ("dpool_a", gpa, rpa), ("dpool_b", gpb, rpb)):
        # Pool gradients sum over many tokens: compare relative to their scale.
        mag = b.abs().max().item() or 1.0
        torch.testing.assert_close(a.double() / mag, b / mag, rtol=tol["rtol"], atol=tol["atol"], msg=name)


def test_no_grad_needed_inputs():
    """Only the inputs that require grad get one; frozen pools (MiSS's identity) cost nothing."""
    p = make_problem(T=2, N=12, h=16, o=8, r=4, l_a=4, l_b=1, S=2, seed=7)
    pb = p.pool_b.clone().requires_grad_()
    out = ops.sharded_lora(p.x, p.pool_a, pb, p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
    out.sum().backward()
    assert pb.grad is not None and pb.grad.abs().sum() > 0
