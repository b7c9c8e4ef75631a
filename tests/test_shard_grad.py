"""shard_grad (fused pool-gradient accumulation) on the CPU against mos_ext.reference."""
import pytest
import torch

import mos_ext
from mos_ext import ops
from mos_ext import reference as R
from problems import POPULARITY, acc_dtype, assert_close, make_problem, shard_grad_magnitude, stable_seed

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (T, N, h, r, l, S, mixed_ranks, pool_rows): x is [N, h], pool [P, h/l]
SHAPES = {
    "minimal": (1, 1, 8, 1, 1, 1, False, None),
    "mos": (4, 61, 128, 8, 4, 6, False, None),
    "lora_h2049": (8, 90, 2049, 16, 1, 9, True, None),
    "h444_l4_T128": (128, 260, 444, 64, 4, 128, True, None),
    "repeats_in_table": (6, 70, 96, 16, 4, 5, False, 7),  # MiSS-like: rows repeat within a tenant
    "odd": (5, 29, 105, 3, 5, 7, True, None),
}


def run_case(T, N, h, r, l, S, mixed, rows, popularity, dtype, seed):
    p = make_problem(T=T, N=N, h=h, o=8, r=r, l_a=l, l_b=1, S=S, popularity=popularity, dtype=dtype,
                     mixed_ranks=mixed, pool_rows=rows, seed=seed)
    acc = acc_dtype(dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(N, r, generator=gen, dtype=torch.float64).to(acc)
    grad0 = torch.randn(p.pool_a.shape, generator=gen, dtype=torch.float64).to(acc)  # poisoned: must be added to
    grad = grad0.clone()
    out = ops.shard_grad(grad, u, p.x, p.idx_a, p.scale, p.seg_indptr, p.seg_tenant)
    assert out is grad
    ref = R.shard_grad(grad0, u, p.x, p.idx_a, p.scale, p.seg_indptr, p.seg_tenant)
    # each element is a sum over up to N tokens (more where a table repeats a row): the bound
    # grows with the sum of the terms' magnitudes
    mag = shard_grad_magnitude(grad0, u, p.x, p.idx_a, p.scale, p.seg_indptr, p.seg_tenant)
    assert_close(grad, ref, acc, f"shard_grad {popularity}", mag=mag)
    touched = torch.zeros(grad.shape[0], dtype=torch.bool)
    for s, e, t in R.segments(p.seg_indptr, p.seg_tenant):
        if e > s:
            rows_t = p.idx_a[t].reshape(-1)
            touched[rows_t[rows_t >= 0].long()] = True
    assert torch.equal(grad[~touched], grad0[~touched]), "rows no segment references changed"
    return p, u, grad0


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid(shape, popularity, dtype):
    seed = stable_seed(shape, popularity, str(dtype))
    run_case(*SHAPES[shape], popularity, dtype, seed)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_paths(shape, popularity, dtype, cpu_path):
    """The grid again, all fused and all BLAS (per-shape dispatch of fp32/fp64 segments)."""
    seed = stable_seed(shape, popularity, str(dtype), "paths")
    run_case(*SHAPES[shape], popularity, dtype, seed)


def _run(grad0, u, p, deterministic=False):
    g = grad0.clone()
    ops.shard_grad(g, u, p.x, p.idx_a, p.scale, p.seg_indptr, p.seg_tenant, deterministic)
    return g


def test_deterministic_across_runs_and_threads():
    """deterministic=True (the fused kernel) is bitwise the same for any thread count; so is
    deterministic=False with the BLAS path off. With it on (long segments), a run repeats
    bitwise at one thread count and agrees to rounding across thread counts."""
    p, u, grad0 = run_case(16, 700, 1024, 16, 4, 20, True, 90, "zipf", torch.float32, 9)
    prev = torch.get_num_threads()
    try:
        outs, blas = [], {}
        for n in (2, 1, 2):
            torch.set_num_threads(n)
            mos_ext.set_cpu_dense_min_tokens(1)
            outs.append(_run(grad0, u, p, deterministic=True))
            blas.setdefault(n, []).append(_run(grad0, u, p, deterministic=False))
            mos_ext.set_cpu_dense_min_tokens(0)
            outs.append(_run(grad0, u, p, deterministic=False))
    finally:
        torch.set_num_threads(prev)
    for o in outs[1:]:
        assert torch.equal(o, outs[0])
    assert torch.equal(blas[2][0], blas[2][1])
    for runs in blas.values():
        torch.testing.assert_close(runs[0], outs[0], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_isa(isa, dtype, isa_restore):
    if isa not in mos_ext.available_cpu_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    mos_ext.set_cpu_isa(isa)
    for shape in ("mos", "odd", "repeats_in_table"):
        run_case(*SHAPES[shape], "uniform", dtype, 17)


def test_pool_gradients_of_a_two_sided_layer(cpu_path):
    """The two calls of a training backward give autograd's pool gradients."""
    p = make_problem(T=3, N=40, h=64, o=48, r=8, l_a=4, l_b=2, S=5, dtype=torch.float64, seed=8)
    pa = p.pool_a.clone().requires_grad_()
    pb = p.pool_b.clone().requires_grad_()
    delta = R.sharded_lora(p.x, pa, pb, p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
    dy = torch.randn_like(delta)
    delta.backward(dy)
    seg = (p.seg_indptr, p.seg_tenant)
    w = ops.sgmv_shrink(dy, p.pool_b, p.idx_b, *seg)  # dy @ B_t
    v = ops.sgmv_shrink(p.x, p.pool_a, p.idx_a, *seg)
    ga = ops.shard_grad(torch.zeros_like(p.pool_a), w, p.x, p.idx_a, p.scale, *seg)
    gb = ops.shard_grad(torch.zeros_like(p.pool_b), v, dy, p.idx_b, p.scale, *seg)
    torch.testing.assert_close(ga, pa.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gb, pb.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 3, 64, 128, 1024])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_many_tenant_grid(T, popularity):
    run_case(T, 500, 256, 32, 4, min(2 * T, 300), True, None, popularity, torch.float32, T)
