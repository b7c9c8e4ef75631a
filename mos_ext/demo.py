"""The main job, end to end: train a few tenants, save them at their compressed size, load them
into one AdapterStore and serve them together in one mixed batch.

    python -m mos_ext.demo [--steps 40] [--device cpu|cuda] [--out DIR]

Embedded default: a tiny Llama built from a config (no downloads), three MoS tenants and a
LoRA tenant of the same rank (twice the parameters), each fine-tuned briefly on its own built-in toy task. Prints:
parameters and bytes per tenant, how many tenants fit in 1 GB / 80 GB at LLaMA2-7B shapes,
mixed-batch throughput against a per-tenant loop, and the isolation check (every sequence of
the mixed batch equals its tenant served alone).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import torch

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VOCAB = 96

# LLaMA2-7B: (h, o) of the seven projections, 32 layers
LLAMA2_7B = dict(layers=32, dims=[(4096, 4096)] * 4 + [(4096, 11008)] * 2 + [(11008, 4096)])


def tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      initializer_range=0.2)
    return LlamaForCausalLM(cfg)


# Built-in toy tasks: each tenant learns its own rule, "next token = token + k (mod vocab)".
def task_batch(task: str, seed: int, n=16, t=24):
    k = {"add3": 3, "sub2": -2, "add5": 5, "add1": 1}[task]
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    return (start + k * torch.arange(t)) % VOCAB


TENANTS = [  # name, task, method kwargs (MoS tenants have half the parameters of the LoRA one)
    ("mos-add3", "add3", dict(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1)),
    ("mos-sub2", "sub2", dict(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1)),
    ("mos-add5", "add5", dict(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1)),
    ("lora-add1", "add1", dict(r=4, method="lora")),
]


def per_tenant_7b(method: str, r: int, e: int = 0, l: int = 4, bytes_per=2, own_table: bool = False) -> int:
    """Bytes of one tenant at LLaMA2-7B shapes: bf16 pools, plus for MoS the store slot (int32 map
    rows and fp32 scale) and, with ``own_table``, a table of its own (int32, ``2 r l`` per layer);
    tenants of one recipe share their table (docs/OPS.md), which then costs them ~nothing each."""
    L = LLAMA2_7B["layers"]
    hw = sum(h + o for h, o in LLAMA2_7B["dims"])
    if method == "lora":
        return r * L * hw * bytes_per
    slot = 7 * 2 * 2 * 4 + 4
    tables = 7 * L * 2 * r * l * 4 if own_table else 0
    return e * L * hw * bytes_per + slot + tables


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="joint fine-tuning steps (each trains every tenant on its own rows)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="where adapters are saved (default: a temp dir)")
    a = ap.parse_args(argv)
    from tqdm.auto import tqdm

    import peft

    from . import MoSConfig
    from .multi_train import JointTraining, TenantSettings
    from .serving import AdapterStore, MultiTenantModel

    dev = torch.device(a.device)
    out_dir = a.out or tempfile.mkdtemp(prefix="mos_demo_")
    t_start = time.time()
    print(f"mos_ext demo on {dev}: tiny Llama (4 layers, hidden 128), {len(TENANTS)} tenants -> {out_dir}\n")

    # ---- 1. fine-tune all tenants together (one batch of every tenant's rows per step, each with its own
    # mean loss, AdamW and clipping: mos_ext.multi_train), save each at its compressed size
    rows = []
    tuned = {}
    model = None
    for i, (name, task, kw) in enumerate(TENANTS):
        cfg = MoSConfig(target_modules=ALL7, lora_alpha=16, seed=i, **kw)
        if model is None:
            model = peft.get_peft_model(tiny_llama().to(dev), cfg, adapter_name=name)
        else:
            model.add_adapter(name, cfg)
    joint = JointTraining(model)
    for name, _, _ in TENANTS:
        joint.add_tenant(name, TenantSettings(lr=1e-2, max_grad_norm=1.0))
    losses = {name: [] for name, _, _ in TENANTS}
    bar = tqdm(total=a.steps, desc=f"fine-tuning {len(TENANTS)} tenants jointly", unit="step")
    for step in range(a.steps):
        ids = torch.cat([task_batch(task, step) for _, task, _ in TENANTS]).to(dev)
        who = [name for name, _, _ in TENANTS for _ in range(ids.shape[0] // len(TENANTS))]
        for name, v in joint.train_step(ids, adapter_names=who).items():
            losses[name].append(v)
        bar.update(1)
        bar.set_postfix(loss=f"{sum(v[-1] for v in losses.values()) / len(losses):.3f}")
    bar.close()
    joint.detach()
    for name, task, _ in TENANTS:
        path = joint.save_tenant(name, os.path.join(out_dir, name))  # pools + int32 tables (+ optimizer state)
        size = os.path.getsize(os.path.join(path, "adapter_model.safetensors"))
        alone = peft.PeftModel.from_pretrained(tiny_llama().to(dev), path).eval()
        tuned[name] = (alone, task, path)
        rows.append((name, task, sum(p.numel() for p in joint.tenants[name].params), size, losses[name][0], losses[name][-1]))

    print(f"\n{'tenant':16s} {'task':13s} {'trainable':>10s} {'file bytes':>11s} {'loss start':>10s} {'loss end':>9s}")
    for name, task, n, size, first, last in rows:
        print(f"{name:16s} {task:13s} {n:10,d} {size:11,d} {first:10.3f} {last:9.3f}")

    # ---- 2. one store, one mixed batch
    base = tiny_llama().to(dev).eval()
    store = AdapterStore(base, capacity_bytes=8 << 20, max_tenants=64, max_rank=16)
    for name, (_, _, path) in tuned.items():
        store.load(name, path)
    served = MultiTenantModel(base, store)
    names, batches = [], []
    for i, (name, (_, task, _)) in enumerate(tuned.items()):
        b = task_batch(task, 10_000 + i, n=4)
        batches.append(b)
        names += [name] * b.shape[0]
    names += [None] * 4
    batches.append(task_batch("add3", 20_000, n=4))
    ids = torch.cat(batches).to(dev)
    with torch.no_grad():
        mixed = served(input_ids=ids, adapter_names=names).logits

    # ---- 3. isolation: every sequence equals its tenant alone
    worst = 0.0
    with torch.no_grad():
        plain = tiny_llama().to(dev).eval()
        for b, n in enumerate(names):
            solo = (tuned[n][0] if n is not None else plain)(ids[b:b + 1]).logits[0]
            worst = max(worst, (mixed[b] - solo).abs().max().item())
    print(f"\nisolation: {len(names)} sequences from {len(tuned)} tenants + base in one batch; "
          f"max |logit - same tenant alone| = {worst:.2e} -> {'OK' if worst < 1e-3 else 'FAILED'}")

    # per-tenant quality in the mixed batch
    with torch.no_grad():
        lp = torch.log_softmax(mixed[:, :-1].float(), -1)
        nll = -lp.gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1).mean(1)
    for name in list(tuned) + [None]:
        sel = [i for i, n in enumerate(names) if n == name]
        print(f"  {str(name):16s} held-out loss in the mixed batch: {nll[sel].mean().item():.3f}")

    # ---- 4. throughput: mixed batch vs a per-tenant loop
    def timed(fn, reps=5):
        fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps

    groups = {}
    for i, n in enumerate(names):
        groups.setdefault(n, []).append(i)

    def loop():
        for n, sel in groups.items():
            (tuned[n][0] if n is not None else plain)(ids[sel])

    with torch.no_grad():
        t_mixed = timed(lambda: served(input_ids=ids, adapter_names=names))
        t_loop = timed(loop)
        t_base = timed(lambda: plain(ids))
    tok = ids.numel()
    print(f"\nthroughput on {tok} tokens ({len(groups)} groups): mixed batch {tok / t_mixed:,.0f} tok/s, "
          f"per-tenant loop {tok / t_loop:,.0f} tok/s ({t_loop / t_mixed:.2f}x), base alone {tok / t_base:,.0f} tok/s")

    # ---- 5. capacity at LLaMA2-7B shapes (bf16)
    print("\ntenants per memory at LLaMA2-7B shapes (bf16, all 7 projections, 32 layers):")
    print(f"{'adapter':28s} {'bytes/tenant':>14s} {'per 1 GB':>9s} {'per 80 GB':>10s}")
    print(f"(this store: {store.tables_in_use()} tables for {len(store.names())} tenants; tenants of one recipe "
          f"share one)")
    for label, nbytes in (("MoS e=2 (paper 5.00M)", per_tenant_7b("mos", 8, e=2)),
                          ("MoS e=2, a table of its own", per_tenant_7b("mos", 8, e=2, own_table=True)),
                          ("MoS e=8 (paper 19.99M)", per_tenant_7b("mos", 32, e=8)),
                          ("LoRA r=16", per_tenant_7b("lora", 16)),
                          ("LoRA r=64", per_tenant_7b("lora", 64))):
        print(f"{label:28s} {nbytes:14,d} {(1 << 30) // nbytes:9,d} {(80 << 30) // nbytes:10,d}")
    print(f"\ndone in {time.time() - t_start:.1f} s; adapters in {out_dir}")
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
