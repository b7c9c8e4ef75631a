"""Random multi-tenant problems for the op tests (shared by every test file).

A problem is the argument set of ``sgmv`` (plus its halves): a batch of ``N``
tokens cut into segments by a popularity pattern, ``T`` tenants with index
tables into stacked pools, random values everywhere (never zeros), fixed seeds.
"""
from __future__ import annotations

import dataclasses
import zlib

import torch

POPULARITY = ("distinct", "uniform", "zipf", "identical", "skewed", "empty", "none")

# Tolerances of an op's output against the float64 reference, per activation
# dtype: |out - ref| <= atol + rtol * |ref|. bf16/fp16 outputs are rounded
# once by both sides, so they may differ by about one unit in the last place.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=2e-5, atol=2e-5),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def split_points(n: int, parts: int, gen: torch.Generator) -> list:
    """``parts + 1`` non-decreasing cut points from 0 to n (empty parts possible)."""
    if parts <= 0:
        return [0]
    cuts = sorted(torch.randint(0, n + 1, (parts - 1,), generator=gen).tolist())
    return [0] + cuts + [n]


def make_segments(N: int, T: int, S: int, popularity: str, gen: torch.Generator):
    """seg_indptr [S+1], seg_tenant [S] (int32) for a popularity pattern.

    distinct: every segment a different tenant; uniform: tenants uniform at
    random; zipf: a few tenants take most segments; identical: one tenant for
    all; skewed: one long segment and many one-token ones; empty: many empty
    segments and tokens left outside every segment; none: a mix with ``-1``.
    """
    if popularity == "distinct":
        S = min(S, T)
        tenants = torch.randperm(T, generator=gen)[:S].tolist()
        ptr = split_points(N, S, gen)
    elif popularity == "uniform":
        tenants = torch.randint(0, T, (S,), generator=gen).tolist()
        ptr = split_points(N, S, gen)
    elif popularity == "zipf":
        w = 1.0 / torch.arange(1, T + 1, dtype=torch.float64) ** 1.2
        tenants = torch.multinomial(w, S, replacement=True, generator=gen).tolist()
        ptr = split_points(N, S, gen)
    elif popularity == "identical":
        t = int(torch.randint(0, T, (1,), generator=gen))
        tenants = [t] * S
        ptr = split_points(N, S, gen)
    elif popularity == "skewed":
        small = min(S - 1, N // 2)
        long_len = N - small
        lens = [long_len] + [1] * small
        perm = torch.randperm(len(lens), generator=gen).tolist()
        lens = [lens[k] for k in perm]
        ptr = [0]
        for n in lens:
            ptr.append(ptr[-1] + n)
        tenants = torch.randint(0, T, (len(lens),), generator=gen).tolist()
    elif popularity == "empty":
        used = int(N * 0.75)
        ptr = split_points(used, S, gen)
        # force a few zero-length segments
        for k in range(1, len(ptr) - 1, 3):
            ptr[k] = ptr[k - 1]
        ptr = sorted(ptr)
        tenants = torch.randint(0, T, (S,), generator=gen).tolist()
    elif popularity == "none":
        tenants = torch.randint(-1, T, (S,), generator=gen).tolist()
        tenants[0] = -1
        ptr = split_points(N, S, gen)
    else:
        raise ValueError(popularity)
    return torch.tensor(ptr, dtype=torch.int32), torch.tensor(tenants, dtype=torch.int32)


def make_table(T: int, r: int, l: int, P: int, gen: torch.Generator, ranks=None, tie_to=None):
    """idx [T, r, l] int32 into a pool of P rows; rows >= ranks[t] padded with -1.

    Each tenant draws distinct rows when the pool is large enough (as MoS
    tables do), else rows with repeats (as MiSS tables do).
    """
    idx = torch.empty(T, r, l, dtype=torch.int32)
    for t in range(T):
        if P >= r * l:
            idx[t] = torch.randperm(P, generator=gen)[: r * l].reshape(r, l).to(torch.int32)
        else:
            idx[t] = torch.randint(0, P, (r, l), generator=gen, dtype=torch.int32)
        if ranks is not None:
            idx[t, ranks[t]:] = -1
    return idx


def random_segments(N: int, T: int, S: int, gen: torch.Generator, full_p: float = 0.5, empty_every: int = 4):
    """seg_indptr [S+1], seg_tenant [S] (int32) for the kernel tests: random lengths, every
    ``empty_every``-th segment empty, ~20% tenants -1, and with probability 1 - ``full_p`` a
    tail of tokens outside every segment."""
    covered = N if torch.rand(1, generator=gen).item() < full_p else int(torch.randint(0, N + 1, (1,), generator=gen))
    if S == 0:
        return torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    ptr = split_points(covered, S, gen)
    for g in range(1, S, empty_every):
        ptr[g] = ptr[g - 1]
    ptr = sorted(ptr)
    ten = torch.randint(0, T, (S,), generator=gen)
    ten[torch.rand(S, generator=gen) < 0.2] = -1
    return torch.tensor(ptr, dtype=torch.int32), ten.to(torch.int32)


def mixed_rank_table(T: int, r: int, l: int, P: int, gen: torch.Generator):
    """idx [T, r, l] int32 into P rows (repeats allowed); tenant t keeps a random rank in
    [0, r] (the full rank for about half the tenants) and pads the other rows with -1."""
    idx = torch.randint(0, P, (T, r, l), generator=gen, dtype=torch.int32)
    ranks = torch.randint(0, r + 1, (T,), generator=gen)
    ranks[torch.rand(T, generator=gen) < 0.5] = r
    for t in range(T):
        idx[t, int(ranks[t]):] = -1
    return idx


@dataclasses.dataclass
class Problem:
    x: torch.Tensor
    y: torch.Tensor
    pool_a: torch.Tensor
    pool_b: torch.Tensor
    idx_a: torch.Tensor
    idx_b: torch.Tensor
    scale: torch.Tensor
    seg_indptr: torch.Tensor
    seg_tenant: torch.Tensor

    def sgmv_args(self):
        return (self.x, self.pool_a, self.pool_b, self.idx_a, self.idx_b, self.scale, self.seg_indptr, self.seg_tenant)

    def covered_rows(self) -> torch.Tensor:
        """Bool [N]: tokens in a segment with a tenant >= 0."""
        m = torch.zeros(self.x.shape[0], dtype=torch.bool)
        ip = self.seg_indptr.tolist()
        for g, t in enumerate(self.seg_tenant.tolist()):
            if t >= 0:
                m[ip[g]:ip[g + 1]] = True
        return m

    def to(self, device):
        return Problem(**{f.name: getattr(self, f.name).to(device) for f in dataclasses.fields(self)})


def make_problem(
    *,
    T: int = 4,
    N: int = 37,
    h: int = 64,
    o: int = 48,
    r: int = 8,
    l_a: int = 4,
    l_b: int = 2,
    S: int = 6,
    popularity: str = "uniform",
    dtype=torch.float32,
    pool_dtype=None,
    mixed_ranks: bool = False,
    pool_rows=None,
    seed: int = 0,
) -> Problem:
    """A random problem. ``pool_rows`` defaults to enough rows for distinct shards."""
    gen = torch.Generator().manual_seed(seed)
    assert h % l_a == 0 and o % l_b == 0
    s_a, s_b = h // l_a, o // l_b
    pool_dtype = pool_dtype or dtype
    P_a = pool_rows if pool_rows is not None else max(1, T * r * l_a // 2 + 3)
    P_b = pool_rows if pool_rows is not None else max(1, T * r * l_b // 2 + 5)
    ranks = torch.randint(1, r + 1, (T,), generator=gen).tolist() if mixed_ranks else None
    idx_a = make_table(T, r, l_a, P_a, gen, ranks)
    idx_b = make_table(T, r, l_b, P_b, gen, ranks)
    x = torch.randn(N, h, generator=gen, dtype=torch.float64)
    y = torch.randn(N, o, generator=gen, dtype=torch.float64)
    pool_a = torch.randn(P_a, s_a, generator=gen, dtype=torch.float64) / max(h, 1) ** 0.5
    pool_b = torch.randn(P_b, s_b, generator=gen, dtype=torch.float64) / max(r, 1) ** 0.5
    scale = (torch.rand(T, generator=gen) * 1.5 + 0.5).to(torch.float32)
    seg_indptr, seg_tenant = make_segments(N, T, S, popularity, gen)
    return Problem(
        x=x.to(dtype),
        y=y.to(dtype),
        pool_a=pool_a.to(pool_dtype),
        pool_b=pool_b.to(pool_dtype),
        idx_a=idx_a,
        idx_b=idx_b,
        scale=scale,
        seg_indptr=seg_indptr,
        seg_tenant=seg_tenant,
    )


@dataclasses.dataclass
class SharedProblem:
    """A problem in shared-table form (docs/OPS.md): ``U`` tables ``idx [U, r, l]`` of rows
    relative to a tenant's base, ``map [T, 2]`` = (table, row base) per tenant, plus the same
    problem with per-tenant tables of global rows (``flat``) that the map must reproduce."""
    p: Problem
    map_a: torch.Tensor
    map_b: torch.Tensor
    flat: Problem


def make_shared_problem(*, U: int = 3, T: int = 7, N: int = 41, h: int = 64, o: int = 48, r: int = 8,
                        l_a: int = 4, l_b: int = 2, S: int = 9, dtype=torch.float32, mixed_ranks: bool = True,
                        seed: int = 0) -> SharedProblem:
    """``T`` tenants share ``U`` tables (every table used, several tenants per table); each tenant's
    window of rows starts at its own base (windows of two tenants may overlap, bases differ per
    side); rank rows padded with ``-1`` in some tables; segments with empty and ``-1`` tenants."""
    from mos_ext import reference

    gen = torch.Generator().manual_seed(seed)
    s_a, s_b = h // l_a, o // l_b

    def side(l, s, scale_rows):
        win = r * l + 2  # rows of one tenant's window (tables use distinct rows inside it)
        tabs = torch.stack([torch.randperm(win, generator=gen)[: r * l].reshape(r, l) for _ in range(U)]).to(torch.int32)
        if mixed_ranks:
            for u in range(U):
                k = int(torch.randint(0, r + 1, (1,), generator=gen))
                if u % 2 == 0 and k < r:
                    tabs[u, k:] = -1
        bases = torch.randint(0, T * win // 2 + 1, (T,), generator=gen)
        P = int(bases.max()) + win + 3
        pool = torch.randn(P, s, generator=gen, dtype=torch.float64) / scale_rows
        return tabs, bases, P, pool

    which = torch.cat([torch.arange(U), torch.randint(0, U, (max(T - U, 0),), generator=gen)])[:T]
    which = which[torch.randperm(T, generator=gen)].to(torch.int32)
    tab_a, base_a, P_a, pool_a = side(l_a, s_a, max(h, 1) ** 0.5)
    tab_b, base_b, P_b, pool_b = side(l_b, s_b, max(r, 1) ** 0.5)
    map_a = torch.stack([which, base_a.to(torch.int32)], 1).contiguous()
    map_b = torch.stack([which, base_b.to(torch.int32)], 1).contiguous()
    x = torch.randn(N, h, generator=gen, dtype=torch.float64)
    y = torch.randn(N, o, generator=gen, dtype=torch.float64)
    scale = (torch.rand(T, generator=gen) * 1.5 + 0.5).to(torch.float32)
    seg_indptr, seg_tenant = random_segments(N, T, S, gen)

    def flatten(tabs, m):  # each tenant's table in global rows (the reference's reading of a map)
        return torch.stack([reference.tenant_table(tabs, m, t) for t in range(T)]).to(torch.int32)

    common = dict(x=x.to(dtype), y=y.to(dtype), pool_a=pool_a.to(dtype), pool_b=pool_b.to(dtype), scale=scale,
                  seg_indptr=seg_indptr, seg_tenant=seg_tenant)
    return SharedProblem(p=Problem(idx_a=tab_a, idx_b=tab_b, **common), map_a=map_a, map_b=map_b,
                         flat=Problem(idx_a=flatten(tab_a, map_a), idx_b=flatten(tab_b, map_b), **common))


# unit roundoff of the accumulation dtypes, for the sum-magnitude term of assert_close
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float64: 2.0 ** -53}
SUM_ULPS = 8  # allowed accumulation error, in unit roundoffs of the sum of |terms|


def stable_seed(*parts) -> int:
    """A seed from a test's parameters that is the same in every process (``hash`` of a
    string is salted per process, which made the grids draw new problems on every run)."""
    return zlib.crc32(repr(parts).encode()) % 10_000


def shard_grad_magnitude(grad0, u, x, idx, scale, seg_indptr, seg_tenant, with_grad0=True):
    """Per element of ``grad0``'s shape, the sum of the absolute values of what ``shard_grad``
    accumulates into it (and ``|grad0|`` itself unless ``with_grad0=False``), in float64: the
    scale of its rounding error."""
    from mos_ext import reference

    start = grad0.double().abs() if with_grad0 else torch.zeros_like(grad0, dtype=torch.float64)
    return reference.shard_grad(start, u.double().abs(), x.double().abs(), idx, scale.abs(), seg_indptr, seg_tenant)


def same_non_finite(out, ref, what=""):
    """Asserts ``out`` is non-finite exactly where ``ref`` is; returns the finite mask."""
    fin = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(out), fin), f"{what}: not the reference's non-finite elements"
    return fin


def assert_close(out, ref, dtype, what="", mag=None):
    """``|out - ref| <= atol + rtol |ref|`` (``TOL[dtype]``), plus ``SUM_ULPS`` unit roundoffs
    of ``mag`` where given: the sum of the absolute values of the terms accumulated into each
    element (long sums in fp32 legitimately lose more than a flat tolerance allows)."""
    tol = TOL[dtype]
    if mag is None:
        torch.testing.assert_close(out.double(), ref.double(), rtol=tol["rtol"], atol=tol["atol"],
                                   msg=lambda m: f"{what}: {m}")
        return
    assert out.shape == ref.shape == mag.shape, f"{what}: shapes {out.shape} {ref.shape} {mag.shape}"
    err = (out.double() - ref.double()).abs()
    allowed = tol["atol"] + tol["rtol"] * ref.double().abs() + SUM_ULPS * UNIT_ROUNDOFF[dtype] * mag.double()
    bad = ~(err <= allowed)  # NaN fails
    if bad.any():
        i = (err - allowed).nan_to_num(float("inf")).argmax()
        where = tuple(int(k) for k in torch.unravel_index(i, err.shape))
        raise AssertionError(f"{what}: {int(bad.sum())} of {err.numel()} elements beyond the bound; worst at "
                             f"{where}: |out - ref| = {err.flatten()[i]:.3g} > {allowed.flatten()[i]:.3g} "
                             f"(ref {ref.flatten()[i].item():.6g}, sum of |terms| {mag.flatten()[i].item():.3g})")


def capture_graph(fn, warmup=None):
    """``fn`` captured in a CUDA graph after one warm-up call (``warmup`` or ``fn``) on a
    side stream, the order ``torch.cuda.graphs`` asks for. Returns the graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        (warmup or fn)()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
