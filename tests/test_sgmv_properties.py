"""Property tests (hypothesis): sgmv, its halves and shard_grad equal the reference for
arbitrary small shapes, segmentations, tenants, ranks and slot counts, on the fused CPU kernels,
the BLAS path and the default mix of both."""
import torch
from hypothesis import given, settings, strategies as st

import mos_ext
from mos_ext import ops
from mos_ext import reference as R
from problems import Problem, acc_dtype, assert_close, make_table, shard_grad_magnitude

# the CPU per-shape dispatch threshold: fused only, BLAS for every fp32/fp64 segment, the default
CPU_PATHS = st.sampled_from([0, 1, None])


def use_cpu_path(threshold):
    """Set the threshold for one example (the autouse fixture restores it after the test)."""
    if threshold is not None:
        mos_ext.set_cpu_dense_min_tokens(threshold)


@st.composite
def problems(draw):
    T = draw(st.integers(1, 6))
    r = draw(st.integers(1, 9))
    l_a = draw(st.integers(1, 5))
    l_b = draw(st.integers(1, 5))
    s_a = draw(st.integers(1, 40))
    s_b = draw(st.integers(1, 40))
    N = draw(st.integers(0, 70))
    S = draw(st.integers(0, 8))
    cuts = sorted(draw(st.lists(st.integers(0, N), min_size=S, max_size=S)))
    end = draw(st.integers(cuts[-1] if cuts else 0, N))
    ptr = [0] + cuts[:-1] + [end] if S else [0]
    tenants = draw(st.lists(st.integers(-1, T - 1), min_size=S, max_size=S))
    P_a = draw(st.integers(1, 3 * r * l_a))
    P_b = draw(st.integers(1, 3 * r * l_b))
    seed = draw(st.integers(0, 2**16))
    dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
    gen = torch.Generator().manual_seed(seed)
    ranks = torch.randint(0, r + 1, (T,), generator=gen).tolist()
    return dtype, Problem(
        x=torch.randn(N, l_a * s_a, generator=gen).to(dtype),
        y=torch.randn(N, l_b * s_b, generator=gen).to(dtype),
        pool_a=torch.randn(P_a, s_a, generator=gen).to(dtype),
        pool_b=torch.randn(P_b, s_b, generator=gen).to(dtype),
        idx_a=make_table(T, r, l_a, P_a, gen, ranks),
        idx_b=make_table(T, r, l_b, P_b, gen, ranks),
        scale=torch.rand(T, generator=gen) + 0.5,
        seg_indptr=torch.tensor(ptr, dtype=torch.int32),
        seg_tenant=torch.tensor(tenants, dtype=torch.int32),
    )


@settings(max_examples=150, deadline=None)
@given(problems(), CPU_PATHS)
def test_sgmv_matches_reference(dp, path):
    dtype, p = dp
    use_cpu_path(path)
    # Values are O(sqrt(h * r)) here: compare relative to the output scale.
    ref = R.sgmv(p.y, *p.sgmv_args())
    y = p.y.clone()
    ops.sgmv(y, *p.sgmv_args())
    mag = max(ref.double().abs().max().item() if ref.numel() else 1.0, 1.0)
    assert_close(y.double() / mag, ref.double() / mag, dtype, "sgmv")
    covered = p.covered_rows()
    assert torch.equal(y[~covered], p.y[~covered])
    v = ops.sgmv_shrink(p.x, p.pool_a, p.idx_a, p.seg_indptr, p.seg_tenant)
    v_ref = R.sgmv_shrink(p.x, p.pool_a, p.idx_a, p.seg_indptr, p.seg_tenant)
    vmag = max(v_ref.abs().max().item() if v_ref.numel() else 1.0, 1.0)
    assert_close(v / vmag, v_ref / vmag, v.dtype, "shrink")


@settings(max_examples=150, deadline=None)
@given(problems(), CPU_PATHS, st.booleans(), st.integers(0, 2**16))
def test_shard_grad_matches_reference(dp, path, deterministic, seed):
    """Into a poisoned gradient; the bound grows with the sum of |terms| per pool row."""
    dtype, p = dp
    use_cpu_path(path)
    acc = acc_dtype(dtype)
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(p.x.shape[0], p.idx_a.shape[1], generator=gen, dtype=torch.float64).to(acc)
    grad0 = torch.randn(p.pool_a.shape, generator=gen, dtype=torch.float64).to(acc)
    grad = grad0.clone()
    ops.shard_grad(grad, u, p.x, p.idx_a, p.scale, p.seg_indptr, p.seg_tenant, deterministic)
    ref = R.shard_grad(grad0, u, p.x, p.idx_a, p.scale, p.seg_indptr, p.seg_tenant)
    mag = shard_grad_magnitude(grad0, u, p.x, p.idx_a, p.scale, p.seg_indptr, p.seg_tenant)
    assert_close(grad, ref, acc, "shard_grad", mag=mag)
    if deterministic:  # bitwise the same on a rerun
        again = grad0.clone()
        ops.shard_grad(again, u, p.x, p.idx_a, p.scale, p.seg_indptr, p.seg_tenant, True)
        assert torch.equal(again, grad)
