"""The CUDA kernels (csrc/cuda/) against the CPU kernels, on the same inputs.

Every op runs on CUDA copies of a random problem and on the CPU originals (the
CPU kernels are checked against ``mos_ext.reference`` in the other test files);
the outputs must agree to a per-dtype tolerance (both accumulate in fp32, fp64
for fp64, in different orders, and round once). Outputs are poisoned with random
values first and rows outside every valid segment must come back bitwise
unchanged. Also: deterministic ``shard_grad`` is bitwise reproducible, a
CUDA-graph capture of ``sgmv`` replays bitwise like eager, ``sharded_lora``
compiles with ``fullgraph=True`` (forward and backward), invalid indices raise
with checks on and are skipped exactly like on the CPU with checks off. Shared
tables (``map_a`` / ``map_b``) are checked against ``mos_ext.reference`` on both
paths, bad maps with checks off inside guard bands, and under graph replay.

Needs a CUDA device and a CUDA build of the extension; elsewhere the whole
module is skipped.
"""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

import mos_ext
from mos_ext import ops
from problems import capture_graph, mixed_rank_table, random_segments


def _cuda_ready() -> bool:
    return torch.cuda.is_available() and mos_ext.cuda_built()


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not _cuda_ready(),
        reason="needs a CUDA device and mos_ext built with its CUDA kernels "
        f"(torch.cuda.is_available()={torch.cuda.is_available()}, mos_ext.cuda_built()={mos_ext.cuda_built()})",
    ),
]

DEV = torch.device("cuda")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# CUDA vs CPU, per output dtype: |cuda - cpu| <= tol * max(1, max|cpu|) + tol * |cpu|.
# fp16/bf16 outputs may differ by one unit in the last place (each side rounds
# its own fp32 sum once); fp32 / fp64 only by summation order.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 3e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def assert_close(out, ref, what=""):
    """``out`` (any device) against the CPU result ``ref``, tolerance of ref's dtype."""
    assert out.dtype == ref.dtype and out.shape == ref.shape, f"{what}: {out.dtype}{tuple(out.shape)} vs {ref.dtype}{tuple(ref.shape)}"
    tol = TOL[ref.dtype]
    ref64 = ref.double()
    mag = max(1.0, ref64.abs().max().item()) if ref.numel() else 1.0
    torch.testing.assert_close(out.cpu().double(), ref64, rtol=tol, atol=tol * mag, msg=lambda m: f"{what}: {m}")


# ----------------------------------------------------------------------------
# Random problems (self-contained: segments with random lengths including empty
# ones, -1 tenants, tokens outside every segment, -1 padded rank rows, shared
# pool rows, strided activations).


