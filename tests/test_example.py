"""examples/train_tiny_llama.py runs its whole cycle: train, save, reload, merge, export."""
import importlib.util
import os

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "train_tiny_llama.py")


def test_train_tiny_llama_example(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("train_tiny_llama", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--steps", "3", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "reloaded adapter gives identical logits: True" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()
