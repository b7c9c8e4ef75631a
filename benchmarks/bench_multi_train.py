"""Many tenants trained in one batch (mos_ext.multi_train) vs the same tenants one after another, and vs
N separate PEFT LoRA jobs one after another (issue 22, item 5).

N tenants (a mix of MoS r=8, MoS r=4, LoRA-as-shards r=4, MiSS r=4), b rows of `--seq` tokens each,
a Llama built from a config (no downloads), all seven projections adapted, fp32:

* joint: one JointTraining step over all N*b rows (per-tenant loss, AdamW, step);
* one-by-one: the same tenants, PEFT's one-adapter MoS forward on each tenant's b rows, its own AdamW;
* peft-lora: PEFT LoRA r=8 steps on b rows, N of them one after another (one job's step repeated N times:
  N jobs run back to back, the base loaded once per job not counted).

Tokens/s = N*b*seq / time of one round (every tenant one step), median over `--steps` rounds after one
warm-up. Memory: bytes autograd saves for backward (each storage once) per round's largest step, plus
trainable state (pools, grads, two AdamW moments); on CUDA also torch.cuda.max_memory_allocated.

    python benchmarks/bench_multi_train.py [--quick] [--device cuda]
Writes benchmarks/out/multi_train_<device>.json and benchmarks/multi_train_<device>.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mos_ext
from mos_ext.multi_train import JointTraining, TenantSettings, token_losses

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _plot import pyplot  # noqa: E402

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
KINDS = [dict(r=8, equivalent_rank=6, shards_per_vector=4, private_rank=1, lora_alpha=16),
         dict(r=4, equivalent_rank=4, shards_per_vector=2, private_rank=1, lora_alpha=8),
         dict(method="lora", r=4, lora_alpha=8),
         dict(method="miss", r=4)]
SHAPES = {"tiny": dict(hidden=128, inter=344, layers=2, heads=2), "wide": dict(hidden=512, inter=1376, layers=2, heads=8)}


def base(shape, device, seq):
    torch.manual_seed(0)
    s = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=512, hidden_size=s["hidden"], intermediate_size=s["inter"], num_hidden_layers=s["layers"],
                      num_attention_heads=s["heads"], num_key_value_heads=s["heads"], max_position_embeddings=seq)
    return LlamaForCausalLM(cfg).to(device)


def mos_model(shape, n, device, seq):
    import peft
    pm = None
    for i in range(n):
        cfg = mos_ext.MoSConfig(target_modules=ALL7, task_type="CAUSAL_LM", seed=i, **KINDS[i % len(KINDS)])
        if pm is None:
            pm = peft.get_peft_model(base(shape, device, seq), cfg, adapter_name=f"t{i}")
        else:
            pm.add_adapter(f"t{i}", cfg)
    return pm


class SavedBytes:
    """Bytes autograd saves for backward, each storage once."""

    def __init__(self):
        self.seen, self.bytes = set(), 0

    def pack(self, t):
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), st.nbytes())
            if key not in self.seen:
                self.seen.add(key)
                self.bytes += st.nbytes()
        except Exception:
            pass
        return t

    def ctx(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


def state_bytes(params):
    return sum(p.numel() * p.element_size() for p in params) * 4  # weight, grad, two AdamW moments


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def batches(n, b, seq, rounds, device):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(1, 512, (n * b, seq), generator=g).to(device) for _ in range(rounds)]


def bench_joint(shape, n, b, seq, rounds, device):
    pm = mos_model(shape, n, device, seq)
    joint = JointTraining(pm)
    for i in range(n):
        joint.add_tenant(f"t{i}", TenantSettings(lr=1e-3))
    who = [f"t{i}" for i in range(n) for _ in range(b)]
    times, sb = [], 0
    for k, ids in enumerate(batches(n, b, seq, rounds + 1, device)):
        saved = SavedBytes()
        sync(device)
        t0 = time.perf_counter()
        with saved.ctx():
            joint.train_step(ids, labels=ids, adapter_names=who)
        sync(device)
        if k:
            times.append(time.perf_counter() - t0)
        sb = max(sb, saved.bytes)
    params = [p for t in joint.tenants.values() for p in t.params]
    return statistics.median(times), sb, state_bytes(params)


def bench_one_by_one(shape, n, b, seq, rounds, device):
    pm = mos_model(shape, n, device, seq)
    opts = {}
    for i in range(n):
        pm.base_model.set_adapter(f"t{i}")
        opts[i] = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-3)
    pm.train()
    times, sb, params = [], 0, []
    for k, ids in enumerate(batches(n, b, seq, rounds + 1, device)):
        sync(device)
        t0 = time.perf_counter()
        for i in range(n):
            pm.base_model.set_adapter(f"t{i}")
            rows = ids[i * b:(i + 1) * b]
            saved = SavedBytes()
            with saved.ctx():
                rs, rc = token_losses(pm(input_ids=rows).logits, rows)
            (rs.sum() / rc.sum()).backward()
            opts[i].step()
            opts[i].zero_grad(set_to_none=True)
            sb = max(sb, saved.bytes)
        sync(device)
        if k:
            times.append(time.perf_counter() - t0)
    params = [p for o in opts.values() for g in o.param_groups for p in g["params"]]
    return statistics.median(times), sb, state_bytes(params)


def bench_peft_lora(shape, n, b, seq, rounds, device):
    import peft
    pm = peft.get_peft_model(base(shape, device, seq), peft.LoraConfig(r=8, lora_alpha=16, target_modules=ALL7,
                                                                         task_type="CAUSAL_LM"))
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    pm.train()
    times, sb = [], 0
    for k, ids in enumerate(batches(n, b, seq, rounds + 1, device)):
        sync(device)
        t0 = time.perf_counter()
        for i in range(n):
            rows = ids[i * b:(i + 1) * b]
            saved = SavedBytes()
            with saved.ctx():
                rs, rc = token_losses(pm(input_ids=rows).logits, rows)
            (rs.sum() / rc.sum()).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sb = max(sb, saved.bytes)
        sync(device)
        if k:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), sb, state_bytes(params) * n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tenants", default="1,4,16,64")
    ap.add_argument("--shapes", default="tiny,wide")
    ap.add_argument("--b", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="N = 1, 4, 16 on the tiny shape, 2 rounds")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.quick:
        a.tenants, a.shapes, a.steps = "1,4,16", "tiny", 2
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for shape in a.shapes.split(","):
        for n in [int(v) for v in a.tenants.split(",")]:
            tok = n * a.b * a.seq
            res = {}
            for what, fn in (("joint", bench_joint), ("one_by_one", bench_one_by_one), ("peft_lora", bench_peft_lora)):
                if a.device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                t, sb, st = fn(shape, n, a.b, a.seq, a.steps, a.device)
                res[what] = dict(seconds=t, tokens_per_s=tok / t, saved_bytes=sb, state_bytes=st,
                                 cuda_peak=torch.cuda.max_memory_allocated() if a.device.startswith("cuda") else None)
            row = dict(shape=shape, tenants=n, b=a.b, seq=a.seq, **res,
                       joint_vs_one_by_one=res["joint"]["tokens_per_s"] / res["one_by_one"]["tokens_per_s"],
                       joint_vs_peft_lora=res["joint"]["tokens_per_s"] / res["peft_lora"]["tokens_per_s"])
            rows.append(row)
            print(f"{shape:5s} N={n:3d} joint {res['joint']['tokens_per_s']:9.0f} tok/s | one-by-one "
                  f"{res['one_by_one']['tokens_per_s']:9.0f} | peft-lora {res['peft_lora']['tokens_per_s']:9.0f} | "
                  f"joint/one-by-one {row['joint_vs_one_by_one']:.2f}x | saved MiB joint "
                  f"{res['joint']['saved_bytes'] / 2**20:.1f} vs one tenant {res['one_by_one']['saved_bytes'] / 2**20:.1f}",
                  flush=True)
    here = os.path.dirname(os.path.abspath(__file__))
    dev = a.device.split(":")[0]
    out = a.out or os.path.join(here, "out", f"multi_train_{dev}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = dict(torch=torch.__version__, threads=torch.get_num_threads(), device=a.device, args=vars(a))
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print("wrote", out)
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(a.shapes.split(",")), figsize=(6 * len(a.shapes.split(",")), 4), squeeze=False)
    for ax, shape in zip(axes[0], a.shapes.split(",")):
        rs = [r for r in rows if r["shape"] == shape]
        ns = [r["tenants"] for r in rs]
        for what in ("joint", "one_by_one", "peft_lora"):
            ax.plot(ns, [r[what]["tokens_per_s"] for r in rs], marker="o", label=what)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("tenants N")
        ax.set_ylabel("tokens/s")
        ax.set_title(f"{shape}, b={a.b} rows x {a.seq} tokens, {dev}")
        ax.legend()
    png = os.path.join(here, f"multi_train_{dev}.png")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print("wrote", png)


if __name__ == "__main__":
    main()
