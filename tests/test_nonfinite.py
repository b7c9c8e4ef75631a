"""Skipped (-1) table entries are skipped, never multiplied by a zero shard.

Inf/NaN in the activations under a skipped slot, in the columns of ``v`` / ``u``
of a padded rank row, or in pool rows that no valid entry names must not reach
the output: the CPU kernels (fused and BLAS paths), the CUDA kernels (when a GPU
and a CUDA build are here) and ``mos_ext.reference`` agree, NaN for NaN.
"""
from types import SimpleNamespace

import pytest
import torch

import mos_ext
from mos_ext import ops
from mos_ext import reference as R
from problems import TOL, same_non_finite

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() and mos_ext.cuda_built() else [])

# The op backend the cases below run on: the package's ops (CPU or CUDA kernels, by device) here;
# tests/test_cuda_emu.py runs the same cases on the CUDA kernels in the host emulator.
OPS = SimpleNamespace(sgmv=ops.sgmv, sgmv_shrink=ops.sgmv_shrink, sgmv_expand=ops.sgmv_expand,
                      shard_grad=lambda *a, det: ops.shard_grad(*a, deterministic=det))

T, r, l_a, l_b, s_a, s_b = 2, 4, 4, 2, 8, 12
h, o = l_a * s_a, l_b * s_b
N = 40


def build(dtype, device, bad=float("inf")):
    """Tenant 0 (tokens 0..19): every rank row skips A slot 3, row 3 fully padded.
    Tenant 1 (tokens 20..39): rows 0..2 complete, row 3 fully padded on both sides.
    Pool row 0 is Inf and never named by a valid entry."""
    gen = torch.Generator().manual_seed(3)
    P_a, P_b = 1 + T * r * l_a, 1 + T * r * l_b
    idx_a = (1 + torch.randperm(P_a - 1, generator=gen)[: T * r * l_a]).reshape(T, r, l_a).to(torch.int32)
    idx_b = (1 + torch.randperm(P_b - 1, generator=gen)[: T * r * l_b]).reshape(T, r, l_b).to(torch.int32)
    idx_a[0, :, 3] = -1
    idx_a[:, 3] = -1
    idx_b[:, 3] = -1
    x = torch.randn(N, h, generator=gen, dtype=torch.float64)
    x[:20, 3 * s_a:] = bad  # only tenant 0's skipped slot reads these
    pool_a = torch.randn(P_a, s_a, generator=gen, dtype=torch.float64) / h ** 0.5
    pool_b = torch.randn(P_b, s_b, generator=gen, dtype=torch.float64) / r ** 0.5
    pool_a[0] = bad
    pool_b[0] = bad
    y = torch.randn(N, o, generator=gen, dtype=torch.float64)
    v = torch.randn(N, r, generator=gen, dtype=torch.float64)
    v[:, 3] = bad  # the padded rank row's column
    scale = torch.tensor([0.7, 1.3], dtype=torch.float32)
    ip = torch.tensor([0, 20, 40], dtype=torch.int32)
    tn = torch.tensor([0, 1], dtype=torch.int32)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    cast = dict(x=x.to(dtype), y=y.to(dtype), v=v.to(acc), pool_a=pool_a.to(dtype), pool_b=pool_b.to(dtype),
                idx_a=idx_a, idx_b=idx_b, scale=scale, ip=ip, tn=tn)
    return {k: t.to(device) for k, t in cast.items()}


