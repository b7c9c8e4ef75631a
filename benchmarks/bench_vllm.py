"""vLLM serving: vLLM's own LoRA path vs MoS adapters held compressed (the mos_ext plugin).

Same base, same request mix, 8 / 64 / 256 distinct tenants. Each tenant is one MoS adapter
(``peft.get_peft_model(base, MoSConfig(r=16, e=2, ...))``, ``save_pretrained``); the baseline serves
the same tenants exported to PEFT LoRA rank 16 with ``mos_ext.export_lora`` (equal rank, equal
outputs) on vLLM with the plugin off (``MOS_EXT_VLLM_PLUGIN=0``). Both servers get the same flags.

Measured: tokens/s and per-request latency p50/p99 over the OpenAI completions API (both servers
up at once, the modes alternating, median of ``--repeats`` runs); device bytes
per tenant (vLLM: the LoRA weights it holds per registered adapter, the exported safetensors size;
MoS: the store's pool rows + the tenant's slot (map rows, scale) + its share of the int32 tables, which
tenants of one recipe share, from an AdapterStore built like the plugin's); tenants resident in a fixed
budget; and whether base-model requests
batched with adapter requests (every slot in use) still get the base model's greedy tokens.

    python benchmarks/bench_vllm.py                    # CPU; vLLM python from $MOS_EXT_VLLM_PYTHON
    python benchmarks/bench_vllm.py --tenants 8 --requests 32    # quick
    python benchmarks/bench_vllm.py --tp 2                       # both servers at --tensor-parallel-size 2
    python benchmarks/bench_vllm.py --memory-only                # bytes per tenant only (no vLLM needed)

At ``--tp N`` both servers run vLLM's tensor parallelism (N worker processes; on the CPU build their
threads bound one core each, ``VLLM_CPU_OMP_THREADS_BIND="0|1"``); vLLM's LoRA path splits its slots as
its LoRA layers do, the plugin's store holds each rank's share. The JSON and PNG names get ``_tp{N}``.

Prints a table, writes JSON (``--out``) and a PNG (``--png``).
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import vllm_util as U  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _plot import pyplot  # noqa: E402


def parse():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tenants", default="8,64,256", help="comma-separated distinct-tenant counts")
    ap.add_argument("--requests", type=int, default=128, help="requests per tenant count")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight (also --max-num-seqs)")
    ap.add_argument("--max-loras", type=int, default=16, help="vLLM --max-loras for both servers")
    ap.add_argument("--repeats", type=int, default=3, help="runs of the mix per mode and tenant count (median kept)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16, help="MoS rank r = the exported LoRA's rank")
    ap.add_argument("--e", type=int, default=2, help="MoS equivalent rank")
    ap.add_argument("--budget-gb", type=float, default=1.0, help="memory budget for 'tenants resident'")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "out", "bench_vllm.json"))
    ap.add_argument("--png", default=os.path.join(ROOT, "benchmarks", "vllm_cpu.png"))
    ap.add_argument("--tp", type=int, default=1, help="--tensor-parallel-size of both servers")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--memory-tenants", type=int, default=8, help="tenants of one recipe loaded for the byte count")
    ap.add_argument("--memory-only", action="store_true",
                    help="only the bytes-per-tenant table (no servers, no vLLM environment needed)")
    a = ap.parse_args()
    try:
        a.tenant_counts = [int(t) for t in a.tenants.split(",") if t.strip()]
    except ValueError:
        ap.error(f"--tenants must be comma-separated integers, got {a.tenants!r}")
    if not a.tenant_counts or min(a.tenant_counts) < 1:
        ap.error(f"--tenants needs positive counts, got {a.tenants!r}")
    if a.tp > 1:  # default output names get the TP size; names given explicitly are kept
        root_out = os.path.join(ROOT, "benchmarks", "out", "bench_vllm.json")
        if a.out == root_out:
            a.out = root_out.replace(".json", f"_tp{a.tp}.json")
        if a.png == os.path.join(ROOT, "benchmarks", "vllm_cpu.png"):
            a.png = a.png.replace(".png", f"_tp{a.tp}.png")
    for k in ("requests", "concurrency", "max_loras", "repeats", "prompt_len", "new_tokens", "rank", "e", "tp"):
        if getattr(a, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    return a


def make_adapters(a, work):
    """Base model dir; per tenant a MoS dir (save_pretrained) and its PEFT LoRA export."""
    import peft

    import mos_ext
    from mos_ext import MoSConfig

    cfg = U.llama_config(hidden=a.hidden, inter=2 * a.hidden, layers=a.layers, vocab=1024, heads=8, kv_heads=4)
    cfg.initializer_range = 0.1
    base_dir = os.path.join(work, "base")
    if not os.path.isdir(base_dir):
        U.save_base(base_dir, cfg)
    n = max(a.tenant_counts)
    mcfg = MoSConfig(r=a.rank, equivalent_rank=a.e, shards_per_vector=8, private_rank=0, lora_alpha=2 * a.rank,
                     target_modules=U.ALL7, seed=1)
    pm = peft.get_peft_model(U.base_model(cfg), copy.deepcopy(mcfg))
    pools = pm.base_model.pools("default")
    mos, lora = [], []
    t0 = time.time()
    for i in range(n):
        d_m, d_l = os.path.join(work, f"mos_{i}"), os.path.join(work, f"lora_{i}")
        if not os.path.isdir(d_l):
            g = torch.Generator().manual_seed(1000 + i)  # a different adapter per tenant (same tables, new pools)
            with torch.no_grad():
                for k, p in pools.items():
                    p.copy_(torch.randn(p.shape, generator=g) * (0.3 if k.startswith("mos_B_") else 0.05))
            pm.save_pretrained(d_m)
            mos_ext.export_lora(pm, d_l)
        mos.append(d_m)
        lora.append(d_l)
    print(f"adapters: {n} MoS + {n} exported LoRA in {time.time() - t0:.0f}s", flush=True)
    return cfg, base_dir, mos, lora


def memory(a, cfg, mos_dirs, lora_dir):
    """Device bytes per tenant, every byte counted: MoS in an AdapterStore laid out as the plugin's
    (``--memory-tenants`` tenants of one recipe loaded, ``max_tables=1``: they share one table); LoRA
    as vLLM holds it (the exported rank-r weights). Tenants resident in the budget and bytes per tenant
    there: MoS (budget - the store's tables) // (pool rows + slot), its tables shared by all of them."""
    from mos_ext.serving import AdapterStore

    h, inter = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, inter),
              "up_proj": (h, inter), "down_proj": (inter, h)}
    dims = {f"model.layers.{i}.{'self_attn' if t in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{t}": s
            for i in range(cfg.num_hidden_layers) for t, s in shapes.items()}
    k = len(mos_dirs)
    store = AdapterStore(layer_dims=dims, capacity_bytes=(k + 2) * 4 << 20, max_tenants=k + 1, max_tables=1,
                         max_rank=a.rank, dtype=torch.float32)
    for i, d in enumerate(mos_dirs):
        store.load(f"mos{i}", d)
    assert store.tables_in_use() == 1, "tenants of one recipe did not share their table"
    pools = store.memory_bytes("mos0")
    measured = store.tenant_bytes("mos0")  # pools + slot + a k-th of the table, as loaded
    from safetensors import safe_open

    with safe_open(os.path.join(lora_dir, "adapter_model.safetensors"), "pt") as f:
        lora_bytes = sum(f.get_tensor(n).numel() * 4 for n in f.keys())
    budget = int(a.budget_gb * (1 << 30))

    def row(pool_b, table_b, slot_b, lora_b):
        fixed = 2 * table_b  # max_tables=1 plus the empty table 0, allocated once
        n = (budget - fixed) // (pool_b + slot_b)
        per = pool_b + slot_b + fixed / n
        return dict(mos_pool_bytes=pool_b, table_bytes=table_b, slot_bytes=slot_b, store_table_bytes=fixed,
                    tenants_in_budget_mos=int(n), mos_bytes=per, lora_bytes=lora_b,
                    tenants_in_budget_lora=budget // lora_b, tenants_per_gb_ratio=lora_b / per,
                    pools_only_ratio=lora_b / pool_b, own_table_ratio=lora_b / (pool_b + table_b + slot_b))

    out = row(pools, store.table_bytes(), store.slot_bytes(), lora_bytes)
    out.update(measured_tenant_bytes=measured, measured_with_tenants=k)
    # the same accounting at LLaMA-2-7B shapes (h=4096, I=11008, 32 layers, all 7 projections), fp16:
    # pools e*L*sum(h+o) and r*L*sum(h+o) elements, one table 2 * max_rank * slots int32 per layer
    s7 = 2 * 4096 * 4 + 3 * (4096 + 11008)
    out["llama7b"] = row(a.e * 32 * s7 * 2, 32 * 7 * 2 * a.rank * store.slots * 4, store.slot_bytes(),
                         a.rank * 32 * s7 * 2)
    return out


