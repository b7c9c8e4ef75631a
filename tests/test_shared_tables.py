"""Shared tables (docs/OPS.md): sgmv / sgmv_shrink / sgmv_expand with ``map_a`` / ``map_b``.

Tenants that share a table read it through a per-tenant row base. Checked on the CPU against
mos_ext.reference, and bitwise against the same problem written with per-tenant tables of
global rows (the map must be exactly a cheaper spelling of those tables)."""
import pytest
import torch

import mos_ext
from mos_ext import ops
from mos_ext import reference as R
from problems import acc_dtype, assert_close, make_shared_problem, stable_seed

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (U, T, N, h, o, r, l_a, l_b, S)
SHAPES = {
    "one_table": (1, 6, 33, 64, 48, 8, 4, 2, 7),
    "three_tables": (3, 9, 57, 64, 40, 4, 4, 1, 11),
    "odd": (2, 5, 23, 105, 91, 3, 5, 7, 7),
    "long_segments": (2, 4, 160, 96, 64, 8, 3, 4, 3),  # segments long enough for the BLAS path
    "many_tenants": (4, 200, 300, 32, 32, 4, 2, 2, 150),
}


def _run_all(p, map_a, map_b):
    v = ops.sgmv_shrink(p.x, p.pool_a, p.idx_a, p.seg_indptr, p.seg_tenant, map_a)
    y1 = ops.sgmv_expand(p.y.clone(), v, p.pool_b, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant, map_b)
    y2 = ops.sgmv(p.y.clone(), p.x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant,
                  map_a, map_b)
    return v, y1, y2


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shared_equals_reference_and_flat_tables(shape, dtype, cpu_path):
    U, T, N, h, o, r, l_a, l_b, S = SHAPES[shape]
    sp = make_shared_problem(U=U, T=T, N=N, h=h, o=o, r=r, l_a=l_a, l_b=l_b, S=S, dtype=dtype,
                             seed=stable_seed(shape, str(dtype)))
    p, f = sp.p, sp.flat
    assert U < T and sp.map_a[:, 1].max() > 0  # shared for real, and offset for real
    v, y1, y2 = _run_all(p, sp.map_a, sp.map_b)
    vf, y1f, y2f = _run_all(f, None, None)
    # the map is a cheaper spelling of the flat tables: the same kernels, the same sums
    assert torch.equal(v, vf) and torch.equal(y1, y1f) and torch.equal(y2, y2f)
    v_ref = R.sgmv_shrink(p.x, p.pool_a, p.idx_a, p.seg_indptr, p.seg_tenant, sp.map_a)
    assert torch.equal(v_ref, R.sgmv_shrink(f.x, f.pool_a, f.idx_a, f.seg_indptr, f.seg_tenant))
    assert_close(v, v_ref, acc_dtype(dtype), f"shrink {shape}")
    assert_close(y2, R.sgmv(p.y, p.x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant,
                            sp.map_a, sp.map_b), dtype, f"sgmv {shape}")
    ref1 = R.sgmv_expand(p.y, v, p.pool_b, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant, sp.map_b)
    assert_close(y1, ref1, dtype, f"expand {shape}")
    # tokens outside every segment, or of -1 tenants, are untouched
    cov = p.covered_rows()
    assert torch.equal(y2[~cov], p.y[~cov]) and torch.all(v[~cov] == 0)


def test_shared_rows_are_relative_to_each_tenant():
    """Two tenants on one table with bases 0 and k read rows p and k + p: moving a tenant's
    window moves what it reads, and nothing else."""
    sp = make_shared_problem(U=1, T=2, N=8, r=2, S=2, mixed_ranks=False, seed=3)
    p = sp.p
    p.seg_indptr = torch.tensor([0, 4, 8], dtype=torch.int32)
    p.seg_tenant = torch.tensor([0, 1], dtype=torch.int32)
    m_a, m_b = sp.map_a.clone(), sp.map_b.clone()
    m_a[:, 1] = torch.tensor([0, 1]); m_b[:, 1] = torch.tensor([0, 1])
    y = ops.sgmv(p.y.clone(), p.x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant, m_a, m_b)
    shifted_a, shifted_b = torch.roll(p.pool_a, -1, 0), torch.roll(p.pool_b, -1, 0)
    # tenant 1 at base 1 == tenant 1 at base 0 on pools rolled up by one row
    y_roll = ops.sgmv(p.y.clone(), p.x, shifted_a, shifted_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr,
                      p.seg_tenant, m_a.index_fill(1, torch.tensor([1]), 0), m_b.index_fill(1, torch.tensor([1]), 0))
    assert torch.equal(y[4:], y_roll[4:])
    assert not torch.equal(y[4:], ops.sgmv(p.y.clone(), p.x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale,
                                           p.seg_indptr, p.seg_tenant, m_a.index_fill(1, torch.tensor([1]), 0),
                                           m_b.index_fill(1, torch.tensor([1]), 0))[4:])


