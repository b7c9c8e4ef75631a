import os
import sys, random, itertools
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, mos_ext
import build
E = build.emu

def segs(N, S, T, gen, bogus=False):
    cuts = sorted(torch.randint(0, N + 1, (max(S - 1, 0),), generator=gen).tolist())
    ptr = [0] + cuts + [N] if S > 0 else [0]
    if S > 0 and torch.rand(1, generator=gen).item() < 0.5:
        ptr[-1] = int(torch.randint(0, N + 1, (1,), generator=gen))  # leave tail uncovered
        ptr = [min(p, ptr[-1]) for p in ptr]
    ten = torch.randint(-1, T, (S,), generator=gen).tolist()
    if bogus:
        ptr = [int(v) for v in torch.randint(-5, N + 8, (S + 1,), generator=gen)]
        ten = [int(v) for v in torch.randint(-3, T + 3, (S,), generator=gen)]
    return torch.tensor(ptr, dtype=torch.int32), torch.tensor(ten, dtype=torch.int32)

def table(T, r, l, P, gen, bogus=False):
    idx = torch.randint(0, max(P, 1), (T, r, l), generator=gen, dtype=torch.int32)
    for t in range(T):
        k = int(torch.randint(1, r + 1, (1,), generator=gen))
        idx[t, k:] = -1
    if bogus:
        m = torch.rand(idx.shape, generator=gen) < 0.2
        idx[m] = torch.randint(-4, P + 4, (int(m.sum()),), generator=gen, dtype=torch.int32)
    return idx

def strided(N, w, dtype, gen):
    base = torch.randn(N, w + 3, generator=gen, dtype=torch.float64).to(dtype)
    return base[:, 1:w + 1]

TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
def close(a, b, dt, what):
    a, b = a.double(), b.double()
    err = ((a - b).abs() / (1 + b.abs())).max().item() if a.numel() else 0.0
    assert err <= TOL[dt], f"{what}: err {err}"

def shared(idx, P, T, gen, bogus=False):
    """Shared-table form of idx [U, r, l] (entries in [0, P)): (tables with entries relative
    to a block of Q = ceil(P / 2) rows, map [T, 2] = (table, base) with base + entry < P);
    bogus: some rows name no table, a base outside [0, P], or one that puts entries past P."""
    U = idx.shape[0]
    Q = (P + 1) // 2
    tabs = torch.where(idx >= 0, idx % Q, idx).to(torch.int32)
    u = torch.randint(0, U, (T,), generator=gen)
    base = torch.randint(0, P - Q + 1, (T,), generator=gen)
    m = torch.stack([u, base], 1).to(torch.int32)
    if bogus:
        k = torch.rand(T, generator=gen) < 0.4
        m[k, 0] = torch.randint(-2, U + 3, (int(k.sum()),), generator=gen, dtype=torch.int32)
        k = torch.rand(T, generator=gen) < 0.4
        m[k, 1] = torch.randint(-3, P + 3, (int(k.sum()),), generator=gen, dtype=torch.int32)
    return tabs, m.contiguous()