def print_memory(a, mem):
    print("| shapes | LoRA r=%d bytes/tenant | MoS e=%d bytes/tenant (pools + slot + share of tables) | "
          "tenants in %.1f GB: LoRA | MoS | tenants/GB ratio | with a table per tenant |" % (a.rank, a.e, a.budget_gb))
    print("|---|---|---|---|---|---|---|")
    for label, m in (("this base (fp32)", mem), ("LLaMA-2-7B, fp16 (computed)", mem["llama7b"])):
        share = m["store_table_bytes"] / m["tenants_in_budget_mos"]
        print(f"| {label} | {m['lora_bytes']:,} | {m['mos_bytes']:,.0f} ({m['mos_pool_bytes']:,} + {m['slot_bytes']} + "
              f"{share:,.0f}) | {m['tenants_in_budget_lora']:,} | {m['tenants_in_budget_mos']:,} | "
              f"{m['tenants_per_gb_ratio']:.3f}x ({m['pools_only_ratio']:.2f}x pools only) | "
              f"{m['own_table_ratio']:.2f}x |")
    print(f"measured in the store: {mem['measured_with_tenants']} tenants of one recipe loaded hold 1 table; "
          f"tenant_bytes = {mem['measured_tenant_bytes']:,.0f} (pools {mem['mos_pool_bytes']:,} + slot "
          f"{mem['slot_bytes']} + table {mem['table_bytes']:,} / {mem['measured_with_tenants']})")


