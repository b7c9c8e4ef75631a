"""The CUDA kernels (csrc/cuda/) run on the CPU by the host emulator (tools/cuda_emu),
against ``mos_ext.reference``, with the path each call takes checked.

Grid: bf16 / fp16 activations x pools in the activation dtype or fp32 (per side) x
layouts (16-byte aligned rows -> the fast path; offset row views -> the generic
fallback) x shapes (decode with many tenants and mixed ranks, a prefill-like
batch, 3000 segments with empty and -1 segments so the fast path's segment
pre-pass runs) x ops (sgmv, sgmv_shrink, sgmv_expand). Plus: fp32 activations
and shard lengths that are not multiples of 8 fall back; MOS_EXT_CUDA_PATH=generic
forces the fallback; a 16-byte access the dispatch let through misaligned would
fail the launch (the emulator checks every one). Shared tables (map_a / map_b):
U < T tables with per-tenant row bases on every path and dtype, and bad maps with
checks off inside guard bands (no read outside the pools, tables or maps).

Needs g++, ninja and the CUDA headers (no GPU); skipped without them. The first
run builds the emulator (~1 minute; cached in $MOS_EMU_BUILD).
"""
from __future__ import annotations

import importlib.util
import os
import shutil

import pytest
import torch

import mos_ext
from mos_ext import reference
from types import SimpleNamespace

import test_nonfinite
from problems import mixed_rank_table, random_segments, same_non_finite, shard_grad_magnitude

HERE = os.path.dirname(os.path.abspath(__file__))
EMU_DIR = os.path.join(HERE, "..", "tools", "cuda_emu")


