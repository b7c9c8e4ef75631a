"""mos_ext.validation.validate_mos_tables: every MoS table of an adapted model checked once."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import mos_ext  # noqa: E402
from mos_ext.validation import validate_mos_tables  # noqa: E402


def test_validate_mos_tables():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))
    cfg = mos_ext.MoSConfig(r=4, equivalent_rank=4, shards_per_vector=4, private_rank=1, lora_alpha=8,
                            target_modules=["q_proj", "v_proj"], seed=1)
    pm = peft.get_peft_model(base, cfg)
    assert validate_mos_tables(pm) == 8  # 2 layers x 2 types x (A, B)
    layer = pm.base_model.model.model.layers[1].self_attn.v_proj
    with torch.no_grad():
        layer.mos_idx_b["default"][0, 2, 1] = 10_000
    with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.v_proj\.mos_idx_b\['default'\]\[0, 2, 1\] = 10000"):
        validate_mos_tables(pm)
    assert validate_mos_tables(pm, adapter_name="other") == 0