@dataclasses.dataclass
class Case:
    x: torch.Tensor
    y: torch.Tensor
    pool_a: torch.Tensor
    pool_b: torch.Tensor
    idx_a: torch.Tensor
    idx_b: torch.Tensor
    scale: torch.Tensor
    seg_indptr: torch.Tensor
    seg_tenant: torch.Tensor

    def to(self, device) -> "Case":
        def mv(t):
            if t.dim() == 2 and t.stride(0) != t.shape[1]:  # keep a strided activation strided
                return _strided_like(t, device)
            return t.to(device)

        return Case(**{f.name: mv(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def valid_rows(self) -> torch.Tensor:
        """Bool [N]: tokens in a segment with a tenant in [0, T) (seg_indptr assumed valid)."""
        N, T = self.x.shape[0], self.idx_a.shape[0]
        m = torch.zeros(N, dtype=torch.bool)
        ip = self.seg_indptr.tolist()
        for g, t in enumerate(self.seg_tenant.tolist()):
            if 0 <= t < T:
                m[ip[g]:ip[g + 1]] = True
        return m


def _strided(n, w, dtype, gen):
    """[n, w] with row stride w + 3 (last-dim stride 1), random normal values."""
    return torch.randn(n, w + 3, generator=gen, dtype=torch.float64).to(dtype)[:, 2:w + 2]


def _strided_like(t, device):
    base = torch.empty(t.shape[0], t.shape[1] + 3, dtype=t.dtype, device=device)
    out = base[:, 2:t.shape[1] + 2]
    out.copy_(t)
    return out


def make_case(*, N, h, l_a, o, l_b, r, T, S, dtype, pool_a_dtype=None, pool_b_dtype=None, pool_rows=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    assert h % l_a == 0 and o % l_b == 0
    s_a, s_b = h // l_a, o // l_b
    P_a = pool_rows or max(2, min(4096, T * r * l_a // 2 + 3))
    P_b = pool_rows or max(2, min(4096, T * r * l_b // 2 + 5))
    x = _strided(N, h, dtype, gen)
    y = _strided(N, o, dtype, gen)
    pool_a = (torch.randn(P_a, s_a, generator=gen, dtype=torch.float64) / max(h, 1) ** 0.5).to(pool_a_dtype or dtype)
    pool_b = (torch.randn(P_b, s_b, generator=gen, dtype=torch.float64) / max(r, 1) ** 0.5).to(pool_b_dtype or dtype)
    idx_a = mixed_rank_table(T, r, l_a, P_a, gen)
    idx_b = mixed_rank_table(T, r, l_b, P_b, gen)
    idx_b[idx_a[:, :, :1].expand(-1, -1, l_b) < 0] = -1  # a padded rank row is padded on both sides
    scale = (torch.rand(T, generator=gen) * 1.5 + 0.5).to(torch.float32)
    seg_indptr, seg_tenant = random_segments(N, T, S, gen)
    return Case(x, y, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant)


SHAPES = {
    # name: (N, h, l_a, o, l_b, r, T, S)
    "decode1": (1, 64, 1, 64, 1, 8, 1, 1),
    "small": (37, 128, 4, 96, 2, 8, 4, 6),
    "h2049_l1": (300, 2049, 1, 40, 1, 4, 3, 7),
    "h444_l4": (120, 444, 4, 444, 4, 16, 16, 20),
    "t1024_decode": (64, 1024, 16, 512, 8, 16, 1024, 64),
    "r128": (513, 256, 2, 1024, 4, 128, 5, 9),
    "r130": (70, 96, 3, 72, 2, 130, 2, 3),
    "empty_batch": (0, 32, 2, 16, 1, 4, 2, 0),
}


def case(name, dtype, pool_a_dtype=None, pool_b_dtype=None, seed=0, **kw):
    N, h, l_a, o, l_b, r, T, S = SHAPES[name]
    return make_case(N=N, h=h, l_a=l_a, o=o, l_b=l_b, r=r, T=T, S=S, dtype=dtype, pool_a_dtype=pool_a_dtype,
                     pool_b_dtype=pool_b_dtype, seed=seed + 7 * len(name), **kw)


def _pool_dtype(kind, dtype):
    return torch.float32 if kind == "f32" else dtype


# ----------------------------------------------------------------------------
# Op by op, CUDA against CPU


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["small", "h444_l4", "t1024_decode", "empty_batch"])
def test_gather_shards(shape, dtype):
    c = case(shape, dtype)
    idx = c.idx_a.clone()
    idx[0, 0, 0] = -1
    out = ops.gather_shards(c.pool_a.to(DEV), idx.to(DEV))
    ref = ops.gather_shards(c.pool_a, idx)
    assert out.device.type == DEV.type
    assert torch.equal(out.cpu(), ref)  # a pure copy: bitwise
    # a 4-D table ([layers, T, r, l]) works too
    idx4 = torch.stack([idx, idx.flip(0)])
    assert torch.equal(ops.gather_shards(c.pool_a.to(DEV), idx4.to(DEV)).cpu(), ops.gather_shards(c.pool_a, idx4))


@pytest.mark.parametrize("pool", ["act", "f32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sgmv_shrink(shape, dtype, pool):
    c = case(shape, dtype, pool_a_dtype=_pool_dtype(pool, dtype))
    d = c.to(DEV)
    v = ops.sgmv_shrink(d.x, d.pool_a, d.idx_a, d.seg_indptr, d.seg_tenant)
    ref = ops.sgmv_shrink(c.x, c.pool_a, c.idx_a, c.seg_indptr, c.seg_tenant)
    assert_close(v, ref, f"shrink {shape} {dtype} pool={pool}")
    outside = ~c.valid_rows()
    assert (v.cpu()[outside] == 0).all(), "rows outside valid segments must be zero"


@pytest.mark.parametrize("pool", ["act", "f32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sgmv_expand(shape, dtype, pool):
    c = case(shape, dtype, pool_b_dtype=_pool_dtype(pool, dtype), seed=1)
    gen = torch.Generator().manual_seed(11)
    v = torch.randn(c.x.shape[0], c.idx_b.shape[1], generator=gen, dtype=acc_dtype(dtype))
    d = c.to(DEV)
    y0 = c.y.clone()
    ops.sgmv_expand(d.y, v.to(DEV), d.pool_b, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
    ops.sgmv_expand(c.y, v, c.pool_b, c.idx_b, c.scale, c.seg_indptr, c.seg_tenant)
    assert_close(d.y, c.y, f"expand {shape} {dtype} pool={pool}")
    outside = ~c.valid_rows()
    assert torch.equal(d.y.cpu()[outside], y0[outside]), "rows outside valid segments must be untouched"


@pytest.mark.parametrize("pools", ["act/act", "f32/f32", "f32/act", "act/f32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_sgmv(shape, dtype, pools):
    if dtype == torch.float32 and pools != "act/act":
        pytest.skip("fp32 pools are the activation dtype")
    pa, pb = pools.split("/")
    c = case(shape, dtype, pool_a_dtype=_pool_dtype(pa, dtype), pool_b_dtype=_pool_dtype(pb, dtype), seed=2)
    d = c.to(DEV)
    y0 = c.y.clone()
    ops.sgmv(d.y, d.x, d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
    ops.sgmv(c.y, c.x, c.pool_a, c.pool_b, c.idx_a, c.idx_b, c.scale, c.seg_indptr, c.seg_tenant)
    assert d.y.stride(0) != d.y.shape[1] or d.y.shape[0] <= 1  # the strided output was written in place
    assert_close(d.y, c.y, f"sgmv {shape} {dtype} pools={pools}")
    outside = ~c.valid_rows()
    assert torch.equal(d.y.cpu()[outside], y0[outside]), "rows outside valid segments must be untouched"


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shard_grad(shape, dtype, side, deterministic):
    c = case(shape, dtype, seed=3)
    gen = torch.Generator().manual_seed(12)
    acc = acc_dtype(dtype)
    # A side: u = dy @ B (rank space), activations x; B side: u = v, activations dy.
    x = c.x if side == "a" else c.y
    idx = c.idx_a if side == "a" else c.idx_b
    P, s = (c.pool_a if side == "a" else c.pool_b).shape
    u = torch.randn(x.shape[0], idx.shape[1], generator=gen, dtype=acc)
    g0 = torch.randn(P, s, generator=gen, dtype=acc)  # poisoned gradient buffer
    d = c.to(DEV)
    g_dev = g0.to(DEV, copy=True)
    ops.shard_grad(g_dev, u.to(DEV), d.x if side == "a" else d.y, idx.to(DEV), d.scale, d.seg_indptr, d.seg_tenant,
                   deterministic=deterministic)
    g_cpu = g0.clone()
    ops.shard_grad(g_cpu, u, x, idx, c.scale, c.seg_indptr, c.seg_tenant)
    assert_close(g_dev, g_cpu, f"shard_grad {shape} {dtype} side={side} det={deterministic}")
    # Rows no valid token touches keep their bits.
    untouched = (g_cpu == g0).all(1)
    if (~c.valid_rows()).all():
        assert untouched.all()
    assert torch.equal(g_dev.cpu()[untouched], g0[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
def test_shard_grad_deterministic_is_bitwise_reproducible(dtype):
    # Long segments, a small pool (rows shared by tenants and repeated inside tables).
    c = make_case(N=2000, h=512, l_a=8, o=64, l_b=1, r=16, T=3, S=4, dtype=dtype, pool_rows=24, seed=5)
    d = c.to(DEV)
    gen = torch.Generator().manual_seed(13)
    u = torch.randn(c.x.shape[0], 16, generator=gen, dtype=acc_dtype(dtype)).to(DEV)
    g0 = torch.randn(24, 64, generator=gen, dtype=acc_dtype(dtype)).to(DEV)
    outs = []
    for _ in range(3):
        g = g0.clone()
        ops.shard_grad(g, u, d.x, d.idx_a, d.scale, d.seg_indptr, d.seg_tenant, deterministic=True)
        outs.append(g)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    g_cpu = g0.cpu().clone()
    ops.shard_grad(g_cpu, u.cpu(), c.x, c.idx_a, c.scale, c.seg_indptr, c.seg_tenant)
    assert_close(outs[0], g_cpu, "deterministic shard_grad vs CPU")


def test_sgmv_large_rank_fallback():
    """Ranks beyond the fused kernel's shared-memory limit go through shrink + expand."""
    c = make_case(N=40, h=16, l_a=2, o=24, l_b=3, r=4096, T=2, S=3, dtype=torch.float64, pool_rows=64, seed=6)
    d = c.to(DEV)
    ops.sgmv(d.y, d.x, d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
    ops.sgmv(c.y, c.x, c.pool_a, c.pool_b, c.idx_a, c.idx_b, c.scale, c.seg_indptr, c.seg_tenant)
    assert_close(d.y, c.y, "sgmv r=4096 fp64")


@pytest.mark.skipif(importlib.util.find_spec("mos_ext.reference") is None, reason="mos_ext.reference not available")
@pytest.mark.parametrize("dtype", DTYPES)
def test_sgmv_against_reference(dtype):
    from mos_ext import reference as R

    c = case("h444_l4", dtype, seed=4)
    d = c.to(DEV)
    y0 = c.y.clone()
    ops.sgmv(d.y, d.x, d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
    ref = R.sgmv(y0, c.x, c.pool_a, c.pool_b, c.idx_a, c.idx_b, c.scale, c.seg_indptr, c.seg_tenant)
    assert_close(d.y, ref, f"sgmv vs reference {dtype}")
    v = ops.sgmv_shrink(d.x, d.pool_a, d.idx_a, d.seg_indptr, d.seg_tenant)
    assert_close(v, R.sgmv_shrink(c.x, c.pool_a, c.idx_a, c.seg_indptr, c.seg_tenant), f"shrink vs reference {dtype}")


# ----------------------------------------------------------------------------
# Validation and checks-off behaviour


def test_invalid_indices_raise_with_checks_on():
    c = case("small", torch.float32)
    d = c.to(DEV)
    P = c.pool_a.shape[0]
    bad = d.idx_a.clone()
    bad[1, 0, 2] = P
    with mos_ext.index_checks(True, device=True):  # per-call checks on CUDA are opt-in
        with pytest.raises(IndexError, match="idx_a"):
            ops.sgmv(d.y, d.x, d.pool_a, d.pool_b, bad, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
        with pytest.raises(IndexError, match="idx_a"):
            ops.sgmv_shrink(d.x, d.pool_a, bad, d.seg_indptr, d.seg_tenant)
        with pytest.raises(IndexError):
            ops.gather_shards(d.pool_a, bad)
        g = torch.zeros(c.pool_a.shape, device=DEV)
        u = torch.zeros(c.x.shape[0], c.idx_a.shape[1], device=DEV)
        with pytest.raises(IndexError):
            ops.shard_grad(g, u, d.x, bad, d.scale, d.seg_indptr, d.seg_tenant)
        bad_t = d.seg_tenant.clone()
        bad_t[0] = c.idx_a.shape[0]
        with pytest.raises(IndexError, match="seg_tenant"):
            ops.sgmv(d.y, d.x, d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr, bad_t)
        bad_p = d.seg_indptr.clone()
        bad_p[-1] = c.x.shape[0] + 1
        v = torch.zeros(c.x.shape[0], c.idx_b.shape[1], device=DEV)
        with pytest.raises(IndexError, match="seg_indptr"):
            ops.sgmv_expand(d.y, v, d.pool_b, d.idx_b, d.scale, bad_p, d.seg_tenant)


def test_mixed_devices_rejected():
    c = case("small", torch.float32)
    d = c.to(DEV)
    with pytest.raises(ValueError, match="same device"):
        ops.sgmv(d.y, d.x, d.pool_a, c.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checks_off_invalid_values_match_cpu(dtype):
    """With checks off, out-of-range indices / tenants are skipped and segment
    bounds clamped (non-decreasing, within [0, N]) exactly like on the CPU."""
    c = case("h444_l4", dtype, seed=8)
    gen = torch.Generator().manual_seed(14)
    P_a, P_b = c.pool_a.shape[0], c.pool_b.shape[0]
    T, N = c.idx_a.shape[0], c.x.shape[0]
    for idx, P in ((c.idx_a, P_a), (c.idx_b, P_b)):
        m = torch.rand(idx.shape, generator=gen) < 0.15
        idx[m] = torch.randint(-5, P + 5, (int(m.sum()),), generator=gen, dtype=torch.int32)
    S = c.seg_tenant.numel()
    c.seg_indptr = torch.randint(-4, N + 9, (S + 1,), generator=gen, dtype=torch.int32)  # not monotone
    c.seg_tenant = torch.randint(-3, T + 3, (S,), generator=gen, dtype=torch.int32)
    with mos_ext.index_checks(False):
        d = c.to(DEV)
        ops.sgmv(d.y, d.x, d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
        ops.sgmv(c.y, c.x, c.pool_a, c.pool_b, c.idx_a, c.idx_b, c.scale, c.seg_indptr, c.seg_tenant)
        assert_close(d.y, c.y, "sgmv, invalid values, checks off")
        v_d = ops.sgmv_shrink(d.x, d.pool_a, d.idx_a, d.seg_indptr, d.seg_tenant)
        v_c = ops.sgmv_shrink(c.x, c.pool_a, c.idx_a, c.seg_indptr, c.seg_tenant)
        assert_close(v_d, v_c, "shrink, invalid values, checks off")
        assert torch.equal(ops.gather_shards(d.pool_a, d.idx_a).cpu(), ops.gather_shards(c.pool_a, c.idx_a))
        for det in (False, True):
            g0 = torch.randn(c.pool_a.shape, generator=gen, dtype=torch.float32)
            g_d, g_c = g0.to(DEV, copy=True), g0.clone()
            ops.shard_grad(g_d, v_d, d.x, d.idx_a, d.scale, d.seg_indptr, d.seg_tenant, deterministic=det)
            ops.shard_grad(g_c, v_c, c.x, c.idx_a, c.scale, c.seg_indptr, c.seg_tenant)
            assert_close(g_d, g_c, f"shard_grad det={det}, invalid values, checks off")
    torch.cuda.synchronize()  # surfaces any illegal memory access


# ----------------------------------------------------------------------------
# CUDA graphs, torch.compile, devices


def _sgmv_graph_matches_eager(d, y0):
    """sgmv eagerly, then captured in a graph and replayed from ``y0``: bitwise equal.
    Returns the graph and its static output, for replays on new inputs."""
    y_eager = y0.clone()
    ops.sgmv(y_eager, d.x, d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
    y_static = y0.clone()
    graph = capture_graph(lambda: ops.sgmv(y_static, d.x, d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale,
                                           d.seg_indptr, d.seg_tenant))
    y_static.copy_(y0)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y_static, y_eager)
    return graph, y_static


def test_sgmv_cuda_graph_replay_matches_eager():
    c = case("h444_l4", torch.bfloat16, pool_a_dtype=torch.float32, seed=9)
    d = c.to(DEV)
    y0 = d.y.clone()
    with mos_ext.index_checks(False):
        graph, y_static = _sgmv_graph_matches_eager(d, y0)

        # New inputs of the same shapes (activations, segments, tenants): the
        # graph reads the current values (nothing was baked in at capture).
        gen = torch.Generator().manual_seed(15)
        N, T, S = c.x.shape[0], c.idx_a.shape[0], c.seg_tenant.numel()
        ip, tn = random_segments(N, T, S, gen)
        d.x.copy_(torch.randn(c.x.shape, generator=gen).to(d.x.dtype))
        d.seg_indptr.copy_(ip)
        d.seg_tenant.copy_(tn)
        y_eager = y0.clone()
        ops.sgmv(y_eager, d.x, d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
        y_static.copy_(y0)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y_static, y_eager)


def test_training_ops_cuda_graph():
    """shrink (allocates its output inside the graph's pool), expand and
    deterministic shard_grad under capture, bitwise like eager."""
    c = case("small", torch.float32, seed=10)
    d = c.to(DEV)
    g0 = torch.randn(c.pool_a.shape, generator=torch.Generator().manual_seed(16)).to(DEV)

    def step(y, g):
        v = ops.sgmv_shrink(d.x, d.pool_a, d.idx_a, d.seg_indptr, d.seg_tenant)
        ops.sgmv_expand(y, v, d.pool_b, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
        ops.shard_grad(g, v, d.x, d.idx_a, d.scale, d.seg_indptr, d.seg_tenant, deterministic=True)
        return v

    with mos_ext.index_checks(False):
        y_e, g_e = d.y.clone(), g0.clone()
        v_e = step(y_e, g_e)
        y_s, g_s = d.y.clone(), g0.clone()
        out = []
        graph = capture_graph(lambda: out.append(step(y_s, g_s)), warmup=lambda: step(y_s.clone(), g_s.clone()))
        v_s = out[-1]
        y_s.copy_(d.y)
        g_s.copy_(g0)
        graph.replay()
        torch.cuda.synchronize()
    assert torch.equal(v_s, v_e) and torch.equal(y_s, y_e) and torch.equal(g_s, g_e)


def _compile_backends():
    backends = ["aot_eager"]
    if importlib.util.find_spec("triton") is not None:
        backends.append("inductor")
    return backends


@pytest.mark.parametrize("backend", _compile_backends())
@pytest.mark.parametrize("dtype,pool_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_sharded_lora_compile_fullgraph(backend, dtype, pool_dtype):
    torch._dynamo.reset()
    c = case("small", dtype, pool_a_dtype=pool_dtype, pool_b_dtype=pool_dtype, seed=17)
    gen = torch.Generator().manual_seed(18)
    dy = torch.randn(c.y.shape, generator=gen).to(dtype)

    def run(fn, cc, dy_):
        x = cc.x.detach().clone().requires_grad_()
        pa = cc.pool_a.detach().clone().requires_grad_()
        pb = cc.pool_b.detach().clone().requires_grad_()
        out = fn(x, pa, pb, cc.idx_a, cc.idx_b, cc.scale, cc.seg_indptr, cc.seg_tenant)
        out.backward(dy_)
        return out.detach(), x.grad, pa.grad, pb.grad

    compiled = torch.compile(ops.sharded_lora, fullgraph=True, backend=backend)
    got = run(compiled, c.to(DEV), dy.to(DEV))
    want = run(ops.sharded_lora, c, dy)  # eager on the CPU
    for name, a, b in zip(("delta", "dx", "dpool_a", "dpool_b"), got, want):
        assert a.device.type == DEV.type
        assert_close(a, b, f"compiled sharded_lora ({backend}) {name}")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    """Tensors on cuda:1 while cuda:0 is current: the launcher's device guard."""
    c = case("small", torch.float16, seed=19)
    d = c.to(torch.device("cuda", 1))
    with torch.cuda.device(0):
        ops.sgmv(d.y, d.x, d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
        v = ops.sgmv_shrink(d.x, d.pool_a, d.idx_a, d.seg_indptr, d.seg_tenant)
    ops.sgmv(c.y, c.x, c.pool_a, c.pool_b, c.idx_a, c.idx_b, c.scale, c.seg_indptr, c.seg_tenant)
    assert v.device == d.x.device
    assert_close(d.y, c.y, "sgmv on cuda:1")


# ----------------------------------------------------------------------------
# The fast path (csrc/cuda/sgmv_fast.cuh) and the generic kernels, chosen by
# mos_ext.set_cuda_path. Contiguous bf16/fp16 rows with shard lengths that
# are multiples of 8 take the fast path; the strided cases above the fallback.


def _contiguous_case(N, S, T, dtype, pool_a_dtype=None, pool_b_dtype=None, seed=0):
    c = make_case(N=N, h=512, l_a=4, o=384, l_b=3, r=16, T=T, S=S, dtype=dtype, pool_a_dtype=pool_a_dtype,
                  pool_b_dtype=pool_b_dtype, seed=seed)
    c.x, c.y = c.x.contiguous(), c.y.contiguous()
    return c


@pytest.fixture
def cuda_path():
    previous = mos_ext.get_cuda_path()
    yield mos_ext.set_cuda_path
    mos_ext.set_cuda_path(previous)


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("pools", ["act", "f32"])
@pytest.mark.parametrize("N,S,T", [(64, 64, 64), (1000, 700, 9), (300, 3, 2)])
def test_fast_and_generic_paths(cuda_path, path, dtype, pools, N, S, T):
    cuda_path(path)
    pk = torch.float32 if pools == "f32" else None
    c = _contiguous_case(N, S, T, dtype, pool_a_dtype=pk, pool_b_dtype=pk, seed=N + S)
    d = c.to(DEV)
    y = d.y.clone()
    ops.sgmv(y, d.x, d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
    y_ref = c.y.clone()
    ops.sgmv(y_ref, c.x, c.pool_a, c.pool_b, c.idx_a, c.idx_b, c.scale, c.seg_indptr, c.seg_tenant)
    assert_close(y, y_ref, f"sgmv {path}")
    out = ~c.valid_rows()
    assert torch.equal(y.cpu()[out], c.y[out])
    v = ops.sgmv_shrink(d.x, d.pool_a, d.idx_a, d.seg_indptr, d.seg_tenant)
    assert_close(v, ops.sgmv_shrink(c.x, c.pool_a, c.idx_a, c.seg_indptr, c.seg_tenant), f"shrink {path}")
    vv = torch.randn(N, c.idx_b.shape[1])
    y = d.y.clone()
    ops.sgmv_expand(y, vv.to(DEV), d.pool_b, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
    y_ref = c.y.clone()
    ops.sgmv_expand(y_ref, vv, c.pool_b, c.idx_b, c.scale, c.seg_indptr, c.seg_tenant)
    assert_close(y, y_ref, f"expand {path}")


@pytest.mark.parametrize("N,S,T,dtype,pools", [(1200, 900, 30, torch.bfloat16, None),
                                               (2048, 4, 3, torch.float16, torch.float32)])
def test_fast_path_cuda_graph_many_segments(cuda_path, N, S, T, dtype, pools):
    """> 256 segments: the fast path's segment pre-pass and its workspace are captured too;
    long segments: the tensor-core prefill kernel (its > 48 KiB shared-memory opt-in is
    a host call made while capturing)."""
    cuda_path("fast")
    c = _contiguous_case(N, S, T, dtype, pool_a_dtype=pools, pool_b_dtype=pools, seed=3)
    d = c.to(DEV)
    y0 = d.y.clone()
    with mos_ext.index_checks(False):
        _sgmv_graph_matches_eager(d, y0)


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("N,S,T", [(64, 64, 64), (1000, 3, 2), (900, 400, 7)])
def test_shard_grad_paths(cuda_path, path, dtype, deterministic, N, S, T):
    """bf16 / fp16 contiguous rows take the tensor-core shard_grad (both modes) under "fast"."""
    cuda_path(path)
    c = _contiguous_case(N, S, T, dtype, seed=N + 2 * S)
    d = c.to(DEV)
    gen = torch.Generator().manual_seed(N)
    u = torch.randn(N, c.idx_a.shape[1], generator=gen)
    g0 = torch.randn(c.pool_a.shape, generator=gen)
    g = g0.to(DEV)
    ops.shard_grad(g, u.to(DEV), d.x, d.idx_a, d.scale, d.seg_indptr, d.seg_tenant, deterministic)
    g_ref = g0.clone()
    ops.shard_grad(g_ref, u, c.x, c.idx_a, c.scale, c.seg_indptr, c.seg_tenant, False)
    assert_close(g, g_ref, f"shard_grad {path} det={deterministic}")
    if deterministic:
        g2 = g0.to(DEV)
        ops.shard_grad(g2, u.to(DEV), d.x, d.idx_a, d.scale, d.seg_indptr, d.seg_tenant, True)
        assert torch.equal(g, g2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cap", ["1", "200000"])
def test_shard_grad_deterministic_chunks(cuda_path, monkeypatch, dtype, cap):
    """Deterministic tensor-core shard_grad with MOS_EXT_DET_PART_BYTES far below the
    partials of all items: the two passes run over chunks of items ("1": one item per
    chunk; "200000": a few items of r * h * 4 = 32 KiB each), in order. Agrees with the CPU
    op and is bitwise reproducible."""
    cuda_path("fast")
    monkeypatch.setenv("MOS_EXT_DET_PART_BYTES", cap)
    c = _contiguous_case(900, 40, 7, dtype, seed=17)
    d = c.to(DEV)
    gen = torch.Generator().manual_seed(5)
    u = torch.randn(900, c.idx_a.shape[1], generator=gen)
    g0 = torch.randn(c.pool_a.shape, generator=gen)
    outs = []
    for _ in range(2):
        g = g0.to(DEV)
        ops.shard_grad(g, u.to(DEV), d.x, d.idx_a, d.scale, d.seg_indptr, d.seg_tenant, True)
        outs.append(g)
    assert torch.equal(outs[0], outs[1])
    g_ref = g0.clone()
    ops.shard_grad(g_ref, u, c.x, c.idx_a, c.scale, c.seg_indptr, c.seg_tenant, False)
    assert_close(outs[0], g_ref, f"chunked deterministic shard_grad cap={cap}")


# ----------------------------------------------------------------------------
# Shared tables (map_a / map_b [T, 2]: table, row base per tenant), on both
# paths against mos_ext.reference. The problems are the emulator test's
# (tests/test_cuda_emu.py: map_problem, map_tables), so a failure here can be
# replayed on the CPU with tools/cuda_emu.


def _dev(t):
    return t.contiguous().to(DEV)


def _map_ops(p, with_maps=True):
    """sgmv / shrink / expand of problem ``p`` on the device (y, v, y_expand, the v fed to expand)."""
    d = {k: _dev(v) for k, v in p.items()}
    ma, mb = (d["map_a"], d["map_b"]) if with_maps else (None, None)
    y = d["y"].clone()
    torch.ops.mos.sgmv(y, d["x"], d["pool_a"], d["pool_b"], d["idx_a"], d["idx_b"], d["scale"], d["ip"], d["tn"],
                       map_a=ma, map_b=mb)
    v = torch.ops.mos.sgmv_shrink(d["x"], d["pool_a"], d["idx_a"], d["ip"], d["tn"], map_a=ma)
    vv = torch.randn(p["x"].shape[0], p["idx_b"].shape[1], generator=torch.Generator().manual_seed(1),
                     dtype=acc_dtype(p["x"].dtype))
    ye = d["y"].clone()
    torch.ops.mos.sgmv_expand(ye, _dev(vv), d["pool_b"], d["idx_b"], d["scale"], d["ip"], d["tn"], map_b=mb)
    torch.cuda.synchronize()
    return y.cpu(), v.cpu(), ye.cpu(), vv


def _map_reference(p, ia, ib, ma, mb, tn, vv):
    from mos_ext import reference as R

    x, y0 = p["x"].contiguous(), p["y"].contiguous()
    y = R.sgmv(y0.clone(), x, p["pool_a"], p["pool_b"], ia, ib, p["scale"], p["ip"], tn, map_a=ma, map_b=mb)
    v = R.sgmv_shrink(x, p["pool_a"], ia, p["ip"], tn, map_a=ma)
    ye = R.sgmv_expand(y0.clone(), vv, p["pool_b"], ib, p["scale"], p["ip"], tn, map_b=mb)
    return y, v, ye


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ["decode", "prefill", "one_table", "segs300", "odd"])
def test_shared_tables_against_reference(cuda_path, path, dtype, shape):
    """U tables shared by T > U tenants with their own row bases (0 and the pool's top
    block among them), -1 padded rank rows, empty and -1 segments, fp32 pools on one side,
    on each path (prefill: the tensor-core kernel for fp16 / bf16 under "fast")."""
    from test_cuda_emu import MAP_SHAPES, map_problem

    cuda_path(path)
    N, h, l_a, o, l_b, r, U, T, S = MAP_SHAPES[shape]
    half = dtype in (torch.float16, torch.bfloat16)
    p = map_problem(N=N, h=h, l_a=l_a, o=o, l_b=l_b, r=r, U=U, T=T, S=S, dtype=dtype,
                    pa=torch.float32 if half and shape != "odd" else None, pb=torch.float32 if half else None,
                    aligned=True, seed=N + T)
    y, v, ye, vv = _map_ops(p)
    yr, vr, yer = _map_reference(p, p["idx_a"], p["idx_b"], p["map_a"], p["map_b"], p["tn"], vv)
    what = f"{shape} {dtype} {path}"
    assert_close(y, yr, f"sgmv {what}")
    assert_close(v, vr, f"shrink {what}")
    assert_close(ye, yer, f"expand {what}")
    untouched = (yr == p["y"]).all(1)
    assert torch.equal(y[untouched], p["y"].contiguous()[untouched])


@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("dtype,N,tenants", [(torch.bfloat16, 60, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1, 11]),
                                             (torch.float16, 300, [7, 3, 2, 11]),
                                             (torch.float32, 60, [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11, -1])])
def test_shared_tables_checks_off_garbage(cuda_path, path, dtype, N, tenants):
    """Bad map rows with checks off (table outside [0, U), base outside [0, P] or P, half a
    table past the pool's end, tenants past the map): no read outside the pools, tables or
    maps (they sit in NaN / row-0 guard bands; an illegal access surfaces at the sync), and
    the result is the reference's on the per-tenant tables the contract gives."""
    from test_cuda_emu import map_problem, map_tables

    cuda_path(path)
    h, l_a, o, l_b, r, U, T, S = 64, 2, 48, 3, 8, 3, 10, len(tenants)
    p = map_problem(N=N, h=h, l_a=l_a, o=o, l_b=l_b, r=r, U=U, T=T, S=S, dtype=dtype, pa=None,
                    pb=torch.float32, aligned=True, seed=N + S)
    p["ip"] = torch.arange(0, N + 1, N // S, dtype=torch.int32)[: S + 1]
    p["tn"] = torch.tensor(tenants, dtype=torch.int32)
    P_a, P_b, Q_a, Q_b = p["pool_a"].shape[0], p["pool_b"].shape[0], r * l_a, r * l_b
    ma, mb = p["map_a"], p["map_b"]
    ma[2, 0], mb[3, 0], ma[4, 0], mb[5, 0] = -1, U, U + 7, -3
    ma[5, 1], mb[2, 1], ma[6, 1], mb[6, 1] = -2, P_b + 1, P_a, P_b
    ma[7, 0], mb[7, 0], ma[7, 1], mb[7, 1] = 0, 0, P_a - Q_a // 2, P_b - Q_b // 3
    ma[8, 1], mb[4, 1] = P_a + 100, -(1 << 30)
    for k, Q in (("idx_a", Q_a), ("idx_b", Q_b)):
        p[k][0, 0, :2] = torch.tensor([Q - 1, 0])
    ref_tabs = (map_tables(p["idx_a"], ma, P_a), map_tables(p["idx_b"], mb, P_b))
    ref_tn = torch.where(p["tn"] < T, p["tn"], -1)
    gp = 2 * max(Q_a, Q_b) + 8

    def guarded(t, before, fill):
        """``t`` on the device inside a buffer with ``before`` rows of ``fill`` on each side."""
        buf = torch.full((t.shape[0] + 2 * before,) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=DEV)
        out = buf[before:before + t.shape[0]]
        out.copy_(t)
        return out

    with mos_ext.index_checks(False, device=False):
        d = {k: _dev(v) for k, v in p.items()}
        for k, before, fill in (("pool_a", gp, float("nan")), ("pool_b", gp, float("nan")), ("idx_a", 8, 0),
                                ("idx_b", 8, 0), ("map_a", 4, 0), ("map_b", 4, 0)):
            d[k] = guarded(p[k], before, fill)
        y = d["y"].clone()
        torch.ops.mos.sgmv(y, d["x"], d["pool_a"], d["pool_b"], d["idx_a"], d["idx_b"], d["scale"], d["ip"], d["tn"],
                           map_a=d["map_a"], map_b=d["map_b"])
        v = torch.ops.mos.sgmv_shrink(d["x"], d["pool_a"], d["idx_a"], d["ip"], d["tn"], map_a=d["map_a"])
        vv = torch.randn(N, r, generator=torch.Generator().manual_seed(1), dtype=acc_dtype(dtype))
        ye = d["y"].clone()
        torch.ops.mos.sgmv_expand(ye, vv.to(DEV), d["pool_b"], d["idx_b"], d["scale"], d["ip"], d["tn"],
                                  map_b=d["map_b"])
        torch.cuda.synchronize()  # surfaces any illegal memory access
    yr, vr, yer = _map_reference(p, ref_tabs[0], ref_tabs[1], None, None, ref_tn, vv)
    assert_close(y.cpu(), yr, f"sgmv garbage maps {dtype} {path}")
    assert_close(v.cpu(), vr, f"shrink garbage maps {dtype} {path}")
    assert_close(ye.cpu(), yer, f"expand garbage maps {dtype} {path}")


def test_shared_tables_cuda_graph(cuda_path):
    """The maps are read on the device: a captured sgmv replays new map contents (a tenant
    moved to another table and base, as a store does in place) like eager."""
    from test_cuda_emu import MAP_SHAPES, map_problem

    cuda_path("fast")
    N, h, l_a, o, l_b, r, U, T, S = MAP_SHAPES["decode"]
    p = map_problem(N=N, h=h, l_a=l_a, o=o, l_b=l_b, r=r, U=U, T=T, S=S, dtype=torch.bfloat16, pa=None, pb=None,
                    aligned=True, seed=5)
    d = {k: _dev(v) for k, v in p.items()}
    args = lambda y: (y, d["x"], d["pool_a"], d["pool_b"], d["idx_a"], d["idx_b"], d["scale"], d["ip"], d["tn"])
    with mos_ext.index_checks(False):
        y_static = d["y"].clone()
        graph = capture_graph(lambda: torch.ops.mos.sgmv(*args(y_static), map_a=d["map_a"], map_b=d["map_b"]))
        moved_a, moved_b = p["map_a"].clone(), p["map_b"].clone()
        moved_a[:, 0], moved_b[:, 0] = moved_a.flip(0)[:, 0], moved_b.flip(0)[:, 0]
        moved_a[:, 1] = moved_a[:, 1].flip(0)
        d["map_a"].copy_(moved_a)
        d["map_b"].copy_(moved_b)
        y_static.copy_(d["y"])
        graph.replay()
        y_eager = d["y"].clone()
        torch.ops.mos.sgmv(*args(y_eager), map_a=d["map_a"], map_b=d["map_b"])
        torch.cuda.synchronize()
    assert torch.equal(y_static, y_eager)