def test_bad_maps_are_refused_by_name():
    sp = make_shared_problem(U=2, T=4, seed=5)
    p = sp.p
    args = lambda ma, mb: (p.y.clone(), p.x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr,
                           p.seg_tenant, ma, mb)
    bad = sp.map_a.clone(); bad[1, 0] = 2
    with pytest.raises(IndexError, match=r"map_a\[1\] names table 2, outside \[0, 2\)"):
        ops.sgmv(*args(bad, sp.map_b))
    bad = sp.map_b.clone(); bad[3, 1] = -1
    with pytest.raises(IndexError, match=r"map_b\[3\] has row base -1"):
        ops.sgmv(*args(sp.map_a, bad))
    bad = sp.map_a.clone(); bad[2, 1] = p.pool_a.shape[0] - 1
    with pytest.raises(IndexError, match=r"map_a\[2\] has row base .* is outside the pool's"):
        ops.sgmv(*args(bad, sp.map_b))
    with pytest.raises(ValueError, match="map_a must be \\[T, 2\\]"):
        ops.sgmv(*args(sp.map_a[:, :1].contiguous(), sp.map_b))
    with pytest.raises(TypeError, match="map_b must be int32"):
        ops.sgmv(*args(sp.map_a, sp.map_b.long()))
    with pytest.raises(ValueError, match="map_a and map_b must be given together"):
        ops.sgmv(*args(sp.map_a, None))
    with pytest.raises(ValueError, match="one entry per tenant"):  # scale has T entries, the maps T-1
        ops.sgmv(*args(sp.map_a[:-1].contiguous(), sp.map_b[:-1].contiguous()))
    with pytest.raises(ValueError, match="map_a\\[1\\] names table 2"):
        m = sp.map_a.clone(); m[1, 0] = 2
        ops.validate_map(m, p.idx_a, p.pool_a, "map_a")
    assert ops.validate_map(sp.map_a, p.idx_a, p.pool_a) is sp.map_a


def test_checks_off_bad_rows_contribute_nothing():
    """With value checks off, a map row naming no table or a base past the pool, and entries past
    the pool for a tenant's base, are skipped (never an out-of-bounds read)."""
    sp = make_shared_problem(U=2, T=6, N=40, S=12, mixed_ranks=False, seed=9)
    p = sp.p
    m_a, m_b = sp.map_a.clone(), sp.map_b.clone()
    m_a[0, 0] = 7  # no such table: tenant 0 contributes nothing
    m_b[1, 1] = p.pool_b.shape[0] + 5  # base past the pool: tenant 1 nothing
    m_a[2, 1] = -3
    prev = mos_ext.set_index_checks(False)
    try:
        y = ops.sgmv(p.y.clone(), p.x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant,
                     m_a, m_b)
    finally:
        mos_ext.set_index_checks(prev)
    tn = p.seg_tenant.clone()
    tn[(tn == 0) | (tn == 1) | (tn == 2)] = -1
    ref = R.sgmv(p.y, p.x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr, tn, sp.map_a, sp.map_b)
    assert_close(y, ref, torch.float32, "checks off")


def test_map_is_not_differentiable():
    sp = make_shared_problem(U=1, T=2, seed=1)
    p = sp.p
    pool = p.pool_a.clone().requires_grad_()
    with pytest.raises(ValueError, match="map_a .* is not differentiable"):
        ops.sgmv_shrink(p.x, pool, p.idx_a, p.seg_indptr, p.seg_tenant, sp.map_a)
    with torch.no_grad():
        v = ops.sgmv_shrink(p.x, pool, p.idx_a, p.seg_indptr, p.seg_tenant, sp.map_a)
    assert_close(v, R.sgmv_shrink(p.x, p.pool_a, p.idx_a, p.seg_indptr, p.seg_tenant, sp.map_a), torch.float32)


def test_opcheck_with_maps():
    sp = make_shared_problem(U=2, T=4, seed=2)
    p = sp.p
    torch.library.opcheck(torch.ops.mos.sgmv, (p.y.clone(), p.x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale,
                                               p.seg_indptr, p.seg_tenant, sp.map_a, sp.map_b))
    torch.library.opcheck(torch.ops.mos.sgmv_shrink, (p.x, p.pool_a, p.idx_a, p.seg_indptr, p.seg_tenant, sp.map_a))
    v = R.sgmv_shrink(p.x, p.pool_a, p.idx_a, p.seg_indptr, p.seg_tenant, sp.map_a)
    torch.library.opcheck(torch.ops.mos.sgmv_expand, (p.y.clone(), v, p.pool_b, p.idx_b, p.scale, p.seg_indptr,
                                                      p.seg_tenant, sp.map_b))
