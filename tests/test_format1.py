"""Backward compatibility: a format-1 adapter (adapter_config.json with "format": "mos_ext" +
adapter.safetensors), written by the mos_ext of commit bcdb9ce with its old ``save_adapter``, still
loads for training (``mos_ext.import_adapter``) and serving (``AdapterStore.load``) and gives the
logits the old code computed. tests/data/mos_format1/make_format1.py is the script that wrote it."""
import os

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from safetensors.torch import load_file  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import mos_ext  # noqa: E402

DIR = os.path.join(os.path.dirname(__file__), "data", "mos_format1")
EXPECTED = load_file(os.path.join(DIR, "expected.safetensors"))
IDS = EXPECTED["input_ids"]  # [2, 7]


def tiny_llama():
    """Exactly the base make_format1.py adapted (weights from the seeded HF init)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


@pytest.fixture(autouse=True)
def same_base():
    """Guard: if this transformers builds another base from the same constructor, say so (the
    adapter is then not what fails)."""
    with torch.no_grad():
        base = tiny_llama()(IDS).logits
    torch.testing.assert_close(base, EXPECTED["base_logits"], rtol=1e-5, atol=1e-5,
                               msg="tiny_llama() no longer builds the base the format-1 adapter was made on")


def test_format1_dir_is_format1_and_tiny():
    import json

    meta = json.load(open(os.path.join(DIR, "adapter_config.json")))
    assert meta["format"] == "mos_ext" and meta["format_version"] == 1
    assert sorted(f for f in os.listdir(DIR) if f.startswith("adapter")) == ["adapter.safetensors", "adapter_config.json"]
    assert sum(os.path.getsize(os.path.join(DIR, f)) for f in os.listdir(DIR)) < 100_000
    # the adapter does something
    assert (EXPECTED["logits"] - EXPECTED["base_logits"]).abs().max() > 1e-2


def test_import_adapter_reproduces_old_logits_and_trains():
    pm = mos_ext.import_adapter(tiny_llama(), DIR)
    assert isinstance(pm, peft.PeftModel)
    cfg = pm.base_model.peft_config["default"]
    assert (cfg.method, cfg.r, cfg.equivalent_rank, cfg.shards_per_vector, cfg.private_rank) == ("mos", 3, 2, 2, 1)
    with torch.no_grad():
        out = pm(IDS).logits
    torch.testing.assert_close(out, EXPECTED["logits"], rtol=1e-5, atol=1e-5)
    # pools and tables are the saved ones, bit for bit
    old = load_file(os.path.join(DIR, "adapter.safetensors"))
    for t in cfg.type_layers:
        a, b = pm.base_model.pool_bank().get("default", t)
        assert torch.equal(a.detach(), old[f"pools.{t}.A"]) and torch.equal(b.detach(), old[f"pools.{t}.B"])
        for p in cfg.type_layers[t]:
            lay = pm.base_model.model.get_submodule(p)
            assert torch.equal(lay.mos_idx_a["default"][0], old[f"index.{p}.A"])
            assert torch.equal(lay.mos_idx_b["default"][0], old[f"index.{p}.B"])
    # trainable: the pools get gradients
    pm(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None for p in pm.base_model.pools("default").values())


def test_format1_resaved_as_format2_keeps_logits(tmp_path):
    pm = mos_ext.import_adapter(tiny_llama(), DIR)
    pm.save_pretrained(tmp_path)
    re = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(re(IDS).logits, EXPECTED["logits"], rtol=1e-5, atol=1e-5)


def test_adapter_store_serves_format1_with_old_logits():
    from mos_ext.serving import AdapterStore, MultiTenantModel

    model = tiny_llama()
    store = AdapterStore(model, capacity_bytes=1 << 20, max_tenants=4, max_rank=8, slots=2)
    store.load("old", DIR)
    served = MultiTenantModel(model, store)
    with torch.no_grad():
        out = served(input_ids=IDS, adapter_names=["old", None]).logits
    torch.testing.assert_close(out[0], EXPECTED["logits"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], EXPECTED["base_logits"][1], rtol=1e-5, atol=1e-5)
