"""CUDA benchmark of the mos ops against the device's own ceilings and every baseline (issue 11).

    python benchmarks/bench_cuda.py [--json out.json] [--cases decode,prefill,punica,shard_grad]
                                    [--paths fast,generic] [--budget-s 240]
    python benchmarks/bench_cuda.py --dry-run      # CPU: builds every case small, checks it, no timing

Per run: the ceilings measured in the same process (a large device-to-device copy, a bf16
8192^3 matmul); then per case, every implementation is first checked against an fp64
reference (a case whose check fails is reported and not timed), then timed twice: with CUDA
events around back-to-back calls, and as the replay of a CUDA graph that calls it once on each
of k input sets (pools, tables, activations) whose total size is past 3x the L2 cache, so
nothing is served from L2 that a real model step would not find there.

Cases (bf16 unless noted; h = o = 4096, r = 16, MoS l = 8 shards per vector):
  decode   N in {64, 256, 1024} tokens, one tenant each (distinct);
  prefill  N in {4096, 16384} x S in {1, 64} segments (one tenant per segment), bf16; and
           fp16 at N = 4096, S = 1;
  punica   Punica's SGMV shape: 4096 -> 11008, r = 16, fp16, 64 tokens of 64 tenants;
  shard_grad  32 layers' fused pool-gradient accumulation into one fp32 pool (N in {512, 4096}).
Implementations side by side: mos (MOS_EXT_CUDA_PATH = fast and generic), mos on plain-LoRA
tables (l = 1, same kernel), and the baselines: torch.mm pair and y.addmm_(x @ A.T, B.T) on one
materialized adapter, the PEFT-style per-segment loop on materialized adapters, per-token bmm
(decode), and cuBLAS dA + index_add_ (pool gradients). Printed: time, achieved bandwidth and
its fraction of the measured copy bandwidth, TFLOP/s, ratios, and the issue's targets.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch

import mos_ext
from mos_ext import ops

PUNICA_A100_US = 45.0  # Punica's published SGMV figure on an A100 for this shape (~40-50 us)
TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def set_cuda_path(path: str) -> None:
    """The CUDA kernels read MOS_EXT_CUDA_PATH on every call (mos_ext.set_cuda_path where present)."""
    setter = getattr(mos_ext, "set_cuda_path", None) or getattr(ops, "set_cuda_path", None)
    if setter is not None:
        setter(path)
    else:
        os.environ["MOS_EXT_CUDA_PATH"] = path


# ----------------------------------------------------------------------------------------------
# timing


class Timer:
    def __init__(self, device):
        self.device = device
        self.l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20)

    def events(self, fns, target_ms=25.0):
        """Mean microseconds per call of fns[i % k]() run back to back between two CUDA events."""
        for f in fns[:3]:
            f()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for i in range(3):
            fns[i % len(fns)]()
        e.record()
        e.synchronize()
        est = max(s.elapsed_time(e) / 3, 1e-3)
        iters = int(min(500, max(5, target_ms / est)))
        s.record()
        for i in range(iters):
            fns[i % len(fns)]()
        e.record()
        e.synchronize()
        return s.elapsed_time(e) * 1e3 / iters

    def graph(self, fns, target_ms=25.0):
        """Mean microseconds per call when a CUDA graph of one call per input set is replayed."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for f in fns:
                f()
        torch.cuda.current_stream().wait_stream(side)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for f in fns:
                f()
        g.replay()
        torch.cuda.synchronize()
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        e.synchronize()
        est = max(s.elapsed_time(e), 1e-3)
        reps = int(min(200, max(3, target_ms / est)))
        s.record()
        for _ in range(reps):
            g.replay()
        e.record()
        e.synchronize()
        us = s.elapsed_time(e) * 1e3 / (reps * len(fns))
        del g
        return us


