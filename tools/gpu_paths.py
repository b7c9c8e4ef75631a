"""Run every CUDA kernel path of the mos ops once, small, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python tools/gpu_paths.py
    compute-sanitizer --tool racecheck python tools/gpu_paths.py

Covers: gather_shards; sgmv / sgmv_shrink / sgmv_expand on the fast and the generic
path (MOS_EXT_CUDA_PATH) for fp32/fp64/fp16/bf16 activations, pools in the activation
dtype and fp32, mixed ranks with -1 rows, empty and -1 segments, long segments (the
tensor-core prefill kernel, fp16 and bf16), an unaligned row view (fallback), a rank
large enough that the fused kernel needs > 48 KiB of dynamic shared memory; shard_grad
atomic and deterministic (also in chunks of one item); sharded_lora forward + backward through a
pool-gradient tap; and the checks-off garbage case (out-of-range indices and tenants,
non-monotone segments). Each output is checked against the CPU ops, so the script also
fails on a wrong result. Exits 0 when all ran and agreed.

    python tools/gpu_paths.py --dry-run   # no GPU: the same problems and calls on the CPU ops
                                          # (checks the script itself; tests/test_bench_cuda.py)
"""
from __future__ import annotations

import os
import sys

import torch

import mos_ext
from mos_ext import ops

DRY = "--dry-run" in sys.argv[1:]
DEV = torch.device("cpu" if DRY else "cuda")
TOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 2e-2}
failures = []


def close(got, want, what):
    tol = TOL[want.dtype] if want.dtype in TOL else 1e-4
    g, w = got.detach().cpu().double(), want.detach().double()
    mag = max(1.0, w.abs().max().item()) if w.numel() else 1.0
    if not torch.allclose(g, w, rtol=tol, atol=tol * mag, equal_nan=True):
        failures.append(f"{what}: max |diff| {(g - w).abs().max().item():.3g} (scale {mag:.3g})")


