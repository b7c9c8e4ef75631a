"""sgmv_shrink, sgmv_expand and sgmv on the CPU against mos_ext.reference."""
import pytest
import torch

import mos_ext
from mos_ext import ops
from mos_ext import reference as R
from problems import POPULARITY, Problem, acc_dtype, assert_close, make_problem, stable_seed

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]

# (T, N, h, o, r, l_a, l_b, S, mixed_ranks, pool_rows)
SHAPES = {
    "minimal": (1, 1, 8, 8, 1, 1, 1, 1, False, None),
    "la_ne_lb": (4, 37, 64, 48, 8, 4, 2, 6, False, None),
    "lora_h2049": (16, 200, 2049, 33, 16, 1, 1, 12, True, None),
    "h444_l4_T128_r64": (128, 300, 444, 444, 64, 4, 4, 128, True, None),
    "miss_like": (8, 50, 64, 40, 16, 4, 1, 5, False, 16),
    "odd_shards": (5, 23, 105, 91, 3, 5, 7, 7, True, None),
}


def check_ops(p: Problem, dtype, what=""):
    acc = acc_dtype(dtype)
    covered = p.covered_rows()

    v = ops.sgmv_shrink(p.x, p.pool_a, p.idx_a, p.seg_indptr, p.seg_tenant)
    v_ref = R.sgmv_shrink(p.x, p.pool_a, p.idx_a, p.seg_indptr, p.seg_tenant)
    assert v.dtype == acc and v.shape == (p.x.shape[0], p.idx_a.shape[1])
    assert_close(v, v_ref, acc, f"shrink {what}")
    assert torch.all(v[~covered] == 0), "shrink wrote rows outside the segments"

    y = p.y.clone()
    ops.sgmv_expand(y, v_ref, p.pool_b, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
    assert_close(y, R.sgmv_expand(p.y, v_ref, p.pool_b, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant), dtype, f"expand {what}")
    assert torch.equal(y[~covered], p.y[~covered]), "expand touched rows outside the segments"

    y = p.y.clone()
    out = ops.sgmv(y, *p.sgmv_args())
    assert out is y
    assert_close(y, R.sgmv(p.y, *p.sgmv_args()), dtype, f"sgmv {what}")
    assert torch.equal(y[~covered], p.y[~covered]), "sgmv touched rows outside the segments"


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_grid(shape, popularity, dtype):
    T, N, h, o, r, l_a, l_b, S, mixed, rows = SHAPES[shape]
    seed = stable_seed(shape, popularity, str(dtype))
    p = make_problem(T=T, N=N, h=h, o=o, r=r, l_a=l_a, l_b=l_b, S=S, popularity=popularity,
                     dtype=dtype, mixed_ranks=mixed, pool_rows=rows, seed=seed)
    check_ops(p, dtype, f"{shape}/{popularity}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", ["la_ne_lb", "lora_h2049", "odd_shards"])
def test_fp32_master_pools(dtype, shape):
    """Pools kept in fp32 while activations are half precision (training) or fp64."""
    T, N, h, o, r, l_a, l_b, S, mixed, rows = SHAPES[shape]
    p = make_problem(T=T, N=N, h=h, o=o, r=r, l_a=l_a, l_b=l_b, S=S, dtype=dtype, pool_dtype=torch.float32,
                     mixed_ranks=mixed, pool_rows=rows, seed=7)
    check_ops(p, dtype, shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mixed_pool_dtypes(dtype, cpu_path):
    """pool_a in fp32 and pool_b in the activation dtype (and the converse)."""
    p = make_problem(T=6, N=50, h=96, o=80, r=8, l_a=4, l_b=2, S=8, dtype=dtype, seed=3)
    for a32 in (True, False):
        q = Problem(**{**p.__dict__, "pool_a": p.pool_a.float() if a32 else p.pool_a,
                       "pool_b": p.pool_b if a32 else p.pool_b.float()})
        check_ops(q, dtype, f"pool_a fp32={a32}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_rows(dtype, cpu_path):
    """x and y may be row-strided views (e.g. column slices of a fused qkv output);
    the columns around the view stay untouched."""
    p = make_problem(T=5, N=40, h=64, o=48, r=8, l_a=4, l_b=2, S=7, dtype=dtype, seed=11)
    xbuf = torch.randn(40, 64 + 3, dtype=torch.float64).to(dtype)
    xbuf[:, 2:66] = p.x
    x = xbuf[:, 2:66]
    ybuf = torch.randn(40, 48 + 5, dtype=torch.float64).to(dtype)
    ybuf[:, 5:] = p.y
    before = ybuf.clone()
    y = ybuf[:, 5:]
    assert not x.is_contiguous() and not y.is_contiguous()
    args = (x,) + p.sgmv_args()[1:]
    ops.sgmv(y, *args)
    assert_close(y, R.sgmv(p.y, *p.sgmv_args()), dtype, "sgmv strided")
    assert torch.equal(ybuf[:, :5], before[:, :5])
    v = ops.sgmv_shrink(x, p.pool_a, p.idx_a, p.seg_indptr, p.seg_tenant)
    assert_close(v, R.sgmv_shrink(p.x, p.pool_a, p.idx_a, p.seg_indptr, p.seg_tenant), acc_dtype(dtype), "shrink strided")
    ybuf.copy_(before)
    ops.sgmv_expand(y, v, p.pool_b, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
    assert_close(y, R.sgmv_expand(p.y, v, p.pool_b, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant), dtype, "expand strided")
    assert torch.equal(ybuf[:, :5], before[:, :5])


def test_segments_edge_cases(cpu_path):
    """No segments, all tenants -1, tokens past the last segment, zero-length segments."""
    p = make_problem(T=3, N=20, S=4, seed=5)
    cases = [
        ([0], []),
        ([0, 20], [-1]),
        ([0, 5, 5, 9], [1, 2, 0]),
        ([3, 3, 3], [0, 1]),
        ([0, 0, 0, 0], [0, 1, 2]),
    ]
    for ip, tn in cases:
        q = Problem(**{**p.__dict__, "seg_indptr": torch.tensor(ip, dtype=torch.int32),
                       "seg_tenant": torch.tensor(tn, dtype=torch.int32)})
        check_ops(q, torch.float32, f"segments {ip} {tn}")


def test_empty_batch_and_zero_rank(cpu_path):
    for N, r in ((0, 4), (5, 0)):
        p = make_problem(T=2, N=max(N, 1), r=max(r, 1), S=1, seed=1)
        x, y = p.x[:N], p.y[:N]
        idx_a, idx_b = p.idx_a[:, :r].contiguous(), p.idx_b[:, :r].contiguous()
        ip = torch.tensor([0, N], dtype=torch.int32)
        tn = torch.tensor([0], dtype=torch.int32)
        v = ops.sgmv_shrink(x, p.pool_a, idx_a, ip, tn)
        assert v.shape == (N, r)
        y2 = y.clone()
        ops.sgmv(y2, x, p.pool_a, p.pool_b, idx_a, idx_b, p.scale, ip, tn)
        assert torch.equal(y2, y)


def test_many_tenants_decode():
    """One token per segment, 1024 tenants: the decode shape of serving."""
    T = 1024
    p = make_problem(T=T, N=T, h=64, o=64, r=4, l_a=2, l_b=2, S=T, popularity="distinct", seed=2, mixed_ranks=True)
    p.seg_indptr = torch.arange(T + 1, dtype=torch.int32)
    p.seg_tenant = torch.randperm(T, generator=torch.Generator().manual_seed(0)).to(torch.int32)
    check_ops(p, torch.float32, "decode")


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("popularity", POPULARITY)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cpu_paths(shape, popularity, dtype, cpu_path):
    """The grid again, all fused and all BLAS (per-shape dispatch of fp32/fp64 segments)."""
    T, N, h, o, r, l_a, l_b, S, mixed, rows = SHAPES[shape]
    seed = stable_seed(shape, popularity, str(dtype), "paths")
    p = make_problem(T=T, N=N, h=h, o=o, r=r, l_a=l_a, l_b=l_b, S=S, popularity=popularity,
                     dtype=dtype, mixed_ranks=mixed, pool_rows=rows, seed=seed)
    check_ops(p, dtype, f"{shape}/{popularity}/dense_min={cpu_path}")


def test_threads_do_not_change_results():
    """The fused kernels are bitwise independent of the thread count; the BLAS path agrees
    with them to rounding at any thread count."""
    p = make_problem(T=8, N=300, h=256, o=192, r=16, l_a=4, l_b=4, S=9, seed=4)
    mos_ext.set_cpu_dense_min_tokens(0)
    fused = _sgmv_per_thread_count(p)
    assert torch.equal(fused[0], fused[1])
    mos_ext.set_cpu_dense_min_tokens(1)
    for y in _sgmv_per_thread_count(p):
        torch.testing.assert_close(y, fused[0], rtol=1e-5, atol=1e-5)


def _sgmv_per_thread_count(p):
    outs = []
    prev = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            y = p.y.clone()
            ops.sgmv(y, *p.sgmv_args())
            outs.append(y)
    finally:
        torch.set_num_threads(prev)
    return outs


@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_isa(isa, dtype, isa_restore):
    if isa not in mos_ext.available_cpu_isas():
        pytest.skip(f"this CPU cannot run the {isa} kernels")
    mos_ext.set_cpu_isa(isa)
    assert mos_ext.cpu_isa() == isa
    for shape in ("la_ne_lb", "odd_shards", "miss_like"):
        T, N, h, o, r, l_a, l_b, S, mixed, rows = SHAPES[shape]
        p = make_problem(T=T, N=N, h=h, o=o, r=r, l_a=l_a, l_b=l_b, S=S, dtype=dtype, mixed_ranks=mixed,
                         pool_rows=rows, seed=13)
        check_ops(p, dtype, f"{isa}/{shape}")


REAL_DIMS = [  # (h, o, r, l): LLaMA-like and odd ones
    (4096, 4096, 16, 4),
    (4096, 11008, 8, 8),
    (11008, 4096, 16, 4),
    (3072, 1024, 32, 4),
    (5120, 13824, 64, 8),
    (2049, 4097, 16, 1),
]


@pytest.mark.slow
@pytest.mark.parametrize("dims", REAL_DIMS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_real_model_dims(dims, dtype):
    h, o, r, l = dims
    p = make_problem(T=32, N=160, h=h, o=o, r=r, l_a=l, l_b=l, S=24, popularity="zipf", dtype=dtype,
                     mixed_ranks=True, seed=21)
    check_ops(p, dtype, str(dims))


@pytest.mark.slow
@pytest.mark.parametrize("T", [1, 2, 7, 64, 128, 1024])
@pytest.mark.parametrize("popularity", POPULARITY)
def test_many_tenant_grid(T, popularity):
    p = make_problem(T=T, N=600, h=128, o=96, r=32, l_a=4, l_b=2, S=min(2 * T, 400), popularity=popularity,
                     mixed_ranks=True, seed=T)
    check_ops(p, torch.float32, f"T={T}")