def start_server(a, mode, base_dir, dirs, py, work):
    """A server for ``mode`` ("lora": plugin off, exported LoRA dirs; "mos": plugin on), every adapter loaded."""
    env = {"MOS_EXT_VLLM_PLUGIN": "0"} if mode == "lora" else {
        "MOS_EXT_VLLM_PLUGIN": "1", "MOS_EXT_VLLM_CAPACITY_MB": "1024",
        "MOS_EXT_VLLM_MAX_TENANTS": str(max(a.tenant_counts) + 8), "MOS_EXT_VLLM_MAX_RANK": str(a.rank)}
    extra = ["--max-num-seqs", str(a.concurrency)]
    if a.tp > 1:
        extra += ["--tensor-parallel-size", str(a.tp)]
        cores = os.cpu_count() or a.tp
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(i % cores) for i in range(a.tp))  # one core per rank
    cpu_loras = max(max(a.tenant_counts), a.max_loras)  # vLLM wants max_cpu_loras >= max_loras
    srv = U.Server(py, base_dir, max_loras=a.max_loras, max_lora_rank=a.rank, max_cpu_loras=cpu_loras, env=env,
                   log_path=os.path.join(work, f"server_{mode}_tp{a.tp}.log"), extra=extra)
    return srv


def load_all(srv, mode, dirs):
    t0 = time.time()
    for i, d in enumerate(dirs):
        st, body = srv.post("/v1/load_lora_adapter", {"lora_name": f"t{i}", "lora_path": d})
        if st != 200:
            raise RuntimeError(f"{mode}: loading t{i} failed: {st} {body}")
    return time.time() - t0


def run_mix(a, srv, n, prompts):
    """The request mix against one server: request i for tenant i mod n, a.concurrency in flight."""
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=600, max_retries=0)

    def one(i):
        t = time.perf_counter()
        r = client.completions.create(model=f"t{i % n}", prompt=[prompts[i]], max_tokens=a.new_tokens,
                                      temperature=0, extra_body={"ignore_eos": True})
        return time.perf_counter() - t, r.usage.completion_tokens

    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(a.concurrency) as ex:
        outs = list(ex.map(one, range(len(prompts))))
    wall = time.perf_counter() - t0
    lat = sorted(o[0] for o in outs)
    toks = sum(o[1] for o in outs)
    return dict(tokens_per_s=toks / wall, p50_s=statistics.median(lat),
                p99_s=lat[min(len(lat) - 1, int(round(0.99 * (len(lat) - 1))))], wall_s=wall, tokens=toks)


