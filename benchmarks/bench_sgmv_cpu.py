"""CPU sgmv against the PEFT-style baseline, side by side in one run.

Baseline ("peft loop"): a Python loop over the segments, each materializing
the tenant's A and B by gathering its shards (index_select) and doing two
matmuls, as a per-adapter PEFT forward would. Both compute y += scale * B A x.

    python benchmarks/bench_sgmv_cpu.py            # the issue's shape and a few more
    python benchmarks/bench_sgmv_cpu.py --quick    # fewer repeats
Also times shared tables (one table, a row base per tenant: docs/OPS.md) against the same problem
with a table of global rows per tenant (value checks off). Prints a table and writes
benchmarks/out/sgmv_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

import mos_ext
from mos_ext import ops

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from problems import make_table  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from _timing import median_time  # noqa: E402


def peft_loop(y, x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant):
    r = idx_a.shape[1]
    ip = seg_indptr.tolist()
    for g, t in enumerate(seg_tenant.tolist()):
        s, e = ip[g], ip[g + 1]
        if t < 0 or e == s:
            continue
        A = pool_a.index_select(0, idx_a[t].reshape(-1)).reshape(r, -1).to(x.dtype)
        Bt = pool_b.index_select(0, idx_b[t].reshape(-1)).reshape(r, -1).to(x.dtype)
        y[s:e] += (x[s:e] @ A.T) @ Bt * scale[t].item()
    return y


def case(name, T, tokens_per_tenant, h, o, r, l, dtype, reps):
    gen = torch.Generator().manual_seed(0)
    N = T * tokens_per_tenant
    s_a, s_b = h // l, o // l
    P = T * r * l  # every tenant's own shards (serving: stacked tenant pools)
    pool_a = (torch.randn(P, s_a, generator=gen) / h**0.5).to(dtype)
    pool_b = (torch.randn(P, s_b, generator=gen) / r**0.5).to(dtype)
    idx_a = make_table(T, r, l, P, gen)
    idx_b = make_table(T, r, l, P, gen)
    scale = torch.full((T,), 2.0)
    x = torch.randn(N, h, generator=gen).to(dtype)
    y = torch.randn(N, o, generator=gen).to(dtype)
    seg_indptr = torch.arange(0, N + 1, tokens_per_tenant, dtype=torch.int32)
    seg_tenant = torch.randperm(T, generator=gen).to(torch.int32)
    args = (x, pool_a, pool_b, idx_a, idx_b, scale, seg_indptr, seg_tenant)

    # correctness of both against each other before timing
    y1, y2 = y.clone(), y.clone()
    ops.sgmv(y1, *args)
    peft_loop(y2, *args)
    err = ((y1.double() - y2.double()).abs().max() / (y2.double() - y.double()).abs().max()).item()

    yb = y.clone()
    t_mos = median_time(lambda: ops.sgmv(yb, *args), reps, warmup=2) / 1e3
    t_peft = median_time(lambda: peft_loop(yb, *args), reps, warmup=2) / 1e3
    with mos_ext.index_checks(False):
        t_mos_nocheck = median_time(lambda: ops.sgmv(yb, *args), reps, warmup=2) / 1e3
    # shared tables (docs/OPS.md): every tenant reads one table through its own row base, vs the same
    # problem with a table of global rows per tenant; value checks off (the serving setting)
    local = torch.randperm(r * l, generator=gen).reshape(1, r, l).to(torch.int32)
    base = (torch.arange(T, dtype=torch.int32) * (r * l)).reshape(T, 1, 1)
    flat = (local + base).contiguous()
    m = torch.stack([torch.zeros(T, dtype=torch.int32), base.reshape(T)], 1).contiguous()
    fargs = (x, pool_a, pool_b, flat, flat, scale, seg_indptr, seg_tenant)
    y1, y2 = y.clone(), y.clone()
    ops.sgmv(y1, *fargs)
    ops.sgmv(y2, x, pool_a, pool_b, local, local, scale, seg_indptr, seg_tenant, m, m)
    assert torch.equal(y1, y2), "shared tables differ from their flat spelling"
    with mos_ext.index_checks(False):
        t_flat = median_time(lambda: ops.sgmv(yb, *fargs), reps, warmup=2) / 1e3
        t_shared = median_time(lambda: ops.sgmv(yb, x, pool_a, pool_b, local, local, scale, seg_indptr, seg_tenant,
                                                m, m), reps, warmup=2) / 1e3
    flops = 2 * N * r * (h + o)
    return dict(case=name, T=T, N=N, h=h, o=o, r=r, l=l, dtype=str(dtype).replace("torch.", ""),
                mos_ms=t_mos * 1e3, mos_nocheck_ms=t_mos_nocheck * 1e3, peft_ms=t_peft * 1e3,
                speedup=t_peft / t_mos, mos_gflops=flops / t_mos / 1e9, rel_err=err,
                flat_ms=t_flat * 1e3, shared_ms=t_shared * 1e3, shared_vs_flat=t_shared / t_flat)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "out", "sgmv_cpu.json"))
    a = ap.parse_args()
    reps = 3 if a.quick else 7
    cases = [
        # name, T, tokens/tenant, h, o, r, l
        ("issue: 64 tenants x 4096 tok", 64, 64, 4096, 4096, 16, 4),
        ("same, LoRA tables (l=1)", 64, 64, 4096, 4096, 16, 1),
        ("decode: 64 tenants x 1 tok", 64, 1, 4096, 4096, 16, 4),
        ("prefill: 1 tenant x 2048 tok", 1, 2048, 4096, 4096, 16, 4),
        ("mlp up: 16 tenants x 1024 tok", 16, 64, 4096, 11008, 8, 8),
    ]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for c in cases:
            rows.append(case(*c, dtype=dtype, reps=reps))
            r = rows[-1]
            print(f"{r['case']:32s} {r['dtype']:9s} mos {r['mos_ms']:8.2f} ms (no checks {r['mos_nocheck_ms']:8.2f})"
                  f"  peft-loop {r['peft_ms']:8.2f} ms  speedup {r['speedup']:5.2f}x  {r['mos_gflops']:6.1f} GFLOP/s"
                  f"  rel.err {r['rel_err']:.1e}  shared tables {r['shared_ms']:8.2f} ms vs flat {r['flat_ms']:8.2f} ms"
                  f" ({r['shared_vs_flat']:.3f}x)", flush=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), machine=platform.processor() or platform.machine(),
                threads=torch.get_num_threads(), torch=torch.__version__, isa=mos_ext.cpu_isa(),
                command="python benchmarks/bench_sgmv_cpu.py" + (" --quick" if a.quick else ""))
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
