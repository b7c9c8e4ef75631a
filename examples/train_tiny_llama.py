"""Fine-tune a tiny Llama (built from a config, no downloads) with MoS as a PEFT method, save the
adapter at its compressed size, reload it, merge it, and export it as a PEFT LoRA.

    python examples/train_tiny_llama.py [--steps 60] [--out /tmp/mos_example]
"""
import argparse
import os

import peft
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import mos_ext  # registers MoS as a PEFT method
from mos_ext import MoSConfig


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2)
    return LlamaForCausalLM(cfg)


def data(step, n=16, t=32):
    """A toy task with structure: arithmetic progressions modulo the vocabulary."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, 96, (n, 1), generator=g)
    stride = torch.randint(1, 5, (n, 1), generator=g)
    return (start + stride * torch.arange(t)) % 96


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", default="/tmp/mos_example")
    a = ap.parse_args(argv)

    # 4 layers: (r - p) * l = 12 shared shards per layer fit the public pool (e - p) * L * l = 16
    cfg = MoSConfig(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1, lora_alpha=8, lora_dropout=0.05,
                    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    model = peft.get_peft_model(tiny_llama(), cfg)
    print(f"trainable parameters: {model.get_nb_trainable_parameters()[0]:,}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    model.train()
    for step in range(a.steps):
        ids = data(step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step % 10 == 0 or step == a.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}")

    model.eval()
    held_out = data(10_000)
    with torch.no_grad():
        ref = model(held_out).logits
    adapter_dir = os.path.join(a.out, "adapter")
    model.save_pretrained(adapter_dir)  # adapter_config.json + adapter_model.safetensors (pools + int32 tables)
    size = os.path.getsize(os.path.join(adapter_dir, "adapter_model.safetensors"))
    print(f"adapter saved to {adapter_dir}: {size:,} bytes")

    reloaded = peft.PeftModel.from_pretrained(tiny_llama(), adapter_dir).eval()
    with torch.no_grad():
        same = torch.equal(reloaded(held_out).logits, ref)
    print(f"reloaded adapter gives identical logits: {same}")

    model.merge_adapter()
    with torch.no_grad():
        err = (model(held_out).logits - ref).abs().max().item()
    print(f"merged: max |logit difference| = {err:.2e}")
    model.unmerge_adapter()

    lora_dir = os.path.join(a.out, "lora")
    mos_ext.export_lora(model, lora_dir)
    lora_size = os.path.getsize(os.path.join(lora_dir, "adapter_model.safetensors"))
    print(f"exported as PEFT LoRA to {lora_dir}: {lora_size:,} bytes ({lora_size / size:.1f}x the MoS adapter)")
    return 0 if same and err < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
