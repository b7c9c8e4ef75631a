"""Mixed-tenant serving: AdapterStore + sgmv vs PEFT's adapter_names path vs the base model alone.

Model: a Llama built from a config (4 layers, hidden 512 by default), all seven projections
adapted. (a) MultiTenantModel over an AdapterStore holding MoS tenants (e=2) -- and, for the
same rank as PEFT, LoRA r=16 tenants; (b) PEFT with one LoRA r=16 adapter per tenant, mixed
batch through ``adapter_names``; (c) the base model alone.

Shapes: decode = B sequences x 1 token, every sequence its own tenant; prefill = 64 sequences x
32 tokens over 1..64 distinct tenants.

    python benchmarks/bench_serving.py [--quick] [--device cuda]
Prints tables, writes benchmarks/out/serving.json and benchmarks/out/serving.png.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _plot import pyplot  # noqa: E402
from _timing import median_time  # noqa: E402

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def base(hidden, layers, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=int(hidden * 2.6875) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                      max_position_embeddings=256)
    return LlamaForCausalLM(cfg).to(device).eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import peft

    import mos_ext
    from mos_ext import MoSConfig
    from mos_ext.serving import AdapterStore, MultiTenantModel

    dev = torch.device(a.device)
    reps = 3 if a.quick else 7
    max_t = 64 if a.quick else 256
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    tmp = tempfile.mkdtemp(prefix="mos_bench_")

    # one MoS and one LoRA adapter file, loaded under many tenant names (contents do not
    # change the timing; each tenant gets its own rows and slot in the store)
    mos_cfg = MoSConfig(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1, target_modules=ALL7)
    def nonzero_b(pm):
        with torch.no_grad():
            for k, p in pm.base_model.pools("default").items():
                if k.startswith("mos_B_"):
                    p.normal_(0, 0.01)
        return pm

    m = nonzero_b(peft.get_peft_model(base(a.hidden, a.layers, "cpu"), mos_cfg))
    m.save_pretrained(os.path.join(tmp, "mos"))
    lora_cfg = MoSConfig(r=16, method="lora", lora_alpha=32, target_modules=ALL7)
    m = nonzero_b(peft.get_peft_model(base(a.hidden, a.layers, "cpu"), lora_cfg))
    m.save_pretrained(os.path.join(tmp, "lora_mos_format"))
    mos_ext.export_lora(m, os.path.join(tmp, "lora_peft"))

    def make_served(kind, n):
        model = base(a.hidden, a.layers, dev)
        src = os.path.join(tmp, kind)
        per_tenant = os.path.getsize(os.path.join(src, "adapter_model.safetensors"))
        store = AdapterStore(model, capacity_bytes=int(per_tenant * n * 1.25) + (1 << 20), max_tenants=n, max_rank=16)
        for t in range(n):
            store.load(f"t{t}", src)
        return MultiTenantModel(model, store)

    def make_peft(n):
        pm = peft.PeftModel.from_pretrained(base(a.hidden, a.layers, dev), os.path.join(tmp, "lora_peft"),
                                            adapter_name="t0")
        for t in range(1, n):
            pm.load_adapter(os.path.join(tmp, "lora_peft"), adapter_name=f"t{t}")
        return pm.eval()

    plain = base(a.hidden, a.layers, dev)
    rows = []

    def run(shape, B, T, tenants):
        ids = torch.randint(0, 1024, (B, T), generator=torch.Generator().manual_seed(0)).to(dev)
        names = [f"t{i % tenants}" for i in range(B)]
        res = dict(shape=shape, B=B, T=T, tenants=tenants)
        with torch.no_grad():
            res["base_ms"] = median_time(lambda: plain(ids), reps, sync=sync)
            for kind in ("mos", "lora_mos_format"):
                served = make_served(kind, tenants)
                res[f"store_{kind}_ms"] = median_time(lambda: served(input_ids=ids, adapter_names=names), reps, sync=sync)
                del served
            pm = make_peft(tenants)
            res["peft_ms"] = median_time(lambda: pm(input_ids=ids, adapter_names=names), reps, sync=sync)
            del pm
        res["mos_over_base"] = res["store_mos_ms"] / res["base_ms"]
        res["peft_over_mos"] = res["peft_ms"] / res["store_mos_ms"]
        rows.append(res)
        print(f"{shape:8s} B={B:4d} T={T:3d} tenants={tenants:4d}  base {res['base_ms']:8.2f} ms  "
              f"store(MoS e=2) {res['store_mos_ms']:8.2f}  store(LoRA r=16) {res['store_lora_mos_format_ms']:8.2f}  "
              f"PEFT(LoRA r=16) {res['peft_ms']:8.2f}  MoS/base {res['mos_over_base']:.2f}x  "
              f"PEFT/MoS {res['peft_over_mos']:.2f}x", flush=True)

    for B in [16, 64] + ([] if a.quick else [256]):
        if B <= max_t:
            run("decode", B, 1, B)
    for tenants in (1, 8, 64):
        run("prefill", 64, 32, tenants)

    out = os.path.join(os.path.dirname(__file__), "out")
    os.makedirs(out, exist_ok=True)
    meta = dict(date=time.strftime("%Y-%m-%d"), device=str(dev), threads=torch.get_num_threads(),
                model=dict(hidden=a.hidden, layers=a.layers), torch=torch.__version__,
                command="python benchmarks/bench_serving.py" + (" --quick" if a.quick else ""))
    with open(os.path.join(out, "serving.json"), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        for ax, shape, x in ((axes[0], "decode", "B"), (axes[1], "prefill", "tenants")):
            sel = [r for r in rows if r["shape"] == shape]
            xs = [r[x] for r in sel]
            for key, label in (("base_ms", "base alone"), ("store_mos_ms", "store + sgmv, MoS e=2"),
                               ("store_lora_mos_format_ms", "store + sgmv, LoRA r=16"),
                               ("peft_ms", "PEFT adapter_names, LoRA r=16")):
                ax.plot(xs, [r[key] for r in sel], marker="o", label=label)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequences = tenants" if shape == "decode" else "distinct tenants (64 x 32 tokens)")
            ax.set_ylabel("ms per forward")
            ax.set_title(f"{shape} ({dev.type})")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "serving.png"), dpi=110)
        print("plot:", os.path.join(out, "serving.png"))


if __name__ == "__main__":
    main()
