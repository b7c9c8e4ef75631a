"""vLLM + the mos_ext plugin under fire: many tenants, requests in flight while adapters load, unload,
reload and fail to load, at TP 1 and TP 2 (issue 21 item 4; the CI-sized version is
``tests/test_vllm.py::test_load_under_fire_tp1`` / ``_tp2``, the same driver: ``tests/vllm_util.load_under_fire``).

Per TP size one server (tiny fp32 Llama: 4 layers, hidden 256, 4 heads / 2 KV heads, as the tests use) with a
small store, so tenants are evicted to host and come back. Tenants (MoS, MiSS, LoRA-as-shards, PEFT LoRA r=8,
in turn) are loaded over HTTP while requests for the tenants loaded so far (and the base model) run
``--concurrency`` at a time; meanwhile every 8th tenant is unloaded and loaded again (also ``load_inplace``),
and corrupt / wrong-shape / over-rank / too-large adapters are loaded, over and over. Checked: every completed
request's greedy tokens equal its tenant's MultiTenantModel reference, every refusal is a 4xx whose message
names the problem, /health answers throughout, the server's processes keep their PIDs.

    python benchmarks/bench_vllm_fire.py                        # 256 tenants, TP 1 and TP 2
    python benchmarks/bench_vllm_fire.py --tenants 32 --tp 1    # quick

Prints a table, writes JSON (``--out``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import vllm_util as U  # noqa: E402

PROMPTS = [[5, 17, 33, 48, 9], [100, 7, 250, 3, 77, 41, 12]]
MAX_RANK = 32


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tenants", type=int, default=256)
    ap.add_argument("--requests", type=int, default=None, help="completions per TP size (default 4 per tenant)")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    ap.add_argument("--tp", default="1,2", help="comma-separated tensor parallel sizes, one server each")
    ap.add_argument("--max-loras", type=int, default=4)
    ap.add_argument("--max-cpu-loras", type=int, default=32)
    ap.add_argument("--capacity-mb", type=float, default=4.0, help="MOS_EXT_VLLM_CAPACITY_MB (per worker)")
    ap.add_argument("--max-tenants", type=int, default=64, help="MOS_EXT_VLLM_MAX_TENANTS")
    ap.add_argument("--new-tokens", type=int, default=6)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "bench_vllm_fire.json"))
    ap.add_argument("--workdir", default=None)
    a = ap.parse_args()
    a.tp_sizes = [int(t) for t in a.tp.split(",") if t.strip()]
    a.requests = a.requests or 4 * a.tenants
    return a


def main():
    a = parse()
    py = U.bench_vllm_python()
    from mos_ext import MoSConfig

    work = a.workdir or tempfile.mkdtemp(prefix="bench_vllm_fire_")
    cfg = U.llama_config()
    cfg.initializer_range = 0.1  # peaked logits: greedy tokens are not decided by near-ties
    base = os.path.join(work, "base")
    t0 = time.time()
    U.save_base(base, cfg)
    mos = MoSConfig(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1, lora_alpha=16,
                    target_modules=U.ALL7, seed=1)
    kinds = [mos, MoSConfig(r=4, method="miss", target_modules=U.ALL7),
             MoSConfig(r=8, method="lora", lora_alpha=16, target_modules=U.ALL7), ("peft_lora", 8)]
    tenants = U.write_tenants(cfg, os.path.join(work, "tenants"), a.tenants, kinds, seed=7)
    bad = U.write_bad_adapters(cfg, work, mos)
    want = U.reference_tokens(base, tenants, PROMPTS, a.new_tokens, MAX_RANK)
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32).eval()
    for i, p in enumerate(PROMPTS):
        want[("base", i)] = U.greedy(lambda x: hf(input_ids=x).logits, torch.tensor([p]), a.new_tokens)[0].tolist()
    print(f"{a.tenants} tenants written, references computed in {time.time() - t0:.0f}s", flush=True)
    refuse = [("corrupt", bad["corrupt"], ["corrupt adapter weights"]),
              ("wrong_shapes", bad["mismatch"], ["the adapter was saved for"]),
              ("rank", bad["rank"], ["rank 64", f"max_rank={MAX_RANK}"]),
              ("too_large", bad["size"], ["store rows", "MOS_EXT_VLLM_CAPACITY_MB"])]
    churn = list(tenants)[1::8]
    reports = {}
    for tp in a.tp_sizes:
        env = {"MOS_EXT_VLLM_CAPACITY_MB": str(a.capacity_mb), "MOS_EXT_VLLM_MAX_RANK": str(MAX_RANK),
               "MOS_EXT_VLLM_MAX_TENANTS": str(a.max_tenants)}
        extra = ["--max-num-seqs", str(a.concurrency)]
        if tp > 1:
            cores = os.cpu_count() or tp
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % cores) for i in range(tp))
            extra += ["--tensor-parallel-size", str(tp)]
        srv = U.Server(py, base, max_loras=a.max_loras, max_lora_rank=8, max_cpu_loras=a.max_cpu_loras, env=env,
                       log_path=os.path.join(work, f"server_tp{tp}.log"), extra=extra)
        try:
            ready = srv.wait_ready(timeout=900)
            load0 = os.getloadavg()
            rep = U.load_under_fire(srv, tenants, want, PROMPTS, refuse, n_new=a.new_tokens, requests=a.requests,
                                    concurrency=a.concurrency, churn=churn, min_rounds=3)
            rep.update(tp=tp, ready_s=ready, loadavg_before=load0, loadavg_after=os.getloadavg())
        finally:
            srv.stop()
        reports[tp] = rep
        print(f"TP {tp}: " + json.dumps({k: v for k, v in rep.items() if k not in ("problems", "refusal_messages")},
                                        default=str), flush=True)
        for p in rep["problems"][:20]:
            print("  PROBLEM:", p)
    print()
    print("| TP | tenants | requests served (tokens == reference) | refusals (4xx naming the problem) | "
          "404s (tenant unloaded meanwhile) | unloads / reloads / in-place | evictions to host per rank | "
          "p50 / p99 s | /health ok | PIDs kept | problems |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for tp, r in reports.items():
        ev = ", ".join(f"{v}" for _, v in sorted(r["evictions_by_rank"].items()))
        print(f"| {tp} | {r['tenants']} | {r['requests_served']} | {r['refusals_total']} | {r['unload_404']} | "
              f"{r['unloads']} / {r['reloads']} / {r['inplace_reloads']} | {ev} | "
              f"{r['p50_s']:.3f} / {r['p99_s']:.3f} | {r['health_checks'] - r['health_failures']}/{r['health_checks']} | "
              f"{'yes' if not any('processes changed' in p for p in r['problems']) else 'NO'} | {len(r['problems'])} |")
    info = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                machine=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, argv=sys.argv, args=vars(a),
                commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                      text=True).stdout.strip(), vllm_python=py)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(info=info, reports={str(k): v for k, v in reports.items()}), f, indent=2, default=str)
    print(f"wrote {a.out}")
    if any(r["problems"] for r in reports.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