def problem(dtype, pool_dtype, T=3, N=40, h=64, o=48, r=8, l_a=4, l_b=2, seed=0, garbage=False, long_segments=False):
    gen = torch.Generator().manual_seed(seed)
    P_a, P_b = T * r * l_a + 3, T * r * l_b + 5
    idx_a = torch.randint(0, P_a, (T, r, l_a), generator=gen, dtype=torch.int32)
    idx_b = torch.randint(0, P_b, (T, r, l_b), generator=gen, dtype=torch.int32)
    idx_a[0, r // 2:] = -1  # a tenant of smaller rank
    idx_b[0, r // 2:] = -1
    ip = torch.tensor([0, 5, 5, 17, 30, 36], dtype=torch.int32)  # an empty segment, tokens 36.. outside
    tn = torch.tensor([0, 2, 1, -1, 2], dtype=torch.int32)
    if long_segments:  # >= 32 tokens per segment on average: the tensor-core prefill kernel
        ip = torch.tensor([0, 130, 130, 290, N - 7], dtype=torch.int32)
        tn = torch.tensor([0, 2, -1, 1], dtype=torch.int32)
    tn = torch.where(tn >= 0, tn % T, tn)  # fewer than 3 tenants: every segment names one that exists
    if garbage:
        idx_a[1, 0, 0], idx_a[2, 1, 1], idx_b[1, 2, 0] = P_a + 7, -5, 2**30
        ip = torch.tensor([0, 9, 4, 30, 2**20, 38], dtype=torch.int32)
        tn = torch.tensor([0, 7, 1, -3, 2], dtype=torch.int32)
    x = torch.randn(N, h, generator=gen).to(dtype)
    y = torch.randn(N, o, generator=gen).to(dtype)
    pa = (torch.randn(P_a, h // l_a, generator=gen) / h ** 0.5).to(pool_dtype)
    pb = (torch.randn(P_b, o // l_b, generator=gen) / r ** 0.5).to(pool_dtype)
    scale = torch.rand(T, generator=gen) + 0.5
    return dict(x=x, y=y, pa=pa, pb=pb, ia=idx_a, ib=idx_b, sc=scale, ip=ip, tn=tn)


def run_ops(p, tag, x_view=False):
    d = {k: v.to(DEV) for k, v in p.items()}
    if x_view:  # rows one element off a 16-byte boundary: the generic fallback
        big = torch.zeros(p["x"].shape[0], p["x"].shape[1] + 1, dtype=p["x"].dtype, device=DEV)
        big[:, 1:] = d["x"]
        d["x"] = big[:, 1:]
    seg = (d["ip"], d["tn"])
    cseg = (p["ip"], p["tn"])
    y = d["y"].clone()
    ops.sgmv(y, d["x"], d["pa"], d["pb"], d["ia"], d["ib"], d["sc"], *seg)
    want = ops.sgmv(p["y"].clone(), p["x"], p["pa"], p["pb"], p["ia"], p["ib"], p["sc"], *cseg)
    close(y, want, f"{tag} sgmv")
    v = ops.sgmv_shrink(d["x"], d["pa"], d["ia"], *seg)
    vc = ops.sgmv_shrink(p["x"], p["pa"], p["ia"], *cseg)
    close(v, vc, f"{tag} shrink")
    y = d["y"].clone()
    ops.sgmv_expand(y, v, d["pb"], d["ib"], d["sc"], *seg)
    close(y, ops.sgmv_expand(p["y"].clone(), vc, p["pb"], p["ib"], p["sc"], *cseg), f"{tag} expand")
    acc = vc.dtype
    # deterministic with MOS_EXT_DET_PART_BYTES=1: the tensor-core two passes one item at a time
    for det, cap in ((False, None), (True, None), (True, "1")):
        if cap is not None:
            os.environ["MOS_EXT_DET_PART_BYTES"] = cap
        try:
            g = torch.zeros(p["pa"].shape, dtype=acc, device=DEV)
            ops.shard_grad(g, v, d["x"], d["ia"], d["sc"], *seg, deterministic=det)
        finally:
            os.environ.pop("MOS_EXT_DET_PART_BYTES", None)
        gc = ops.shard_grad(torch.zeros(p["pa"].shape, dtype=acc), vc, p["x"], p["ia"], p["sc"], *cseg)
        close(g, gc, f"{tag} shard_grad det={det} part cap={cap}")
    close(ops.gather_shards(d["pa"], d["ia"]), ops.gather_shards(p["pa"], p["ia"]), f"{tag} gather_shards")


def main():
    if not DRY and not (torch.cuda.is_available() and mos_ext.cuda_built()):
        sys.exit("gpu_paths: needs a GPU and mos_ext built with MOS_EXT_CUDA=1")
    combos = [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
              (torch.float16, torch.float32), (torch.float32, torch.float32), (torch.float64, torch.float64)]
    for path in ("fast", "generic"):
        os.environ["MOS_EXT_CUDA_PATH"] = path
        for dt, pdt in combos:
            tag = f"{path} {str(dt)[6:]}/{str(pdt)[6:]}"
            run_ops(problem(dt, pdt), tag)
        run_ops(problem(torch.bfloat16, torch.bfloat16), f"{path} unaligned x rows", x_view=True)
        # tensor-core prefill (fast): cp.async stages, > 48 KiB of dynamic shared memory with
        # fp32 pools, h / o not multiples of the stage widths, rank 40 (padded to 48)
        for dt, pdt in combos[:4]:
            run_ops(problem(dt, pdt, N=320, h=96, o=72, r=40, l_a=3, l_b=1, long_segments=True),
                    f"{path} prefill {str(dt)[6:]}/{str(pdt)[6:]}")
        # large rank: > 48 KiB of dynamic shared memory in the fused kernel
        run_ops(problem(torch.bfloat16, torch.float32, T=1, r=1024, h=256, o=128, l_a=2, l_b=2), f"{path} r=1024")
        run_ops(problem(torch.float32, torch.float32, T=1, r=1536, h=64, o=64), f"{path} fp32 r=1536")
        with mos_ext.index_checks(False):
            run_ops(problem(torch.bfloat16, torch.bfloat16, garbage=True), f"{path} checks off, garbage")
            run_ops(problem(torch.float32, torch.float32, garbage=True), f"{path} checks off, garbage fp32")
    os.environ.pop("MOS_EXT_CUDA_PATH", None)
    # training: sharded_lora forward + backward through a tap, deterministic and not
    p = problem(torch.bfloat16, torch.float32, T=1)
    d = {k: v.to(DEV) for k, v in p.items()}
    seg = (torch.tensor([0, 40], dtype=torch.int32, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV))
    for det in (False, True):
        with mos_ext.deterministic_grads(det):
            pa, pb = d["pa"].clone().requires_grad_(), d["pb"].clone().requires_grad_()
            taps = mos_ext.PoolGradTaps()
            out = sum(ops.sharded_lora(d["x"], taps(pa), taps(pb), d["ia"], d["ib"], d["sc"], *seg).float().sum()
                      for _ in range(3))
            out.backward()
            if not (torch.isfinite(pa.grad).all() and torch.isfinite(pb.grad).all()):
                failures.append(f"sharded_lora backward det={det}: non-finite pool grads")
    if not DRY:
        torch.cuda.synchronize()
    if failures:
        print("gpu_paths: FAILED\n  " + "\n  ".join(failures))
        sys.exit(1)
    print("gpu_paths: every kernel path ran and agreed with the CPU ops")


if __name__ == "__main__":
    main()