def run(seed, dt, pdt, N, h_l, o_l, r, T, S, bogus, maps=False):
    gen = torch.Generator().manual_seed(seed)
    (l_a, s_a), (l_b, s_b) = h_l, o_l
    h, o = l_a * s_a, l_b * s_b
    P_a = int(torch.randint(1, 2 * T * r * l_a + 2, (1,), generator=gen)); P_b = int(torch.randint(1, 2 * T * r * l_b + 2, (1,), generator=gen))
    x = strided(N, h, dt, gen)
    y0 = strided(N, o, dt, gen)
    pa = (torch.randn(P_a, s_a, generator=gen, dtype=torch.float64) / h ** .5).to(pdt[0] or dt)
    pb = (torch.randn(P_b, s_b, generator=gen, dtype=torch.float64) / r ** .5).to(pdt[1] or dt)
    ia, ib = table(T, r, l_a, P_a, gen, bogus), table(T, r, l_b, P_b, gen, bogus)
    sc = (torch.rand(T, generator=gen) + 0.5).float()
    ip, tn = segs(N, S, T, gen, bogus)
    if maps:  # T tenants on U = T tables (some shared, some unused), each with a row base
        (ia, ma), (ib, mb) = shared(ia, P_a, T, gen, bogus), shared(ib, P_b, T, gen, bogus)
        mb[:, 0] = ma[:, 0]
        kw_a, kw_b = dict(map_a=ma), dict(map_b=mb)
    else:
        kw_a, kw_b = {}, {}
    mos_ext.set_index_checks(not bogus); E.set_index_checks(not bogus)
    # shrink
    v_cpu = torch.ops.mos.sgmv_shrink(x, pa, ia, ip, tn, **kw_a)
    v_emu = E.sgmv_shrink(x, pa, ia, ip, tn, **kw_a)
    close(v_emu, v_cpu, dt, "shrink")
    # expand
    vv = v_cpu.clone()
    ye, yc = y0.clone(), y0.clone()
    E.sgmv_expand(ye, vv, pb, ib, sc, ip, tn, **kw_b); torch.ops.mos.sgmv_expand(yc, vv, pb, ib, sc, ip, tn, **kw_b)
    close(ye, yc, dt, "expand")
    untouched = (yc == y0).all(1) & (ye == y0).all(1)
    # fused
    if ia.shape[:2] == ib.shape[:2]:
        ye, yc = y0.clone(), y0.clone()
        E.sgmv(ye, x, pa, pb, ia, ib, sc, ip, tn, **kw_a, **kw_b)
        torch.ops.mos.sgmv(yc, x, pa, pb, ia, ib, sc, ip, tn, **kw_a, **kw_b)
        close(ye, yc, dt, "sgmv")
        same_rows = (yc == y0).all(1)
        assert torch.equal(ye[same_rows], y0[same_rows]), "sgmv touched rows outside segments"
    if maps:  # gather and shard_grad take per-tenant tables only
        mos_ext.set_index_checks(True); E.set_index_checks(True)
        return
    # gather
    close(E.gather_shards(pa, ia), torch.ops.mos.gather_shards(pa, ia), dt, "gather")
    # shard_grad
    acc = torch.float64 if dt == torch.float64 else torch.float32
    u = torch.randn(N, r, generator=gen, dtype=acc)
    g0 = torch.randn(P_a, s_a, generator=gen, dtype=acc)
    gc = g0.clone(); torch.ops.mos.shard_grad(gc, u, x, ia, sc, ip, tn, False)
    for det in (False, True):
        ge = g0.clone(); E.shard_grad(ge, u, x, ia, sc, ip, tn, det)
        close(ge, gc, acc, f"shard_grad det={det}")
        rows_same = (gc == g0).all(1)
        assert torch.equal(ge[rows_same], g0[rows_same]), f"shard_grad det={det} touched other rows"
    mos_ext.set_index_checks(True); E.set_index_checks(True)

cases = 0
import time
t0 = time.time()
for seed in range(int(sys.argv[1]) if len(sys.argv) > 1 else 20):
    rnd = random.Random(seed)
    dt = rnd.choice([torch.float32, torch.float64, torch.float16, torch.bfloat16])
    pdt = (rnd.choice([None, torch.float32]), rnd.choice([None, torch.float32]))
    N = rnd.choice([0, 1, 3, 17, 40, 70])
    h_l = rnd.choice([(1, 33), (4, 16), (2, 130), (3, 5), (1, 1)])
    o_l = rnd.choice([(1, 29), (2, 70), (4, 8), (1, 130)])
    r = rnd.choice([1, 3, 16, 20, 70])
    T = rnd.choice([1, 2, 5])
    S = rnd.choice([0, 1, 3, 7])
    bogus = rnd.random() < 0.3
    maps = rnd.random() < 0.4  # shared tables (map_a / map_b)
    print(seed, dt, pdt, N, h_l, o_l, r, T, S, bogus, maps, flush=True)
    run(seed, dt, pdt, N, h_l, o_l, r, T, S, bogus, maps)
    cases += 1
print("ok", cases, time.time() - t0)