def _emu():
    # by path, under its own name (a PyPI package is also called "build")
    os.environ["MOS_EMU_NO_AUTOLOAD"] = "1"
    spec = importlib.util.spec_from_file_location("mos_cuda_emu_build", os.path.join(EMU_DIR, "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    if build.cuda_include() is None or shutil.which("g++") is None or shutil.which("ninja") is None:
        pytest.skip("cuda_emu needs g++, ninja and the CUDA headers")
    return build.load()


@pytest.fixture(scope="module")
def E():
    return _emu()


@pytest.fixture(autouse=True)
def _path_env():
    names = ("MOS_EXT_CUDA_PATH", "MOS_EXT_DET_PART_BYTES")
    old = {k: os.environ.pop(k, None) for k in names}
    yield
    for k in names:
        os.environ.pop(k, None)
        if old[k] is not None:
            os.environ[k] = old[k]


TOL = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def close(out, ref, what):
    tol = TOL[ref.dtype] if ref.dtype in TOL else 3e-5
    ref64 = ref.double()
    mag = max(1.0, ref64.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.double(), ref64, rtol=tol, atol=tol * mag, msg=lambda m: f"{what}: {m}")


def rows(n, w, dtype, gen, aligned):
    """[n, w] activation: 16-byte aligned rows (stride rounded up to 8 elements), or an
    offset view (pointer 2 bytes past a 16-byte boundary) that must fall back."""
    if aligned:
        st = (w + 7) // 8 * 8 + 8
        base = torch.randn(n, st, generator=gen, dtype=torch.float64).to(dtype)
        return base[:, :w]
    base = torch.randn(n, w + 9, generator=gen, dtype=torch.float64).to(dtype)
    return base[:, 1:w + 1]


def operands(N, h, o, r, shape_a, shape_b, dtype, pa, pb, aligned, gen):
    """x [N, h], y [N, o] (rows() layout) and pools of the given [rows, shard length] shapes, random."""
    x = rows(N, h, dtype, gen, aligned)
    y = rows(N, o, dtype, gen, aligned)
    pool_a = (torch.randn(*shape_a, generator=gen, dtype=torch.float64) / h ** 0.5).to(pa or dtype)
    pool_b = (torch.randn(*shape_b, generator=gen, dtype=torch.float64) / r ** 0.5).to(pb or dtype)
    return x, y, pool_a, pool_b


def problem(*, N, h, l_a, o, l_b, r, T, S, dtype, pa, pb, aligned, seed):
    gen = torch.Generator().manual_seed(seed)
    s_a, s_b = h // l_a, o // l_b
    P_a, P_b = max(2, T * r * l_a // 2 + 3), max(2, T * r * l_b // 2 + 5)
    x, y, pool_a, pool_b = operands(N, h, o, r, (P_a, s_a), (P_b, s_b), dtype, pa, pb, aligned, gen)
    idx_a, idx_b = mixed_rank_table(T, r, l_a, P_a, gen), mixed_rank_table(T, r, l_b, P_b, gen)
    idx_b[idx_a[:, :, :1].expand(-1, -1, l_b) < 0] = -1
    scale = (torch.rand(T, generator=gen) * 1.5 + 0.5).float()
    ip, tn = random_segments(N, T, S, gen, full_p=0.6, empty_every=5)
    return dict(x=x, y=y, pool_a=pool_a, pool_b=pool_b, idx_a=idx_a, idx_b=idx_b, scale=scale, ip=ip, tn=tn)


SHAPES = {
    # name: N, h, l_a, o, l_b, r, T, S
    "decode": (64, 256, 4, 512, 8, 16, 48, 64),
    "prefill": (150, 384, 2, 128, 1, 24, 3, 4),  # the tensor-core prefill kernel
    "lora_l1": (40, 128, 1, 96, 1, 8, 5, 12),
    "segs300": (320, 64, 2, 32, 1, 5, 7, 300),
    "segs3000": (3200, 64, 2, 32, 1, 5, 7, 3000),
}
# The oracle per shape: the plain-torch reference, or for thousands of segments
# (where its per-segment Python loop takes tens of seconds) the CPU ops, which
# tests/test_sgmv*.py check against the reference.
ORACLE = {name: "ref" for name in SHAPES}
ORACLE["segs3000"] = "cpu"


def run_all(E, p, expect_fast, what, oracle="ref", fused_path=None):
    R = reference if oracle == "ref" else _CpuOps
    x, y0 = p["x"], p["y"]
    pa, pb, ia, ib, sc, ip, tn = p["pool_a"], p["pool_b"], p["idx_a"], p["idx_b"], p["scale"], p["ip"], p["tn"]
    # fused
    y = y0.clone() if y0.is_contiguous() else _clone_view(y0)
    E.sgmv(y, x, pa, pb, ia, ib, sc, ip, tn)
    assert E.last_sgmv_path().startswith("fast") == expect_fast, f"{what}: sgmv took {E.last_sgmv_path()!r}"
    if fused_path is not None:
        assert E.last_sgmv_path() == fused_path, f"{what}: sgmv took {E.last_sgmv_path()!r}"
    yr = R.sgmv(_clone_view(y0), x, pa, pb, ia, ib, sc, ip, tn)
    close(y, yr, f"{what} sgmv")
    untouched = (yr == y0).all(1)
    assert torch.equal(y[untouched], y0[untouched]), f"{what}: sgmv touched rows outside segments"
    # shrink
    v = E.sgmv_shrink(x, pa, ia, ip, tn)
    assert (E.last_sgmv_path() == "fast") == expect_fast, f"{what}: shrink took {E.last_sgmv_path()!r}"
    close(v, R.sgmv_shrink(x, pa, ia, ip, tn), f"{what} shrink")
    # expand
    vv = torch.randn(x.shape[0], ib.shape[1], dtype=torch.float32)
    y = _clone_view(y0)
    E.sgmv_expand(y, vv, pb, ib, sc, ip, tn)
    assert (E.last_sgmv_path() == "fast") == expect_fast, f"{what}: expand took {E.last_sgmv_path()!r}"
    close(y, R.sgmv_expand(_clone_view(y0), vv, pb, ib, sc, ip, tn), f"{what} expand")


class _CpuOps:
    @staticmethod
    def sgmv(y, *a):
        torch.ops.mos.sgmv(y, *a)
        return y

    @staticmethod
    def sgmv_expand(y, *a):
        torch.ops.mos.sgmv_expand(y, *a)
        return y

    @staticmethod
    def sgmv_shrink(*a):
        return torch.ops.mos.sgmv_shrink(*a)


def _clone_view(t):
    """Same values, same strides and same 16-byte phase as ``t``."""
    st = t.stride(0)
    base = torch.empty(t.shape[0] * st + 16, dtype=t.dtype)
    phase = (t.data_ptr() % 16) // t.element_size()
    while (base.data_ptr() + 0) % 16 != 0:  # allocator gives 64-byte alignment; keep it general
        base = torch.empty(t.shape[0] * st + 16, dtype=t.dtype)
    out = base[phase:phase + t.shape[0] * st].view(t.shape[0], st)[:, :t.shape[1]]
    out.copy_(t)
    return out


POOLS = [(None, None), ("f32", "f32"), ("f32", None), (None, "f32")]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("aligned", [True, False])
def test_grid(E, shape, dtype, aligned):
    N, h, l_a, o, l_b, r, T, S = SHAPES[shape]
    if shape == "segs3000" and not aligned:
        pytest.skip("the generic kernels' segment search is quadratic in S: too slow to emulate at 3000")
    # every pool combination per shape across the two dtypes (fast path); one per
    # case for the fallback and the many-segment shapes
    pools = POOLS[0::2] if dtype == torch.bfloat16 else POOLS[1::2]
    if shape.startswith("segs") or not aligned:
        pools = pools[:1]
    for k, (pa, pb) in enumerate(pools):
        p = problem(N=N, h=h, l_a=l_a, o=o, l_b=l_b, r=r, T=T, S=S, dtype=dtype,
                    pa=torch.float32 if pa else None, pb=torch.float32 if pb else None,
                    aligned=aligned, seed=11 * k + len(shape))
        run_all(E, p, aligned, f"{shape} {dtype} pools={pa},{pb} aligned={aligned}", ORACLE[shape],
                fused_path="fast (tensor-core prefill)" if shape == "prefill" and aligned else None)


def test_fallbacks(E):
    # fp32 activations, shard length not a multiple of 8, forced generic
    p = problem(N=30, h=96, l_a=3, o=64, l_b=2, r=8, T=3, S=5, dtype=torch.float32, pa=None, pb=None,
                aligned=True, seed=1)
    run_all(E, p, False, "fp32")
    p = problem(N=30, h=36, l_a=3, o=64, l_b=2, r=8, T=3, S=5, dtype=torch.bfloat16, pa=None, pb=None,
                aligned=True, seed=2)
    y = p["y"].clone()
    E.sgmv(y, p["x"], p["pool_a"], p["pool_b"], p["idx_a"], p["idx_b"], p["scale"], p["ip"], p["tn"])
    assert E.last_sgmv_path() == "shard length is not a multiple of 8"
    p = problem(N=30, h=64, l_a=2, o=64, l_b=2, r=8, T=3, S=5, dtype=torch.bfloat16, pa=None, pb=None,
                aligned=True, seed=3)
    from mos_ext import settings

    assert settings.set_cuda_path("generic") == "auto"  # the setter drives the env var the kernels read
    run_all(E, p, False, "forced generic")
    assert settings.set_cuda_path("fast") == "generic" and settings.get_cuda_path() == "fast"
    run_all(E, p, True, "forced fast")
    with pytest.raises(ValueError):
        settings.set_cuda_path("turbo")
    os.environ["MOS_EXT_CUDA_PATH"] = "bogus"
    with pytest.raises(ValueError, match="MOS_EXT_CUDA_PATH"):
        run_all(E, p, True, "bogus")


def test_nonfinite_padded_rows(E):
    """Inf / NaN in x do not leak through padded (-1) rank rows: they are skipped."""
    p = problem(N=20, h=64, l_a=2, o=64, l_b=2, r=8, T=2, S=3, dtype=torch.bfloat16, pa=None, pb=None,
                aligned=True, seed=5)
    p["idx_a"][:, 4:] = -1
    p["idx_b"][:, 4:] = -1
    pb = p["pool_b"].clone()
    used = set(p["idx_b"][:, :4].flatten().tolist())
    spare = [i for i in range(pb.shape[0]) if i not in used]
    if spare:
        pb[spare] = float("nan")
    y = _clone_view(p["y"])
    E.sgmv(y, p["x"], p["pool_a"], pb, p["idx_a"], p["idx_b"], p["scale"], p["ip"], p["tn"])
    assert E.last_sgmv_path() == "fast"
    yr = reference.sgmv(p["y"].clone(), p["x"], p["pool_a"], pb, p["idx_a"], p["idx_b"], p["scale"], p["ip"], p["tn"])
    close(y, yr, "nonfinite")


def _same_non_finite(out, ref, what):
    """The reference's non-finite elements, and the finite ones close (``ref`` in ``out``'s dtype)."""
    fin = same_non_finite(out, ref, what)
    close(out[fin], ref[fin].to(out.dtype), what)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("shape,aligned,path", [("decode", True, "fast"), ("prefill", True, "fast (tensor-core prefill)"),
                                                ("lora_l1", False, None)])
def test_non_finite_scale_stays_in_its_tenant(E, shape, aligned, path, bad):
    """One tenant's Inf/NaN scale makes exactly the reference's elements non-finite (its
    rows with a valid term; scale multiplies v before the expand) and leaves every other
    tenant's rows as the reference has them, on each kernel path; shard_grad (tensor-core
    and generic) likewise per pool row."""
    N, h, l_a, o, l_b, r, T, S = SHAPES[shape]
    p = problem(N=N, h=h, l_a=l_a, o=o, l_b=l_b, r=r, T=T, S=S, dtype=torch.bfloat16, pa=torch.float32, pb=None,
                aligned=aligned, seed=21)
    live = [int(t) for g, t in enumerate(p["tn"].tolist())
            if t >= 0 and p["ip"][g + 1] > p["ip"][g] and (p["idx_b"][t] >= 0).any()]
    assert live, "the problem needs a tenant with tokens and valid entries"
    p["scale"][live[0]] = bad
    y = _clone_view(p["y"])
    E.sgmv(y, p["x"], p["pool_a"], p["pool_b"], p["idx_a"], p["idx_b"], p["scale"], p["ip"], p["tn"])
    assert E.last_sgmv_path() == path if path else not E.last_sgmv_path().startswith("fast"), E.last_sgmv_path()
    ref = reference.sgmv(_clone_view(p["y"]), p["x"], p["pool_a"], p["pool_b"], p["idx_a"], p["idx_b"], p["scale"],
                         p["ip"], p["tn"])
    assert not torch.isfinite(ref).all(), "the bad scale must reach the reference's output"
    _same_non_finite(y, ref, f"{shape} sgmv")
    v = torch.randn(N, r, generator=torch.Generator().manual_seed(2))
    y = _clone_view(p["y"])
    E.sgmv_expand(y, v, p["pool_b"], p["idx_b"], p["scale"], p["ip"], p["tn"])
    _same_non_finite(y, reference.sgmv_expand(_clone_view(p["y"]), v, p["pool_b"], p["idx_b"], p["scale"], p["ip"],
                                              p["tn"]), f"{shape} expand")
    if shape != "prefill":  # shard_grad on the x of the decode (tensor cores) and generic problems
        for det in (False, True):
            g0 = torch.randn(p["pool_a"].shape, generator=torch.Generator().manual_seed(3))
            g = g0.clone()
            E.shard_grad(g, v, p["x"], p["idx_a"], p["scale"], p["ip"], p["tn"], det)
            ref = reference.shard_grad(g0.double(), v.double(), p["x"].double(), p["idx_a"], p["scale"], p["ip"],
                                       p["tn"])
            _same_non_finite(g, ref, f"{shape} shard_grad(det={det}) [{E.last_sgmv_path()}]")


@pytest.mark.parametrize("bad", [float("inf"), float("nan")], ids=["inf", "nan"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cuda_path", ["auto", "generic"])
def test_nonfinite_cases(E, cuda_path, dtype, bad):
    """tests/test_nonfinite.py's two cases on the CUDA kernels: skipped (-1) slots under Inf/NaN
    activations, padded rank rows under Inf/NaN v, and a tenant with a non-finite scale (with and
    without valid entries). The first H200 run (2026-12-04) failed both on the generic kernels,
    which multiplied skipped slots by a zero shard (Inf * 0 = NaN); this grid reproduces that."""
    os.environ["MOS_EXT_CUDA_PATH"] = cuda_path
    emu = SimpleNamespace(sgmv=E.sgmv, sgmv_shrink=E.sgmv_shrink, sgmv_expand=E.sgmv_expand,
                          shard_grad=lambda *a, det: E.shard_grad(*a, det))
    test_nonfinite.skipped_slots_never_leak(emu, "cpu", dtype, bad)
    test_nonfinite.non_finite_scale_stays_in_its_tenant(emu, "cpu", dtype, bad)


@pytest.mark.parametrize("S,N,dtype", [(9, 90, torch.bfloat16), (400, 90, torch.bfloat16), (3, 300, torch.float16)])
def test_checks_off_garbage(E, S, N, dtype):
    """Index checks off: out-of-range table entries, tenants and segment bounds
    (non-monotone, negative, past N) behave on the fast path exactly as on the CPU
    (S = 3, N = 300: the fused op takes the tensor-core prefill kernel)."""
    gen = torch.Generator().manual_seed(S)
    p = problem(N=N, h=64, l_a=2, o=48, l_b=3, r=8, T=3, S=S, dtype=dtype, pa=None, pb=torch.float32,
                aligned=True, seed=S)
    for k in ("idx_a", "idx_b"):
        m = torch.rand(p[k].shape, generator=gen) < 0.2
        p[k][m] = torch.randint(-4, 200, (int(m.sum()),), generator=gen, dtype=torch.int32)
    p["ip"] = torch.randint(-5, N + 8, (S + 1,), generator=gen, dtype=torch.int32)
    p["tn"] = torch.randint(-3, 6, (S,), generator=gen, dtype=torch.int32)
    prev = mos_ext.set_index_checks(False)
    E.set_index_checks(False)
    try:
        run_all(E, p, True, f"garbage S={S}", oracle="cpu", fused_path="fast (tensor-core prefill)" if S == 3 else None)
    finally:
        mos_ext.set_index_checks(prev)
        E.set_index_checks(True)


# ----------------------------------------------------------------------------
# Shared tables: map_a / map_b [T, 2] (table u, row base) per tenant, U < T tables


def map_tables(idx, map_, P):
    """The [T, r, l] global-row tables a map gives, by the contract (launch.h Table):
    tenant t reads table u = map[t, 0], its entry p names row base + p (base = map[t, 1])
    and is used iff 0 <= p < P - base; a row with u outside [0, U) or base outside [0, P]
    leaves the tenant nothing (all -1). For valid maps these are reference.tenant_table's."""
    out = torch.full((map_.shape[0],) + tuple(idx.shape[1:]), -1, dtype=torch.int32)
    for t, (u, base) in enumerate(map_.tolist()):
        if 0 <= u < idx.shape[0] and 0 <= base <= P:
            tab = idx[u]
            out[t] = torch.where((tab >= 0) & (tab < P - base), tab + base, -1)
    return out


def map_problem(*, N, h, l_a, o, l_b, r, U, T, S, dtype, pa, pb, aligned, seed):
    """problem() with U < T shared tables: table u names rows [0, r * l) of an adapter
    block (-1 padded rank rows, rank padding shared by both sides), every table is used
    and most by several tenants, each tenant with its own row base (0, the top block
    P - r * l, random ones in between) into pools of a few blocks."""
    gen = torch.Generator().manual_seed(seed)
    s_a, s_b = h // l_a, o // l_b
    Q_a, Q_b = r * l_a, r * l_b  # rows a table names
    P_a, P_b = 3 * Q_a + 5, 2 * Q_b + 3
    x, y, pool_a, pool_b = operands(N, h, o, r, (P_a, s_a), (P_b, s_b), dtype, pa, pb, aligned, gen)
    idx_a, idx_b = mixed_rank_table(U, r, l_a, Q_a, gen), mixed_rank_table(U, r, l_b, Q_b, gen)
    idx_b[idx_a[:, :, :1].expand(-1, -1, l_b) < 0] = -1
    idx_a[0, 0, 0] = Q_a - 1  # with base P - Q the pool's last row
    idx_b[0, 0, 0] = Q_b - 1
    u = torch.cat([torch.arange(U), torch.randint(0, U, (T - U,), generator=gen)])
    u = u[torch.randperm(T, generator=gen)]
    u[0] = 0
    maps = []
    for P, Q in ((P_a, Q_a), (P_b, Q_b)):
        base = torch.randint(0, P - Q + 1, (T,), generator=gen)
        base[0], base[1] = P - Q, 0
        maps.append(torch.stack([u, base], 1).to(torch.int32))
    scale = (torch.rand(T, generator=gen) * 1.5 + 0.5).float()
    ip, tn = random_segments(N, T, S, gen, full_p=0.6, empty_every=5)
    tn[: min(2, S)] = torch.tensor([0, 1][: min(2, S)], dtype=torch.int32)  # the top block and base 0 in use
    if S > 2 and int(ip[1]) == int(ip[0]):
        ip[1:] = torch.clamp(ip[1:], min=min(int(ip[0]) + 1, N))  # ... with a token
    return dict(x=x, y=y, pool_a=pool_a, pool_b=pool_b, idx_a=idx_a, idx_b=idx_b, scale=scale, ip=ip, tn=tn,
                map_a=maps[0], map_b=maps[1])


def run_maps(E, p, expect_fast, what, fused_path=None, oracle_maps=True):
    """run_all with the maps, against the reference (with the maps, or, oracle_maps=False,
    without them on map_tables' per-tenant tables, segments of tenants >= T set to -1)."""
    x, y0 = p["x"], p["y"]
    pa, pb, ia, ib, sc, ip, tn = p["pool_a"], p["pool_b"], p["idx_a"], p["idx_b"], p["scale"], p["ip"], p["tn"]
    ma, mb = p["map_a"], p["map_b"]
    if oracle_maps:
        ref_a, ref_b, ref_tn = (ia, ma), (ib, mb), tn
    else:
        T = ma.shape[0]
        ref_a, ref_b = (map_tables(ia, ma, pa.shape[0]), None), (map_tables(ib, mb, pb.shape[0]), None)
        ref_tn = torch.where(tn < T, tn, -1)

    def ref_sgmv(y, v=None):
        if v is None:
            return reference.sgmv(y, x, pa, pb, ref_a[0], ref_b[0], sc, ip, ref_tn, map_a=ref_a[1], map_b=ref_b[1])
        return reference.sgmv_expand(y, v, pb, ref_b[0], sc, ip, ref_tn, map_b=ref_b[1])

    def path(op, want_fast, want=None):
        got = E.last_sgmv_path()
        assert got.startswith("fast") == want_fast and (want is None or got == want), f"{what}: {op} took {got!r}"

    y = _clone_view(y0)
    E.sgmv(y, x, pa, pb, ia, ib, sc, ip, tn, ma, mb)
    path("sgmv", expect_fast, fused_path)
    yr = ref_sgmv(_clone_view(y0))
    close(y, yr, f"{what} sgmv")
    untouched = (yr == y0).all(1)
    assert torch.equal(y[untouched], y0[untouched]), f"{what}: sgmv touched rows outside segments"
    v = E.sgmv_shrink(x, pa, ia, ip, tn, map_a=ma)
    path("shrink", expect_fast)
    close(v, reference.sgmv_shrink(x, pa, ref_a[0], ip, ref_tn, map_a=ref_a[1]), f"{what} shrink")
    vv = torch.randn(x.shape[0], ib.shape[1], generator=torch.Generator().manual_seed(1),
                     dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    y = _clone_view(y0)
    E.sgmv_expand(y, vv, pb, ib, sc, ip, tn, map_b=mb)
    path("expand", expect_fast)
    close(y, ref_sgmv(_clone_view(y0), vv), f"{what} expand")
    return yr


MAP_SHAPES = {
    # name: N, h, l_a, o, l_b, r, U, T, S
    "decode": (48, 256, 4, 256, 4, 16, 5, 24, 40),
    "prefill": (150, 384, 2, 128, 1, 24, 2, 3, 4),  # the tensor-core prefill kernel
    "one_table": (40, 128, 1, 96, 1, 8, 1, 6, 12),  # every tenant on one table
    "segs300": (300, 64, 2, 32, 1, 5, 3, 9, 280),   # the fast path's segment pre-pass
    "odd": (37, 45, 3, 70, 2, 7, 3, 8, 9),          # shard lengths 15 and 35: generic kernels
}

MAP_CASES = [
    # shape, dtype, aligned rows, (pool_a, pool_b) fp32 or activation dtype, fused path (None: generic)
    ("decode", torch.bfloat16, True, (torch.float32, None), "fast"),
    ("decode", torch.float16, True, (None, torch.float32), "fast"),
    ("decode", torch.bfloat16, False, (None, None), None),
    ("prefill", torch.bfloat16, True, (torch.float32, None), "fast (tensor-core prefill)"),
    ("prefill", torch.float16, True, (None, torch.float32), "fast (tensor-core prefill)"),
    ("one_table", torch.float16, True, (None, None), "fast"),
    ("segs300", torch.bfloat16, True, (None, None), "fast"),
    ("odd", torch.bfloat16, True, (None, torch.float32), None),
    ("odd", torch.float32, True, (None, None), None),
    ("odd", torch.float64, False, (None, None), None),
    ("decode", torch.float32, True, (None, None), None),
]


@pytest.mark.parametrize("shape,dtype,aligned,pools,fused", MAP_CASES,
                         ids=[f"{c[0]}-{str(c[1])[6:]}-{'al' if c[2] else 'off'}-{i}" for i, c in enumerate(MAP_CASES)])
def test_shared_tables(E, shape, dtype, aligned, pools, fused):
    """map_a / map_b: U tables shared by T > U tenants, each with its own row base,
    -1 padded rank rows, empty and -1 segments, on each kernel path, against the
    reference; the maps matter (the same tables without them give another result)."""
    N, h, l_a, o, l_b, r, U, T, S = MAP_SHAPES[shape]
    p = map_problem(N=N, h=h, l_a=l_a, o=o, l_b=l_b, r=r, U=U, T=T, S=S, dtype=dtype, pa=pools[0], pb=pools[1],
                    aligned=aligned, seed=N + T + (dtype == torch.float16))
    yr = run_maps(E, p, fused is not None, f"{shape} {dtype} aligned={aligned}", fused_path=fused)
    # the reference's maps are map_tables' tables: same result without maps
    ref2 = reference.sgmv(_clone_view(p["y"]), p["x"], p["pool_a"], p["pool_b"],
                          map_tables(p["idx_a"], p["map_a"], p["pool_a"].shape[0]),
                          map_tables(p["idx_b"], p["map_b"], p["pool_b"].shape[0]), p["scale"], p["ip"], p["tn"])
    assert torch.equal(yr, ref2)
    if shape == "decode" and dtype == torch.bfloat16 and aligned:
        # the same tables read as per-tenant tables at base 0 (first U tenants): another result
        tn = torch.where(p["tn"] < U, p["tn"], -1)
        y = _clone_view(p["y"])
        E.sgmv(y, p["x"], p["pool_a"], p["pool_b"], p["idx_a"], p["idx_b"], p["scale"][:U], p["ip"], tn)
        assert not torch.equal(y, yr)


def _guarded(t, before, after, fill):
    """A copy of ``t`` (rows) inside a larger contiguous buffer whose ``before`` rows in
    front and ``after`` behind hold ``fill``: a read past either end picks those up."""
    buf = torch.full((before + t.shape[0] + after,) + tuple(t.shape[1:]), fill, dtype=t.dtype)
    out = buf[before:before + t.shape[0]]
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype,aligned,N,tenants,fused", [
    (torch.bfloat16, True, 60, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1, 11], "fast"),
    (torch.float16, True, 300, [7, 3, 2, 11], "fast (tensor-core prefill)"),
    (torch.float32, True, 60, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1, 11], None),
    (torch.bfloat16, False, 60, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, -1], None),
])
def test_shared_tables_checks_off_garbage(E, dtype, aligned, N, tenants, fused):
    """Index checks off, bad maps: a table outside [0, U), a row base outside [0, P] (or P
    itself), and bases that put some of a table's entries at or past the pool's end. Bad rows
    leave their tenant nothing, entries past the end are skipped one by one, tenants >= T
    skip their segments, and nothing outside the pools, tables or maps is read: they sit in
    guard bands (NaN pool rows, tables and map rows naming row 0) that would show in y."""
    h, l_a, o, l_b, r, U, T, S = 64, 2, 48, 3, 8, 3, 10, len(tenants)
    p = map_problem(N=N, h=h, l_a=l_a, o=o, l_b=l_b, r=r, U=U, T=T, S=S, dtype=dtype, pa=None,
                    pb=torch.float32, aligned=aligned, seed=N + S)
    p["ip"] = torch.arange(0, N + 1, N // S, dtype=torch.int32)[: S + 1]  # every segment has tokens
    p["tn"] = torch.tensor(tenants, dtype=torch.int32)  # 11: a tenant past the map
    P_a, P_b, Q_a, Q_b = p["pool_a"].shape[0], p["pool_b"].shape[0], r * l_a, r * l_b
    ma, mb = p["map_a"], p["map_b"]
    ma[2, 0], mb[3, 0] = -1, U          # no such table
    ma[4, 0], mb[5, 0] = U + 7, -3
    ma[5, 1], mb[2, 1] = -2, P_b + 1    # base outside [0, P]
    ma[6, 1], mb[6, 1] = P_a, P_b       # base P: nothing left
    ma[7, 0], mb[7, 0] = 0, 0         # part of table 0 past the end
    ma[7, 1], mb[7, 1] = P_a - Q_a // 2, P_b - Q_b // 3
    ma[8, 1], mb[4, 1] = P_a + 100, -(1 << 30)
    gen = torch.Generator().manual_seed(7)
    for k, Q in (("idx_a", Q_a), ("idx_b", Q_b)):  # entries past their block, and negative ones
        m = torch.rand(p[k].shape, generator=gen) < 0.2
        p[k][m] = torch.randint(-4, 2 * Q, (int(m.sum()),), generator=gen, dtype=torch.int32)
        p[k][0, 0, :2] = torch.tensor([Q - 1, 0])  # tenant 7: one entry past the end, one used
    # guard bands: pools between NaN rows, tables and maps between entries that name row 0
    gp = max(2 * Q_a, 2 * Q_b) + 8
    p["pool_a"], p["pool_b"] = (_guarded(p[k], gp, gp, float("nan")) for k in ("pool_a", "pool_b"))
    p["idx_a"], p["idx_b"] = (_guarded(p[k], 8, 8, 0) for k in ("idx_a", "idx_b"))
    p["map_a"], p["map_b"] = (_guarded(m, 4, 4, 0) for m in (ma, mb))
    prev = mos_ext.set_index_checks(False)
    E.set_index_checks(False)
    try:
        run_maps(E, p, fused is not None, f"garbage maps {dtype} aligned={aligned}", fused_path=fused,
                 oracle_maps=False)
    finally:
        mos_ext.set_index_checks(prev)
        E.set_index_checks(True)
    tabs = map_tables(p["idx_a"], p["map_a"], P_a)
    assert not tabs[[2, 4, 5, 6, 8]].ge(0).any() and tabs[7, 0].tolist() == [-1, P_a - Q_a // 2]


def test_shared_tables_checked(E):
    """With checks on, the CUDA ops reject a bad map row and a lone map (sgmv needs both)."""
    p = map_problem(N=20, h=64, l_a=2, o=32, l_b=1, r=4, U=2, T=4, S=3, dtype=torch.bfloat16, pa=None, pb=None,
                    aligned=True, seed=3)
    args = (p["pool_a"], p["pool_b"], p["idx_a"], p["idx_b"], p["scale"], p["ip"], p["tn"])
    with pytest.raises(ValueError, match="map_b"):
        E.sgmv(p["y"].clone(), p["x"], *args, p["map_a"], None)
    bad = p["map_a"].clone()
    bad[1, 0] = 2
    with pytest.raises(IndexError, match="map_a"):
        E.sgmv_shrink(p["x"], p["pool_a"], p["idx_a"], p["ip"], p["tn"], map_a=bad)
    bad = p["map_b"].clone()
    bad[3, 1] = p["pool_b"].shape[0]  # base P with a table that names rows
    with pytest.raises(IndexError, match="map_b"):
        E.sgmv(p["y"].clone(), p["x"], *args, p["map_a"], bad)


# ----------------------------------------------------------------------------
# shard_grad: the tensor-core kernel (bf16 / fp16, both modes; deterministic mode
# in chunks of items) and its fallbacks


def _grad_problem(N, h, l, r, T, S, dtype, aligned, seed):
    p = problem(N=N, h=h, l_a=l, o=8, l_b=1, r=r, T=T, S=S, dtype=dtype, pa=None, pb=None, aligned=aligned,
                seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(N, r, generator=gen) * 3
    g0 = torch.randn(p["pool_a"].shape, generator=gen)
    return p, u, g0


def _wide_range(x):
    """Spread x over the activation dtype's exponent range in place: some columns scaled
    towards its smallest values (fp16: partly subnormal), some towards its largest."""
    tiny, big = (2.0 ** -18, 2.0 ** 12) if x.dtype == torch.float16 else (2.0 ** -100, 2.0 ** 100)
    x[:, 0::7] *= tiny
    x[:, 3::11] *= big


def _grad_bound(p, u, g0):
    """Documented error bound of the tensor-core path (shard_grad_tc.cuh), elementwise:
    per product 2^-16 relative for bf16 x (u split into bf16 hi + lo) and 2^-15 for fp16
    x (x split exactly into bf16 hi + lo too, u_lo x_lo dropped), plus fp32 summation
    (a generous 2^-20 relative)."""
    rel = 2.0 ** -15 if p["x"].dtype == torch.float16 else 2.0 ** -16
    absref = shard_grad_magnitude(g0, u, p["x"], p["idx_a"], p["scale"], p["ip"], p["tn"], with_grad0=False)
    return absref * (rel + 2.0 ** -20) + 1e-6 * g0.abs().double()


def _check_grad(g, p, u, g0):
    ref = reference.shard_grad(g0.double(), u.double(), p["x"].double(), p["idx_a"], p["scale"], p["ip"], p["tn"])
    err = (g.double() - ref).abs()
    bound = _grad_bound(p, u, g0)
    assert (err <= bound).all(), f"max err {err.max().item()} exceeds the stated bound at {int((err > bound).sum())} elements"
    untouched = (ref == g0.double()).all(1)
    assert torch.equal(g[untouched], g0[untouched])


def _run_grad(E, p, u, g0, det):
    g = g0.clone()
    E.shard_grad(g, u, p["x"], p["idx_a"], p["scale"], p["ip"], p["tn"], det)
    return g, E.last_sgmv_path()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("det", [False, True])
@pytest.mark.parametrize("N,h,l,r,T,S", [(200, 256, 4, 16, 5, 7), (150, 96, 1, 20, 3, 2), (700, 64, 2, 5, 9, 400)])
def test_shard_grad_tensor_core(E, N, h, l, r, T, S, det, dtype):
    p, u, g0 = _grad_problem(N, h, l, r, T, S, dtype, True, seed=N + S)
    _wide_range(p["x"])
    g, path = _run_grad(E, p, u, g0, det)
    assert path == ("fast (deterministic two-pass)" if det else "fast"), path
    if det:  # the fixed-order reduction: bitwise the same on a rerun
        assert torch.equal(g, _run_grad(E, p, u, g0, det)[0])
    _check_grad(g, p, u, g0)


def test_shard_grad_fp16_split_is_exact(E):
    """fp16 x enters exactly (bf16 hi + lo), so with u exact in bf16 (u_lo = 0) every
    product is exact and only fp32 summation is left (at most ~63 * 2^-24 < 2^-18 relative
    within an item, far inside the 2^-15 bound). Dropping x_lo would fail this: it carries
    up to 2^-9 of x."""
    p, u, g0 = _grad_problem(130, 128, 2, 8, 3, 3, torch.float16, True, seed=21)
    _wide_range(p["x"])
    u = u.bfloat16().float()  # exact in bf16
    p["scale"] = torch.ones_like(p["scale"])
    g, path = _run_grad(E, p, u, g0, False)
    assert path == "fast", path
    ref = reference.shard_grad(g0.double(), u.double(), p["x"].double(), p["idx_a"], p["scale"], p["ip"], p["tn"])
    absref = shard_grad_magnitude(g0, u, p["x"], p["idx_a"], p["scale"], p["ip"], p["tn"], with_grad0=False)
    err = (g.double() - ref).abs()
    assert (err <= absref * 2.0 ** -18 + 1e-6 * g0.abs().double()).all(), err.max().item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cap_items", [0, 3])
@pytest.mark.parametrize("N,h,l,r,T,S", [(200, 256, 4, 16, 5, 7), (700, 64, 2, 5, 9, 400)])
def test_shard_grad_deterministic_chunks(E, monkeypatch, N, h, l, r, T, S, cap_items, dtype):
    """MOS_EXT_DET_PART_BYTES below the partials of all items: the two passes run over
    chunks of items (cap_items items per chunk; 0: a cap under one item's partials, so one
    item per chunk). Still within the bound and bitwise reproducible."""
    p, u, g0 = _grad_problem(N, h, l, r, T, S, dtype, True, seed=N + S + 1)
    per_item = r * h * 4
    monkeypatch.setenv("MOS_EXT_DET_PART_BYTES", str(cap_items * per_item if cap_items else per_item - 1))
    g, path = _run_grad(E, p, u, g0, True)
    assert path == "fast (deterministic two-pass in item chunks)", path
    assert torch.equal(g, _run_grad(E, p, u, g0, True)[0])
    _check_grad(g, p, u, g0)
    monkeypatch.setenv("MOS_EXT_DET_PART_BYTES", str(1 << 40))  # everything in one chunk
    assert _run_grad(E, p, u, g0, True)[1] == "fast (deterministic two-pass)"
    for bad in ("0", "-5", "12k", "abc"):
        monkeypatch.setenv("MOS_EXT_DET_PART_BYTES", bad)
        with pytest.raises(ValueError, match="MOS_EXT_DET_PART_BYTES"):
            _run_grad(E, p, u, g0, True)


def test_shard_grad_fallbacks(E):
    # fp32 activations and offset rows take the generic kernels (both modes);
    # fp16 takes the tensor cores
    for dtype, aligned, det, why in [(torch.float32, True, False, "activations are not fp16/bf16"),
                                     (torch.float32, True, True, "activations are not fp16/bf16"),
                                     (torch.bfloat16, False, False, "activation rows are not 16-byte aligned"),
                                     (torch.float16, False, True, "activation rows are not 16-byte aligned"),
                                     (torch.float16, True, False, "fast"),
                                     (torch.float16, True, True, "fast (deterministic two-pass)")]:
        p, u, g0 = _grad_problem(60, 64, 2, 8, 3, 4, dtype, aligned, seed=4)
        g, path = _run_grad(E, p, u, g0, det)
        assert path.startswith(why), (dtype, aligned, det, path)
        _check_grad(g, p, u, g0)  # the generic kernels are fp32-exact per product: well inside
    # shard length not a multiple of 8
    p, u, g0 = _grad_problem(60, 36, 3, 8, 3, 4, torch.float16, True, seed=5)
    assert _run_grad(E, p, u, g0, True)[1] == "shard length is not a multiple of 8"
    os.environ["MOS_EXT_CUDA_PATH"] = "generic"
    p, u, g0 = _grad_problem(60, 64, 2, 8, 3, 4, torch.float16, True, seed=6)
    assert _run_grad(E, p, u, g0, False)[1] == "MOS_EXT_CUDA_PATH=generic"


# ----------------------------------------------------------------------------
# The tensor-core prefill kernel: chosen for bf16 with long segments; its error
# against an fp64 reference stays within the bound stated in sgmv_prefill.cuh
# (v and fp32 pools carried as bf16 hi + lo) plus the one bf16 rounding of y.


def _half_ulp(a, dtype):
    """Half an ulp of ``a`` in ``dtype`` (the rounding of y), subnormals included."""
    mant, emin = (8, -126) if dtype == torch.bfloat16 else (11, -14)
    e = torch.floor(torch.log2(a.abs().clamp(min=2.0 ** emin)))
    return 2.0 ** (e - mant)


# e_A / 2^-16 of the stated bound per (activation, pool_a): the A-side split error
_E_A = {(torch.bfloat16, None): 0, (torch.bfloat16, torch.float32): 1,
        (torch.float16, None): 1, (torch.float16, torch.float32): 2}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pools", [(None, None), ("f32", "f32"), ("f32", None), (None, "f32")])
@pytest.mark.parametrize("N,h,l_a,o,l_b,r,T,S", [(200, 256, 4, 192, 3, 16, 3, 3), (130, 96, 1, 72, 1, 40, 2, 1),
                                                  (640, 64, 2, 64, 1, 64, 3, 2)])
def test_prefill_tensor_core_error_bound(E, dtype, pools, N, h, l_a, o, l_b, r, T, S):
    """The error bound stated in sgmv_prefill.cuh: (3 + e_A) 2^-16 times the sum of
    |x||A||B| products (plus one 2^-16 for fp32 accumulation), before the one
    rounding of y. Chunks of h and tiles of o that end past the data (h = 96, o = 72),
    rank 40 (padded to 48) and 64, 640 tokens (10 items per segment)."""
    if dtype == torch.float16 and pools == (None, "f32") and N != 200:
        pytest.skip("one fp16 case per mixed-pool combination is enough")
    pa, pb = (torch.float32 if k else None for k in pools)
    p = problem(N=N, h=h, l_a=l_a, o=o, l_b=l_b, r=r, T=T, S=S, dtype=dtype, pa=pa, pb=pb, aligned=True,
                seed=N + r)
    x, y0 = p["x"], p["y"]
    args = (p["pool_a"], p["pool_b"], p["idx_a"], p["idx_b"], p["scale"], p["ip"], p["tn"])
    y = _clone_view(y0)
    E.sgmv(y, x, *args)
    assert E.last_sgmv_path() == "fast (tensor-core prefill)", E.last_sgmv_path()
    exact = reference.sgmv(y0.double(), x.double(), p["pool_a"].double(), p["pool_b"].double(), *args[2:])
    # |terms|: the same products with absolute values
    a_abs = (p["pool_a"].double().abs(), p["pool_b"].double().abs())
    terms = reference.sgmv(torch.zeros_like(exact), x.double().abs(), a_abs[0], a_abs[1], *args[2:])
    units = 3 + _E_A[(dtype, pa)] + 1
    bound = _half_ulp(exact, dtype) * 1.001 + units * 2.0 ** -16 * terms + 1e-30
    err = (y.double() - exact).abs()
    assert (err <= bound).all(), f"max err {err.max().item()}, {int((err > bound).sum())} elements over the bound"
    untouched = (exact == y0.double()).all(1)
    assert torch.equal(y[untouched], y0[untouched])
    if N != 200:
        return
    # On y = 0 (the delta alone, where the output rounding is small) the bound is
    # tight enough to notice a split that was dropped: rounding fp32 A or B to
    # bf16 first lands outside it (fp16's 11 bits are too close to tell).
    z = _clone_view(torch.zeros_like(y0))
    E.sgmv(z, x, *args)
    delta = reference.sgmv(torch.zeros_like(exact), x.double(), p["pool_a"].double(), p["pool_b"].double(), *args[2:])
    bound0 = _half_ulp(delta, dtype) * 1.001 + units * 2.0 ** -16 * terms + 1e-30
    assert ((z.double() - delta).abs() <= bound0).all()
    if dtype == torch.bfloat16 and (pa is not None or pb is not None):
        coarse = reference.sgmv(torch.zeros_like(exact), x.double(), p["pool_a"].to(dtype).double(),
                                p["pool_b"].to(dtype).double(), *args[2:])
        assert ((coarse - delta).abs() > bound0).any(), "the bound cannot tell a dropped fp32 split"


def test_emulator_checks(E):
    """The emulator's own checks fire: a misaligned 16-byte load, a barrier that
    some threads skip and copies left in flight fail the launch; warp shuffles
    reduce correctly; cp.async data appears only after its wait."""
    assert E.selftest("misaligned") == "cudaErrorMisalignedAddress"
    assert E.selftest("divergent_barrier") == "cudaErrorLaunchFailure"
    assert E.selftest("warp_sum") == "ok"
    # cp.async: data lands only at the wait that retires its group; a block that
    # ends with copies in flight fails the launch
    assert E.selftest("cp_async") == "ok"
    assert E.selftest("cp_async_no_wait") == "cudaErrorMisalignedAddress"
