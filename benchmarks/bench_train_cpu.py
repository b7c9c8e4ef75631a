"""Training step (forward + backward) of MoS vs PEFT LoRA at equal rank, and vs the naive
gather + autograd MoS, side by side in one run (CPU).

Model: a Llama built from a config (no downloads) with LLaMA-like proportions, all seven
projections adapted; batch of --batch x --seq tokens, fp32 (and bf16 autocast).

    python benchmarks/bench_train_cpu.py [--quick]
    python benchmarks/bench_train_cpu.py --trainer      # the Trainer-level row only
Prints a table and writes benchmarks/out/train_cpu.json. Memory: the bytes autograd saves for
backward (activations, each storage once) per method; trainable state is 4 bytes x params x 4
(weights, grads, two AdamW moments).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
import types

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mos_ext
from mos_ext import MoSConfig
from mos_ext.layers import MoSLinear


ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base(args):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=args.hidden, intermediate_size=args.inter,
                      num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                      num_key_value_heads=args.hidden // 64, max_position_embeddings=args.seq)
    return LlamaForCausalLM(cfg)


def naive_delta(self, x, adapter_name):
    """MoS the way the official code computes it: materialize A, B, let autograd scatter
    (replaces MoSLinear.delta of one adapter)."""
    lead = x.shape[:-1]
    xs = x.reshape(-1, self.in_features)
    pa, pb = self.pools(adapter_name)
    r = self.mos_r[adapter_name]
    A = pa[self.mos_idx_a[adapter_name][0].long()].reshape(r, self.in_features).to(xs.dtype)
    Bt = pb[self.mos_idx_b[adapter_name][0].long()].reshape(r, self.out_features).to(xs.dtype)
    return (self.mos_scale[adapter_name] * (xs @ A.T) @ Bt).reshape(*lead, self.out_features)


def saved_bytes(model, ids, autocast):
    """Bytes autograd keeps for backward in one forward (each storage counted once): on CPU,
    where no allocator reports a peak, the activation memory a method adds over the frozen base."""
    seen = {}

    def pack(t):
        if t.device.type != "meta" and t.untyped_storage().nbytes() > 0:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
    # parameters are not activations: drop storages that belong to the model's own tensors
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    del loss
    return sum(n for ptr, n in seen.items() if ptr not in own)


def build_models(a, r, e, only=None):
    """The four models of one row (or just `only`)."""
    import peft

    models = {}
    if only in (None, "peft_lora"):
        models["peft_lora"] = peft.get_peft_model(base(a), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL7))
    cfg = MoSConfig(r=r, equivalent_rank=e, shards_per_vector=4, private_rank=1, lora_alpha=2 * r,
                    target_modules=ALL7)
    # one config object per model: injection fills in its type_layers
    if only in (None, "mos"):
        models["mos"] = peft.get_peft_model(base(a), copy.deepcopy(cfg))
    if only in (None, "mos_naive"):
        models["mos_naive"] = peft.get_peft_model(base(a), copy.deepcopy(cfg))
        for mod in models["mos_naive"].modules():
            if isinstance(mod, MoSLinear):
                mod.delta = types.MethodType(naive_delta, mod)
    if only in (None, "frozen_base"):
        plain = base(a)
        for p in plain.parameters():
            p.requires_grad_(False)
        plain.get_input_embeddings().weight.requires_grad_(True)  # so backward runs through the stack
        models["frozen_base"] = plain
    return models


def _status_bytes(key):
    """A VmRSS / VmHWM line of /proc/self/status in bytes (VmHWM, unlike ru_maxrss, starts afresh
    at exec, so a spawned child does not inherit its parent's high-water mark)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _peak_child(a, r, e, name, autocast, q):
    torch.set_num_threads(1)
    model = build_models(a, r, e, only=name)[name]
    ids = torch.randint(0, 1024, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    before = _status_bytes("VmRSS")
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    q.put(_status_bytes("VmHWM") - before)


def peak_rss_of_step(a, r, e, name, autocast):
    """Peak resident memory a training step adds over the built model (its grads included), in a
    fresh process per model: the high-water mark of the process minus its size before the step."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_peak_child, args=(a, r, e, name, autocast, q))
    proc.start()
    out = q.get(timeout=600)
    proc.join()
    return out


def round_robin_times(models, ids, reps, autocast):
    """Median ms of one forward + backward step per model, the models' steps interleaved."""
    steps = {}
    for name, model in models.items():
        params = [p for p in model.parameters() if p.requires_grad]

        def step(model=model, params=params):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            for p in params:
                p.grad = None

        steps[name] = step
    for step in steps.values():
        step()  # warm-up
    samples = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) * 1e3 for name, v in samples.items()}