def base_isolation(a, srv, prompts, rounds=3):
    """Base-model requests batched with adapter requests while every adapter slot is in use: how many of
    their greedy outputs equal the same prompts served alone (vLLM 0.32's CPU LoRA ops treat the base
    index -1 as the last slot then)."""
    import openai

    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=600, max_retries=0)

    def gen(model, p):
        r = client.completions.create(model=model, prompt=[p], max_tokens=a.new_tokens, temperature=0,
                                      extra_body={"ignore_eos": True, "return_token_ids": True})
        return list(r.choices[0].token_ids)

    base_prompts = prompts[:4]
    alone = [gen("base", p) for p in base_prompts]
    same = total = 0
    for rnd in range(rounds):
        with cf.ThreadPoolExecutor(a.concurrency + len(base_prompts)) as ex:
            tenant_jobs = [ex.submit(gen, f"t{(rnd * a.max_loras + k) % max(a.tenant_counts)}", prompts[k % len(prompts)])
                           for k in range(a.max_loras)]
            base_jobs = [ex.submit(gen, "base", p) for p in base_prompts]
            for j, f in enumerate(base_jobs):
                same += int(f.result() == alone[j])
                total += 1
            for f in tenant_jobs:
                f.result()
    return dict(base_equal_alone=same, base_requests=total)


