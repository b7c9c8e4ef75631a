"""Backward of L layers sharing one MoS pool pair, with and without mos_ext.PoolGradTaps.

    python benchmarks/bench_pool_grad_tap.py [--device cpu|cuda] [--h 4096] [--tokens 128] [--layers 32]

Without taps every layer's backward makes a pool-sized fp32 zero gradient per side that autograd
then adds up (L zeros + L-1 adds per pool); with taps all layers accumulate into one buffer per
pool. Prints the median backward time of both and the pool-sized bytes each writes.
"""
import argparse
import statistics
import time

import torch

import mos_ext
from mos_ext import ops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--e", type=int, default=8, help="equivalent rank (pool rows = e * layers * l)")
    ap.add_argument("--l", type=int, default=8)
    ap.add_argument("--reps", type=int, default=7)
    a = ap.parse_args()
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)
    P, s = a.e * a.layers * a.l, a.h // a.l
    pa = (torch.randn(P, s, generator=g) / a.h ** 0.5).to(dev).requires_grad_()
    pb = (torch.randn(P, s, generator=g) * 0.01).to(dev).requires_grad_()
    tabs = [tuple(torch.randperm(P, generator=g)[: a.rank * a.l].reshape(1, a.rank, a.l).to(torch.int32).to(dev)
                  for _ in range(2)) for _ in range(a.layers)]
    x = torch.randn(a.tokens, a.h, generator=g).to(dev)
    seg = (torch.tensor([0, a.tokens], dtype=torch.int32, device=dev), torch.zeros(1, dtype=torch.int32, device=dev))
    scale = torch.tensor([0.5], device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step(tapped):
        taps = mos_ext.PoolGradTaps()
        h = x
        for ia, ib in tabs:
            A, B = taps.take(id(ia), pa, pb) if tapped else (pa, pb)
            h = h + ops.sharded_lora(h, A, B, ia, ib, scale, *seg)
        loss = h.square().mean()
        sync()
        t0 = time.perf_counter()
        loss.backward()
        sync()
        dt = time.perf_counter() - t0
        pa.grad = pb.grad = None
        return dt

    res = {}
    for tapped in (False, True, False, True):
        times = [step(tapped) for _ in range(a.reps)]
        res.setdefault(tapped, []).extend(times)
    pool_mb = P * s * 4 / 2**20
    for tapped in (False, True):
        print(f"{'taps' if tapped else 'no taps':8s} backward median {statistics.median(res[tapped]) * 1e3:8.2f} ms "
              f"(pool {pool_mb:.1f} MiB fp32 per side; pool-sized zero tensors per step: "
              f"{2 if tapped else 2 * a.layers})")
    print(f"speedup {statistics.median(res[False]) / statistics.median(res[True]):.2f}x "
          f"(device {dev}, h={a.h}, tokens={a.tokens}, layers={a.layers}, r={a.rank}, l={a.l}, e={a.e}, "
          f"threads={torch.get_num_threads()})")


if __name__ == "__main__":
    main()
