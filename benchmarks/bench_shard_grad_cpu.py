"""CPU fused pool-gradient accumulation (shard_grad) against autograd's path.

Autograd through `A = pool[idx].reshape(r, h)` computes dA = (scale*u)^T x as a dense
[r, h] matrix, then a pool-sized zero tensor and an index_put(accumulate) into it, once per
layer. shard_grad adds the shard gradients straight into one pool gradient.
Scenario: one projection type of a 32-layer model (MoS r=16, e=4, l=4, h=4096), 2048 tokens
per layer, all layers' gradients into one pool (as the backward of a training step does).

    python benchmarks/bench_shard_grad_cpu.py [--quick]
Prints a table and writes benchmarks/out/shard_grad_cpu.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from mos_ext import ops

sys.path.insert(0, os.path.dirname(__file__))
from _timing import median_time  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    reps = 3 if a.quick else 5
    gen = torch.Generator().manual_seed(0)
    L, r, e, l, h, N = 32, 16, 4, 4, 4096, 2048
    s = h // l
    P = e * L * l
    idx = torch.stack([torch.randperm(P, generator=gen)[: r * l].reshape(1, r, l) for _ in range(L)]).to(torch.int32)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(N, h, generator=gen).to(dtype)
        u = torch.randn(N, r, generator=gen)
        scale = torch.tensor([2.0])
        seg = (torch.tensor([0, N], dtype=torch.int32), torch.tensor([0], dtype=torch.int32))

        def fused():
            g = torch.zeros(P, s)
            for k in range(L):
                ops.shard_grad(g, u, x, idx[k], scale, *seg)
            return g

        def autograd_path():
            g = torch.zeros(P, s)
            for k in range(L):
                dA = (u * 2.0).T @ x.float()  # [r, h]
                gk = torch.zeros(P, s)  # what index backward allocates per use
                gk.index_put_((idx[k].reshape(-1).long(),), dA.reshape(r * l, s), accumulate=True)
                g += gk
            return g

        torch.testing.assert_close(fused(), autograd_path(), rtol=1e-4, atol=1e-3)
        t = {name: median_time(fn, reps) for name, fn in (("fused", fused), ("autograd", autograd_path))}
        rows.append(dict(dtype=str(dtype).replace("torch.", ""), L=L, r=r, e=e, l=l, h=h, N=N,
                         fused_ms=t["fused"], autograd_ms=t["autograd"], speedup=t["autograd"] / t["fused"]))
        print(f"{rows[-1]['dtype']:9s} 32 layers x {N} tok  fused {t['fused']:8.1f} ms   autograd-scatter "
              f"{t['autograd']:8.1f} ms   speedup {t['autograd'] / t['fused']:.2f}x", flush=True)
    out = os.path.join(os.path.dirname(__file__), "out", "shard_grad_cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(dict(date=time.strftime("%Y-%m-%d"), threads=torch.get_num_threads(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