def run_all(a, base_dir, dirs_by_mode, py, work):
    """Both servers up at once; for each tenant count the two modes alternate, ``a.repeats`` times each
    (a shared machine's load drifts: alternating gives both the same conditions); medians are kept."""
    modes = list(dirs_by_mode)
    srvs = {m: start_server(a, m, base_dir, dirs_by_mode[m], py, work) for m in modes}
    out = {m: dict(by_tenants={}) for m in modes}
    try:
        for m in modes:
            out[m]["ready_s"] = srvs[m].wait_ready(timeout=900)
        for m in modes:
            out[m]["load_all_s"] = load_all(srvs[m], m, dirs_by_mode[m])
            last = {}
            for rk, res, used, free, pool, ev, host in U.store_lines(srvs[m].tail(10 ** 7)):
                last[rk] = dict(resident=res, used_bytes=used, pool_bytes=pool, evictions=ev)
            if last:  # the plugin's store on each worker after loading every tenant
                out[m]["store_by_rank"] = last
                print(f"  {m}: store per rank after loading all: " + "; ".join(
                    f"rank {k}: {v['resident']} resident, {v['used_bytes'] / max(1, v['resident']):,.0f} B/tenant"
                    for k, v in sorted(last.items())), flush=True)
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(3, 1000, (a.requests, a.prompt_len), generator=g).tolist()
        for m in modes:  # warm-up
            run_mix(a, srvs[m], 1, prompts[: min(4, a.requests)])
        for n in a.tenant_counts:
            reps = {m: [] for m in modes}
            for r in range(a.repeats):
                for m in (modes if r % 2 == 0 else modes[::-1]):
                    reps[m].append(run_mix(a, srvs[m], n, prompts))
                    x = reps[m][-1]
                    print(f"  {m:5s} {n:4d} tenants, run {r}: {x['tokens_per_s']:8.1f} tok/s  p50 {x['p50_s']:.3f}s  "
                          f"p99 {x['p99_s']:.3f}s", flush=True)
            for m in modes:
                runs = sorted(reps[m], key=lambda x: x["tokens_per_s"])
                med = dict(runs[len(runs) // 2])
                med["all_tokens_per_s"] = [x["tokens_per_s"] for x in reps[m]]
                out[m]["by_tenants"][n] = med
        for m in modes:
            out[m]["isolation"] = base_isolation(a, srvs[m], prompts)
            iso = out[m]["isolation"]
            print(f"  {m:5s} base requests in mixed batches (all slots full) equal to base alone: "
                  f"{iso['base_equal_alone']}/{iso['base_requests']}", flush=True)
        return out
    finally:
        for s_ in srvs.values():
            s_.stop()


def main():
    a = parse()
    if a.memory_only:
        a.tenant_counts = [a.memory_tenants]
        a.out = a.out.replace(".json", "_memory.json")
    py = None if a.memory_only else U.bench_vllm_python()
    work = a.workdir or tempfile.mkdtemp(prefix="bench_vllm_")
    os.makedirs(work, exist_ok=True)
    cfg, base_dir, mos, lora = make_adapters(a, work)
    mem = memory(a, cfg, mos[:a.memory_tenants], lora[0])
    if a.memory_only:
        print_memory(a, mem)
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(dict(info=dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), argv=sys.argv),
                           memory=mem), f, indent=2)
        print(f"wrote {a.out}")
        return
    print(f"== lora: vLLM's own LoRA path (plugin off) | mos: vLLM with the mos_ext plugin; alternating; TP {a.tp}",
          flush=True)
    runs = run_all(a, base_dir, {"lora": lora, "mos": mos}, py, work)
    budget = int(a.budget_gb * (1 << 30))
    rows = []
    for n in a.tenant_counts:
        lo, mo = runs["lora"]["by_tenants"][n], runs["mos"]["by_tenants"][n]
        rows.append(dict(tenants=n, lora_tok_s=lo["tokens_per_s"], mos_tok_s=mo["tokens_per_s"],
                         ratio=mo["tokens_per_s"] / lo["tokens_per_s"], lora_p50=lo["p50_s"], lora_p99=lo["p99_s"],
                         mos_p50=mo["p50_s"], mos_p99=mo["p99_s"]))
    print()
    print(f"TP {a.tp}:")
    print(f"| tenants | vLLM LoRA tok/s | MoS tok/s | MoS/LoRA | LoRA p50 / p99 s | MoS p50 / p99 s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tenants']} | {r['lora_tok_s']:.1f} | {r['mos_tok_s']:.1f} | {r['ratio']:.2f}x | "
              f"{r['lora_p50']:.3f} / {r['lora_p99']:.3f} | {r['mos_p50']:.3f} / {r['mos_p99']:.3f} |")
    print()
    print("base-model requests batched with adapter requests, every slot in use, equal to base alone: "
          + ", ".join(f"{m} {runs[m]['isolation']['base_equal_alone']}/{runs[m]['isolation']['base_requests']}"
                      for m in runs))
    print()
    print_memory(a, mem)
    info = dict(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), machine=platform.processor() or platform.machine(),
                cpus=os.cpu_count(), torch=torch.__version__, argv=sys.argv, args={k: v for k, v in vars(a).items()},
                commit=subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                      text=True).stdout.strip(),
                vllm_python=py)
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(dict(info=info, rows=rows, runs={k: {**v, "by_tenants": {str(n): r for n, r in v["by_tenants"].items()}}
                                                  for k, v in runs.items()}, memory=mem), f, indent=2)
    print(f"wrote {a.out}")
    plt = pyplot() if a.png else None
    if plt is not None:
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
        xs = [r["tenants"] for r in rows]
        ax[0].plot(xs, [r["lora_tok_s"] for r in rows], "o-", label=f"vLLM LoRA r={a.rank}")
        ax[0].plot(xs, [r["mos_tok_s"] for r in rows], "s-", label=f"MoS r={a.rank}, e={a.e} (compressed)")
        ax[0].set_xscale("log", base=2)
        ax[0].set_xlabel("distinct tenants")
        ax[0].set_ylabel("generated tokens / s")
        ax[0].set_ylim(bottom=0)
        ax[0].legend()
        ax[0].set_title(f"throughput (CPU, shared 2 cores, TP {a.tp})")
        labels = ["this base", "LLaMA-2-7B fp16"]
        vals = [(mem["tenants_in_budget_lora"], mem["tenants_in_budget_mos"]),
                (mem["llama7b"]["tenants_in_budget_lora"], mem["llama7b"]["tenants_in_budget_mos"])]
        xi = range(len(labels))
        ax[1].bar([i - 0.2 for i in xi], [v[0] for v in vals], 0.4, label=f"LoRA r={a.rank}")
        ax[1].bar([i + 0.2 for i in xi], [v[1] for v in vals], 0.4, label=f"MoS e={a.e}")
        ax[1].set_xticks(list(xi), labels)
        ax[1].set_yscale("log")
        ax[1].set_ylabel(f"tenants resident in {a.budget_gb:g} GB")
        ax[1].legend()
        fig.tight_layout()
        fig.savefig(a.png, dpi=110)
        print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