def trainer_step_times(a, r, e, rounds, steps):
    """Median ms of one ``transformers.Trainer`` optimizer step (forward, backward, AdamW, zero_grad,
    Trainer's own bookkeeping), MoS vs PEFT LoRA at equal r: each round runs ``steps`` steps of each
    model's Trainer in turn, so both see the same machine load. Step time = on_step_begin to on_step_end."""
    import tempfile

    import peft
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Clock(TrainerCallback):
        def __init__(self):
            self.samples, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.samples.append(time.perf_counter() - self.t0)

    g = torch.Generator().manual_seed(0)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 1024, (a.batch * steps, a.seq), generator=g)]
    models = {
        "peft_lora": peft.get_peft_model(base(a), peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=ALL7)),
        "mos": peft.get_peft_model(base(a), MoSConfig(r=r, equivalent_rank=e, shards_per_vector=4, private_rank=1,
                                                      lora_alpha=2 * r, target_modules=ALL7)),
    }
    clocks = {k: Clock() for k in models}
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {
            k: Trainer(model=m, args=TrainingArguments(output_dir=os.path.join(tmp, k), max_steps=steps,
                                                       per_device_train_batch_size=a.batch, learning_rate=1e-4,
                                                       logging_strategy="no", save_strategy="no", report_to=[],
                                                       use_cpu=True, dataloader_num_workers=0, disable_tqdm=True),
                       train_dataset=data, callbacks=[clocks[k]])
            for k, m in models.items()}
        for k in trainers:  # warm-up round, not timed
            trainers[k].train()
            clocks[k].samples.clear()
        for _ in range(rounds):
            for k in trainers:
                trainers[k].train()
    params = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
    return {k: statistics.median(c.samples) * 1e3 for k, c in clocks.items()}, params, {k: len(c.samples)
                                                                                         for k, c in clocks.items()}


def trainer_main(a):
    r, e = a.trainer_r, a.trainer_e
    times, params, n = trainer_step_times(a, r, e, a.trainer_rounds, a.trainer_steps)
    ratio = times["mos"] / times["peft_lora"]
    print(f"Trainer step, fp32, r={r} (MoS e={e} l=4 p=1), {a.batch}x{a.seq} tokens, {torch.get_num_threads()} "
          f"thread(s): peft-lora {times['peft_lora']:.1f} ms ({params['peft_lora']:,} p)  mos {times['mos']:.1f} ms "
          f"({params['mos']:,} p)  mos/lora {ratio:.3f}x  (median of {n['mos']} steps each)", flush=True)
    out = a.out or os.path.join(os.path.dirname(__file__), "out", "train_cpu_trainer.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), threads=torch.get_num_threads(), torch=torch.__version__,
                model=dict(hidden=a.hidden, inter=a.inter, layers=a.layers, batch=a.batch, seq=a.seq),
                command="python " + " ".join(sys.argv))
    row = dict(r=r, e=e, steps_timed=n, **{f"{k}_ms": v for k, v in times.items()},
               **{f"{k}_params": v for k, v in params.items()}, mos_over_lora=ratio)
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=[row]), f, indent=1)
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--trainer", action="store_true",
                    help="only the Trainer-level row: a transformers.Trainer step of MoS vs PEFT LoRA at equal r")
    ap.add_argument("--trainer-r", type=int, default=16)
    ap.add_argument("--trainer-e", type=int, default=4)
    ap.add_argument("--trainer-rounds", type=int, default=5)
    ap.add_argument("--trainer-steps", type=int, default=3, help="steps per model per round")
    ap.add_argument("--out", default=None, help="JSON path of the --trainer row")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.trainer:
        trainer_main(a)
        return
    reps = 3 if a.quick else 7

    ids = torch.randint(0, 1024, (a.batch, a.seq), generator=torch.Generator().manual_seed(0))
    rows = []
    for autocast in (False, True):
        for r in (8, 16, 32):
            e = max(r // 4, 1)
            models = build_models(a, r, e)
            times = round_robin_times(models, ids, reps, autocast)
            params = {k: sum(p.numel() for p in m.parameters() if p.requires_grad) for k, m in models.items()}
            params["frozen_base"] = 0
            res = {k: (times[k], params[k]) for k in models}
            mem = {k: saved_bytes(m, ids, autocast) for k, m in models.items()}
            del models
            peak = {k: peak_rss_of_step(a, r, e, k, autocast) for k in res}
            row = dict(autocast_bf16=autocast, r=r, e=e, tokens=a.batch * a.seq,
                       **{f"{k}_ms": v[0] for k, v in res.items()}, **{f"{k}_params": v[1] for k, v in res.items()},
                       **{f"{k}_saved_MB": v / 2**20 for k, v in mem.items()},
                       **{f"{k}_step_peak_rss_MB": v / 2**20 for k, v in peak.items()})
            row["mos_over_lora"] = res["mos"][0] / res["peft_lora"][0]
            row["naive_over_mos"] = res["mos_naive"][0] / res["mos"][0]
            rows.append(row)
            print(f"{'bf16-autocast' if autocast else 'fp32':13s} r={r:2d} e={e}: peft-lora {res['peft_lora'][0]:8.1f} ms "
                  f"({res['peft_lora'][1]:,} p)  mos {res['mos'][0]:8.1f} ms ({res['mos'][1]:,} p)  "
                  f"naive-mos {res['mos_naive'][0]:8.1f} ms  frozen base {res['frozen_base'][0]:8.1f} ms  "
                  f"mos/lora {row['mos_over_lora']:.2f}x | saved for backward MB: lora {mem['peft_lora'] / 2**20:.1f} "
                  f"mos {mem['mos'] / 2**20:.1f} naive {mem['mos_naive'] / 2**20:.1f} base {mem['frozen_base'] / 2**20:.1f} | "
                  f"step peak RSS MB: lora {peak['peft_lora'] / 2**20:.1f} mos {peak['mos'] / 2**20:.1f} "
                  f"naive {peak['mos_naive'] / 2**20:.1f} base {peak['frozen_base'] / 2**20:.1f}",
                  flush=True)
    out = os.path.join(os.path.dirname(__file__), "out", "train_cpu.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), threads=torch.get_num_threads(), torch=torch.__version__,
                model=dict(hidden=a.hidden, inter=a.inter, layers=a.layers, batch=a.batch, seq=a.seq),
                cpu_dense_min_tokens=mos_ext.cpu_dense_min_tokens(),
                command="python " + " ".join(sys.argv))
    with open(out, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
