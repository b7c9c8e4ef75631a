"""How tests/data/mos_format1/ was made: with the mos_ext of commit bcdb9ce (the last one with
format 1, before mos_ext became a PEFT method), never with the current code.

    git worktree add /tmp/old_main bcdb9ce
    (cd /tmp/old_main && MAX_JOBS=1 python setup.py build_ext --inplace)
    PYTHONPATH=/tmp/old_main python tests/data/mos_format1/make_format1.py tests/data/mos_format1

Writes adapter_config.json + adapter.safetensors (the old save_adapter) and expected.safetensors:
``input_ids`` [2, 7], ``logits`` of the adapted model and ``base_logits`` of the plain base on them.
tests/test_format1.py builds the same base (tiny_llama below, copied there) and checks both.
"""
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

import mos_ext
from mos_ext import MoSConfig, get_mos_model


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def main(out):
    assert not hasattr(mos_ext, "load_adapter"), "run this with the format-1 mos_ext (commit bcdb9ce)"
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        base_logits = tiny_llama()(ids).logits
    cfg = MoSConfig(r=3, equivalent_rank=2, shards_per_vector=2, private_rank=1, lora_alpha=6,
                    target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], seed=11)
    m = get_mos_model(tiny_llama(), cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for t, p in m.pools.items():
            p.A.copy_(torch.randn(p.A.shape, generator=g) * 0.3)
            p.B.copy_(torch.randn(p.B.shape, generator=g) * 0.3)
        logits = m(ids).logits
    assert (logits - base_logits).abs().max() > 1e-2
    m.save_adapter(out)
    save_file({"input_ids": ids.contiguous(), "logits": logits.contiguous(), "base_logits": base_logits.contiguous()},
              os.path.join(out, "expected.safetensors"))
    print("wrote", sorted(os.listdir(out)))


if __name__ == "__main__":
    main(sys.argv[1])