def ceilings(timer, dev):
    n = 1 << 28  # 512 MiB of bf16 each way
    a = torch.empty(n, dtype=torch.bfloat16, device=dev).normal_()
    b = torch.empty_like(a)
    us = timer.events([lambda: b.copy_(a)], target_ms=60)
    copy_gbs = 2 * a.numel() * a.element_size() / us / 1e3
    del a, b
    m = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    k = torch.randn(8192, 8192, dtype=torch.bfloat16, device=dev)
    out = torch.empty_like(m)
    us_mm = timer.events([lambda: torch.mm(m, k, out=out)], target_ms=100)
    tflops = 2 * 8192**3 / us_mm / 1e6
    del m, k, out
    torch.cuda.empty_cache()
    return {"copy_GBps": copy_gbs, "copy_us_1GiB": us, "bf16_matmul_TFLOPs": tflops, "bf16_matmul_us": us_mm}


# ----------------------------------------------------------------------------------------------
# problems


def serving_set(N, S, h, o, r, l, dtype, pool_dtype, dev, gen):
    """One input set of a serving case: S segments of N/S tokens, one distinct tenant each."""
    T = S
    P_a, P_b = T * r * l, T * r * l
    kw = dict(generator=gen, device=dev)
    rows_a = torch.randperm(P_a, **kw).reshape(T, r, l).to(torch.int32)
    rows_b = torch.randperm(P_b, **kw).reshape(T, r, l).to(torch.int32)
    pool_a = torch.randn(P_a, h // l, **kw) / math.sqrt(h)
    pool_b = torch.randn(P_b, o // l, **kw) / math.sqrt(r) * 0.1
    scale = torch.rand(T, **kw) + 0.5
    ip = torch.linspace(0, N, S + 1).round().to(torch.int32)
    tn = torch.arange(S, dtype=torch.int32)
    x = torch.randn(N, h, **kw)
    d = dict(pool_a=pool_a.to(pool_dtype), pool_b=pool_b.to(pool_dtype), idx_a=rows_a, idx_b=rows_b, scale=scale,
             ip=ip, tn=tn, x=x.to(dtype), y=torch.zeros(N, o, dtype=dtype))
    d = {k: v.to(dev) for k, v in d.items()}
    d["scale_list"] = d["scale"].tolist()  # host copy for the per-segment loop (no sync while timing)
    # materialized adapters for the baselines (dtype of the activations), and l = 1 tables
    A = d["pool_a"][d["idx_a"].long()].reshape(T, r, h).to(dtype)  # [T, r, h]
    Bt = d["pool_b"][d["idx_b"].long()].reshape(T, r, o).to(dtype)  # [T, r, o] = B^T
    d.update(A=A, B=Bt.transpose(1, 2).contiguous(), Bt=Bt.contiguous(),
             pool_a1=A.reshape(T * r, h).to(pool_dtype).contiguous(), pool_b1=Bt.reshape(T * r, o).to(pool_dtype).contiguous(),
             idx1=torch.arange(T * r, dtype=torch.int32, device=dev).reshape(T, r, 1),
             v=torch.empty(N, r, dtype=dtype, device=dev), tmp=torch.empty(N, o, dtype=dtype, device=dev))
    return d


def serving_ref(d):
    """fp64 delta of the whole batch."""
    x, A, Bt = d["x"].double(), d["A"].double(), d["Bt"].double()
    ip, tn, sc = d["ip"].tolist(), d["tn"].tolist(), d["scale"].double()
    out = torch.zeros(x.shape[0], Bt.shape[2], dtype=torch.float64, device=x.device)
    if len(tn) > 64:  # decode: all segments of one token -> batched
        tok = torch.repeat_interleave(d["tn"].long(), torch.diff(d["ip"]).long())
        n = tok.numel()
        v = torch.bmm(A[tok], x[:n, :, None])  # [n, r, 1]
        out[:n] = torch.bmm(Bt[tok].transpose(1, 2), v)[:, :, 0] * sc[tok][:, None]
        return out
    for g, t in enumerate(tn):
        s, e = ip[g], ip[g + 1]
        out[s:e] = (x[s:e] @ A[t].T) @ Bt[t] * sc[t]
    return out


def serving_impls(d, decode):
    """name -> fn(d) adding the batch's delta into d['y'] (baselines on materialized adapters)."""
    sc0 = float(d["scale"][0])
    ip, tn = d["ip"].tolist(), d["tn"].tolist()
    seg = (d["ip"], d["tn"])
    impls = {
        "mos": lambda d: ops.sgmv(d["y"], d["x"], d["pool_a"], d["pool_b"], d["idx_a"], d["idx_b"], d["scale"], *seg),
        "mos l=1": lambda d: ops.sgmv(d["y"], d["x"], d["pool_a1"], d["pool_b1"], d["idx1"], d["idx1"], d["scale"], *seg),
        "mm pair (1 adapter)": lambda d: (torch.mm(d["x"], d["A"][0].T, out=d["v"]),
                                          torch.mm(d["v"], d["Bt"][0], out=d["tmp"])),
        "addmm_ (1 adapter)": lambda d: d["y"].addmm_(torch.mm(d["x"], d["A"][0].T), d["Bt"][0], alpha=sc0),
    }
    if len(tn) <= 1024:
        def peft_loop(d):
            for g, t in enumerate(tn):
                s, e = ip[g], ip[g + 1]
                d["y"][s:e].addmm_(d["x"][s:e] @ d["A"][t].T, d["Bt"][t], alpha=d["scale_list"][t])
        impls["PEFT loop"] = peft_loop
    if decode:  # one token per tenant: the per-token weights are the per-tenant ones, in order
        def bmm(d):
            v = torch.bmm(d["A"], d["x"][:, :, None])  # [N, r, 1]
            d["y"].add_(torch.bmm(d["B"], v)[:, :, 0] * d["scale"][:, None].to(d["y"].dtype))
        impls["per-token bmm"] = bmm
    return impls


def serving_model(N, S, h, o, r, l, dtype, pool_dtype):
    e, pe = torch.finfo(dtype).bits // 8, torch.finfo(pool_dtype).bits // 8
    act = N * h * e + 2 * N * o * e
    shards = S * r * (h + o) * pe
    tables = S * r * 2 * l * 4 + (2 * S + 1) * 4
    return act + shards + tables, 2 * N * r * (h + o)


def grad_set(N, L, h, r, l, e_rank, dtype, dev, gen):
    P = e_rank * L * l
    s = h // l
    kw = dict(generator=gen, device=dev)
    idx = [torch.randperm(P, **kw)[: r * l].reshape(1, r, l).to(torch.int32) for _ in range(L)]
    x = [torch.randn(N, h, **kw).to(dtype) for _ in range(L)]
    u = [torch.randn(N, r, **kw) for _ in range(L)]
    d = dict(grad=torch.zeros(P, s), scale=torch.tensor([0.5]), ip=torch.tensor([0, N], dtype=torch.int32),
             tn=torch.zeros(1, dtype=torch.int32))
    d = {k: v.to(dev) for k, v in d.items()}
    d["idx"] = idx
    d["x"] = x
    d["u"] = u
    d["ub"] = [t.to(dtype) for t in d["u"]]
    d["flat"] = [t.reshape(-1).long() for t in d["idx"]]
    # plain-LoRA tables: one row of length h per rank row
    d["grad1"] = torch.zeros(e_rank * L, h, device=dev)
    d["idx1"] = [torch.randperm(e_rank * L, **kw)[:r].reshape(1, r, 1).to(torch.int32) for _ in range(L)]
    return d


def grad_ref(d):
    g = torch.zeros(d["grad"].shape, dtype=torch.float64, device=d["grad"].device)
    r, l = d["idx"][0].shape[1:]
    s = g.shape[1]
    for x, u, flat in zip(d["x"], d["u"], d["flat"]):
        g.index_add_(0, flat, (u.double().T @ x.double()).reshape(r * l, s) * 0.5)
    return g


def grad_impls(det_too=True):
    def mos(det):
        def f(d):
            for x, u, idx in zip(d["x"], d["u"], d["idx"]):
                ops.shard_grad(d["grad"], u, x, idx, d["scale"], d["ip"], d["tn"], det)
        return f

    def mos1(d):
        for x, u, idx in zip(d["x"], d["u"], d["idx1"]):
            ops.shard_grad(d["grad1"], u, x, idx, d["scale"], d["ip"], d["tn"], False)

    def cublas(d):
        r, l = d["idx"][0].shape[1:]
        s = d["grad"].shape[1]
        for x, ub, flat in zip(d["x"], d["ub"], d["flat"]):
            dA = torch.mm(ub.T, x).float()  # [r, h]
            d["grad"].index_add_(0, flat, dA.view(r * l, s), alpha=0.5)

    impls = {"mos": mos(False), "mos l=1": mos1, "cuBLAS dA + index_add_": cublas}
    if det_too:
        impls["mos deterministic"] = mos(True)
    return impls


def grad_model(N, L, h, r, l, dtype):
    e = torch.finfo(dtype).bits // 8
    return L * (N * h * e + N * r * 4 + 2 * r * h * 4 + r * l * 4), L * 2 * N * r * h


# ----------------------------------------------------------------------------------------------
# cases


def case_list(dry, which):
    f = 16 if dry else 1  # dry run: features / 16, tokens / 16 to / 128
    h, o, r, l = 4096 // f, 4096 // f, 16, 8
    cases = []
    if "decode" in which:
        for N in (64, 256, 1024):
            n = max(4, N // 16) if dry else N
            cases.append(dict(kind="serve", name=f"decode N={N}", N=n, S=n, h=h, o=o, r=r, l=l, dtype=torch.bfloat16))
    if "prefill" in which:
        for N in (4096, 16384):
            for S in (1, 64):
                n = N // 128 if dry else N
                cases.append(dict(kind="serve", name=f"prefill N={N} S={S}", N=n, S=min(S, n), h=h, o=o, r=r, l=l,
                                  dtype=torch.bfloat16))
        # fp16 takes the same tensor-core kernel with x split into bf16 hi + lo
        cases.append(dict(kind="serve", name="prefill fp16 N=4096 S=1", N=4096 // 128 if dry else 4096, S=1, h=h,
                          o=o, r=r, l=l, dtype=torch.float16))
    if "punica" in which:
        n = 16 if dry else 64
        cases.append(dict(kind="serve", name="punica 4096->11008 r=16 fp16 N=64", N=n, S=n, h=4096 // f,
                          o=11008 // 8 // f * 8 if dry else 11008, r=16, l=8, dtype=torch.float16))
    if "shard_grad" in which:
        for N in (512, 4096):
            cases.append(dict(kind="grad", name=f"shard_grad 32 layers N={N}", N=N // 32 if dry else N, L=32, h=h,
                              r=r, l=l, e=8, dtype=torch.bfloat16))
    return cases


def check(out, ref, dtype):
    err = (out.double() - ref).abs().max().item()
    mag = ref.abs().max().item() or 1.0
    return err / mag, err / mag <= TOL[dtype]


def run_case(c, dev, timer, paths, dry, gen):
    rows = []
    serve = c["kind"] == "serve"
    if serve:
        nbytes, flops = serving_model(c["N"], c["S"], c["h"], c["o"], c["r"], c["l"], c["dtype"], c["dtype"])
        make = lambda: serving_set(c["N"], c["S"], c["h"], c["o"], c["r"], c["l"], c["dtype"], c["dtype"], dev, gen)
    else:
        nbytes, flops = grad_model(c["N"], c["L"], c["h"], c["r"], c["l"], c["dtype"])
        make = lambda: grad_set(c["N"], c["L"], c["h"], c["r"], c["l"], c["e"], c["dtype"], dev, gen)
    first = make()
    set_bytes = nbytes
    k = 1 if dry else int(min(16, max(2, math.ceil(3 * timer.l2 / max(set_bytes, 1)))))
    sets = [first] + [make() for _ in range(k - 1)]
    ref = serving_ref(first) if serve else grad_ref(first)
    impls = serving_impls(first, decode=c["name"].startswith(("decode", "punica"))) if serve else grad_impls()
    out_key = "y" if serve else "grad"
    for name, fn in impls.items():
        variants = paths if name.startswith("mos") and dev.type == "cuda" else ["-"]
        for path in variants:
            if path != "-":
                set_cuda_path(path)
            row = dict(case=c["name"], impl=name, path=path, bytes=nbytes, flops=flops)
            # correctness first, on set 0 from zero (l = 1 grads and the mm pair write elsewhere)
            key = {"mos l=1": "grad1"}.get(name, out_key) if not serve else out_key
            if serve and name == "mm pair (1 adapter)":
                fn(first)
                if c["S"] == 1:
                    row["rel_err"], row["ok"] = check(first["tmp"] * first["scale"][0].to(c["dtype"]), ref, c["dtype"])
                else:
                    row["ok"], row["rel_err"] = True, None  # one adapter only: not the batch's result
            elif name == "mos l=1" and not serve:
                first["grad1"].zero_()
                fn(first)
                row["ok"], row["rel_err"] = bool(torch.isfinite(first["grad1"]).all()), None
            elif serve and name == "addmm_ (1 adapter)" and c["S"] > 1:
                first["y"].zero_()
                fn(first)
                row["ok"], row["rel_err"] = bool(torch.isfinite(first["y"]).all()), None
            else:
                first[key].zero_()
                fn(first)
                row["rel_err"], row["ok"] = check(first[key], ref, c["dtype"])
            if not row["ok"]:
                row["error"] = f"wrong result: relative error {row['rel_err']:.3g} (tolerance {TOL[c['dtype']]})"
            elif not dry:
                fns = [(lambda d=d: fn(d)) for d in sets]
                row["us_events"] = timer.events(fns)
                row["us_graph"] = timer.graph(fns)
            rows.append(row)
    if dev.type == "cuda":
        set_cuda_path("auto")
        del sets, first
        torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------------
# report


def derive(rows, ceil):
    by = {(r["case"], r["impl"], r["path"]): r for r in rows}
    for r in rows:
        t = r.get("us_graph")
        if t:
            r["GBps"] = r["bytes"] / t / 1e3
            r["TFLOPs"] = r["flops"] / t / 1e6
            if ceil:
                r["frac_copy"] = r["GBps"] / ceil["copy_GBps"]
        base = "cuBLAS dA + index_add_" if r["case"].startswith("shard_grad") else "addmm_ (1 adapter)"
        b = by.get((r["case"], base, "-"))
        if t and b and b.get("us_graph"):
            r["x_vs_" + ("cublas" if "cuBLAS" in base else "addmm")] = t / b["us_graph"]
        if r["impl"] == "mos":
            l1 = by.get((r["case"], "mos l=1", r["path"]))
            if t and l1 and l1.get("us_graph"):
                r["x_vs_l1"] = t / l1["us_graph"]


def targets(rows, ceil):
    out = []

    def get(case, impl="mos", path="fast"):
        return next((r for r in rows if r["case"] == case and r["impl"] == impl and r["path"] == path), None)

    r = get("decode N=1024")
    if r and r.get("frac_copy") is not None:
        out.append(("decode N=1024 >= 60% of copy bandwidth", r["frac_copy"] >= 0.6, f"{100 * r['frac_copy']:.0f}%"))
    for N in (4096, 16384):
        for S in (1, 64):
            r = get(f"prefill N={N} S={S}")
            if r and r.get("x_vs_addmm") is not None:
                out.append((f"prefill N={N} S={S} <= 1.3x addmm_", r["x_vs_addmm"] <= 1.3, f"{r['x_vs_addmm']:.2f}x"))
    for r in rows:
        if r["impl"] == "mos" and r["path"] == "fast" and r.get("x_vs_l1") is not None and not r["case"].startswith("shard"):
            out.append((f"{r['case']}: MoS <= 1.10x plain-LoRA tables", r["x_vs_l1"] <= 1.10, f"{r['x_vs_l1']:.2f}x"))
    for N in (512, 4096):
        r = get(f"shard_grad 32 layers N={N}", path="fast")
        if r and r.get("x_vs_cublas"):
            out.append((f"shard_grad N={N} >= 2x cuBLAS + index_add_", 1 / r["x_vs_cublas"] >= 2,
                        f"{1 / r['x_vs_cublas']:.2f}x"))
    r = get("punica 4096->11008 r=16 fp16 N=64")
    if r and r.get("us_graph"):
        out.append((f"punica shape < {PUNICA_A100_US:.0f} us (Punica, A100)", r["us_graph"] < PUNICA_A100_US,
                    f"{r['us_graph']:.1f} us"))
    return out


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU: build every case small and check it; no timing")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--cases", default="decode,prefill,punica,shard_grad")
    ap.add_argument("--paths", default="fast,generic")
    ap.add_argument("--budget-s", type=float, default=240.0, help="stop starting new cases after this long")
    a = ap.parse_args(argv)
    t0 = time.time()
    dry = a.dry_run
    if not dry and not (torch.cuda.is_available() and mos_ext.cuda_built()):
        sys.exit("bench_cuda: needs a GPU and mos_ext built with MOS_EXT_CUDA=1 (or --dry-run)")
    dev = torch.device("cpu" if dry else "cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    timer = None if dry else Timer(dev)
    info = dict(torch=torch.__version__, cuda=torch.version.cuda, python=platform.python_version(),
                device=torch.cuda.get_device_name(dev) if not dry else "cpu (dry run)", dry_run=dry,
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    ceil = None
    if not dry:
        ceil = ceilings(timer, dev)
        print(f"ceiling copy {ceil['copy_GBps']:.0f} GB/s (read+write) | bf16 8192^3 matmul "
              f"{ceil['bf16_matmul_TFLOPs']:.0f} TFLOP/s")
    rows, skipped = [], []
    paths = [p for p in a.paths.split(",") if p]
    with mos_ext.index_checks(False):
        for c in case_list(dry, set(a.cases.split(","))):
            if time.time() - t0 > a.budget_s:
                skipped.append(c["name"])
                continue
            rows += run_case(c, dev, timer, paths, dry, gen)
    derive(rows, ceil)
    hdr = f"{'case':36s} {'impl':24s} {'path':7s} {'us(ev)':>8s} {'us(graph)':>9s} {'GB/s':>7s} {'%copy':>6s} " \
          f"{'TFLOP/s':>7s} {'ratio':>18s} {'check':>12s}"
    print(hdr)
    for r in rows:
        ratio = next((f"{k[2:]}={v:.2f}" for k, v in r.items() if k.startswith("x_vs")), "")
        chk = "ok" if r["ok"] else "WRONG"
        if r.get("rel_err") is not None:
            chk += f" {r['rel_err']:.0e}"
        print(f"{r['case']:36s} {r['impl']:24s} {r['path']:7s} {fmt(r.get('us_events'), '8.1f')} "
              f"{fmt(r.get('us_graph'), '9.1f')} {fmt(r.get('GBps'), '7.0f')} "
              f"{fmt(100 * r['frac_copy'] if 'frac_copy' in r else None, '6.1f')} {fmt(r.get('TFLOPs'), '7.2f')} "
              f"{ratio:>18s} {chk:>12s}")
    tg = targets(rows, ceil)
    for name, met, val in tg:
        print(f"target {'MET ' if met else 'MISS'} {name}: {val}")
    if skipped:
        print(f"skipped (budget {a.budget_s:.0f}s): {', '.join(skipped)}")
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows)} measurements, {len(bad)} wrong, {time.time() - t0:.0f}s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(info=info, ceilings=ceil, rows=rows, skipped=skipped,
                           targets=[dict(name=n, met=m, value=v) for n, m, v in tg]), f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