def check(out, ref, dtype, what):
    tol = TOL[dtype]
    torch.testing.assert_close(out.cpu().double(), ref.cpu().double(), rtol=tol["rtol"], atol=tol["atol"],
                               equal_nan=True, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_skipped_slots_never_leak(device, dtype, bad, cpu_path):
    skipped_slots_never_leak(OPS, device, dtype, bad)


def skipped_slots_never_leak(ops, device, dtype, bad):
    p = build(dtype, device, bad)
    seg = (p["ip"], p["tn"])

    y = p["y"].clone()
    ops.sgmv(y, p["x"], p["pool_a"], p["pool_b"], p["idx_a"], p["idx_b"], p["scale"], *seg)
    assert torch.isfinite(y).all(), "sgmv: a skipped slot let Inf/NaN through"
    check(y, R.sgmv(p["y"], p["x"], p["pool_a"], p["pool_b"], p["idx_a"], p["idx_b"], p["scale"], *seg), dtype, "sgmv")

    v = ops.sgmv_shrink(p["x"], p["pool_a"], p["idx_a"], *seg)
    assert torch.isfinite(v).all(), "sgmv_shrink: a skipped slot let Inf/NaN through"
    assert torch.all(v[:, 3] == 0), "a padded rank row's column of v must be exactly zero"
    check(v, R.sgmv_shrink(p["x"], p["pool_a"], p["idx_a"], *seg), dtype, "sgmv_shrink")

    y = p["y"].clone()
    ops.sgmv_expand(y, p["v"], p["pool_b"], p["idx_b"], p["scale"], *seg)
    assert torch.isfinite(y).all(), "sgmv_expand: the padded rank row's column of v leaked"
    check(y, R.sgmv_expand(p["y"], p["v"], p["pool_b"], p["idx_b"], p["scale"], *seg), dtype, "sgmv_expand")

    acc = p["v"].dtype
    for det in (False, True):
        g = torch.zeros(p["pool_a"].shape, dtype=acc, device=device)
        u = torch.nan_to_num(p["v"], nan=0.0, posinf=0.0)  # u finite, x holds the Inf/NaN ...
        ops.shard_grad(g, u, p["x"], p["idx_a"], p["scale"], *seg, det=det)
        # ... which only the skipped A slots of tenant 0 read: every pool row stays finite
        assert torch.isfinite(g).all(), f"shard_grad(det={det}): a skipped slot was written"
        check(g, R.shard_grad(torch.zeros_like(g), u, p["x"], p["idx_a"], p["scale"], *seg), dtype, "shard_grad")
        g = torch.zeros(p["pool_b"].shape, dtype=acc, device=device)
        ops.shard_grad(g, p["v"], p["y"], p["idx_b"], p["scale"], *seg, det=det)
        assert torch.isfinite(g).all(), f"shard_grad(det={det}): the padded rank row's u column leaked"


@pytest.mark.parametrize("device", DEVICES)
def test_gather_of_skipped_entries_is_zero_even_over_inf_rows(device):
    p = build(torch.float32, device)
    out = ops.gather_shards(p["pool_a"], p["idx_a"])
    assert torch.isfinite(out).all()
    assert torch.all(out[0, :, 3 * s_a:] == 0) and torch.all(out[:, 3] == 0)


def test_reference_skips_rather_than_multiplies():
    """The oracle itself: a padded row of an all-Inf x gives 0, not NaN."""
    x = torch.full((3, 8), float("inf"))
    pool = torch.ones(4, 4)
    idx = torch.tensor([[[0, 1], [-1, -1]]], dtype=torch.int32)
    v = R.sgmv_shrink(x, pool, idx, torch.tensor([0, 3], dtype=torch.int32), torch.tensor([0], dtype=torch.int32))
    assert torch.all(v[:, 1] == 0) and torch.all(torch.isinf(v[:, 0]))


def check_masks(out, ref, dtype, what):
    """The same elements non-finite as in the reference, the finite ones close to it."""
    out, ref = out.cpu().double(), ref.cpu().double()
    fin = same_non_finite(out, ref, what)
    check(out[fin], ref[fin], dtype, what)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_scale_stays_in_its_tenant(device, dtype, bad, cpu_path):
    non_finite_scale_stays_in_its_tenant(OPS, device, dtype, bad)


def non_finite_scale_stays_in_its_tenant(ops, device, dtype, bad):
    """``scale`` values are not checked (a device read on CUDA). A tenant whose scale is Inf/NaN
    gets non-finite rows and nothing else in the batch changes: the other tenants' rows, and
    the pool-gradient rows only they name, equal the reference. ``scale[t]`` multiplies ``v``
    before the expand (kernels and reference), so a tenant with no valid entry adds nothing
    rather than ``NaN * 0``."""
    p = build(dtype, device, bad=0.25)  # everything finite
    p["scale"] = torch.tensor([bad, 1.3], dtype=torch.float32, device=device)
    seg = (p["ip"], p["tn"])
    mine, others = slice(0, 20), slice(20, 40)

    def sgmv(y, idx_a, idx_b):
        ops.sgmv(y, p["x"], p["pool_a"], p["pool_b"], idx_a, idx_b, p["scale"], *seg)
        return R.sgmv(p["y"], p["x"], p["pool_a"], p["pool_b"], idx_a, idx_b, p["scale"], *seg)

    def expand(y, idx_a, idx_b):
        ops.sgmv_expand(y, p["v"], p["pool_b"], idx_b, p["scale"], *seg)
        return R.sgmv_expand(p["y"], p["v"], p["pool_b"], idx_b, p["scale"], *seg)

    rank0_a, rank0_b = p["idx_a"].clone(), p["idx_b"].clone()
    rank0_a[0], rank0_b[0] = -1, -1  # tenant 0 with no valid entry
    for what, run in (("sgmv", sgmv), ("sgmv_expand", expand)):
        y = p["y"].clone()
        ref = run(y, p["idx_a"], p["idx_b"])
        assert not torch.isfinite(y[mine]).any(), f"{what}: a row of the tenant with scale {bad} came out finite"
        check_masks(y, ref, dtype, what)
        y = p["y"].clone()
        ref = run(y, rank0_a, rank0_b)
        assert torch.equal(y[mine], p["y"][mine]), f"{what}: a tenant with no valid entry changed its rows"
        check_masks(y, ref, dtype, f"{what}, rank 0")

    acc = p["v"].dtype
    named = [p["idx_a"][t][p["idx_a"][t] >= 0].long().unique() for t in (0, 1)]
    assert not set(named[0].tolist()) & set(named[1].tolist())  # build's tables share no pool row
    for det in (False, True):
        g0 = torch.randn(p["pool_a"].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
        g0 = g0.to(device=device, dtype=acc)
        g = g0.clone()
        ops.shard_grad(g, p["v"], p["x"], p["idx_a"], p["scale"], *seg, det=det)
        ref = R.shard_grad(g0, p["v"], p["x"], p["idx_a"], p["scale"], *seg)
        assert not torch.isfinite(g[named[0]]).any(), f"shard_grad(det={det}): a row of the bad tenant is finite"
        check_masks(g, ref, dtype, f"shard_grad(det={det})")
