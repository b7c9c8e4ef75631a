"""Serving needs no peft: with peft not importable (``sys.modules["peft"] = None``), ``mos_ext.ops``,
``mos_ext.serving`` and the vLLM plugin import, and a format-2 MoS adapter, a PEFT LoRA and a PEFT
MiSS directory serve logits equal to the same store's with peft installed."""
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import mos_ext  # noqa: E402
from test_peft_method import cfg, llama, peft_lora_dir, peft_miss_dir, randomize  # noqa: E402

SERVE = r"""
import sys
sys.modules["peft"] = None  # `import peft` raises ImportError from here on
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import mos_ext, mos_ext.ops
from mos_ext.serving import AdapterStore, MultiTenantModel
from mos_ext.integrations import vllm as plugin
try:
    import peft  # noqa: F401
    raise SystemExit("peft is importable")
except ImportError:
    pass
assert "mos_ext.model" not in sys.modules and "mos_ext._peft" not in sys.modules, sorted(sys.modules)
out, dirs = sys.argv[1], sys.argv[2:]
assert all(plugin.is_mos_readable(d) for d in dirs)
torch.manual_seed(0)
model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2)).eval()
store = AdapterStore(model, capacity_bytes=1 << 22, max_tenants=8, max_rank=8, slots=2)
names = [f"t{i}" for i in range(len(dirs))]
for n, d in zip(names, dirs):
    store.load(n, d)
# as the vLLM plugin builds its store: from layer dims, each adapter read and planned once
dims = {p: store.type_dims[k] for p, k in store.layers.items()}
engine = AdapterStore(layer_dims=dims, capacity_bytes=1 << 22, max_tenants=8, max_rank=8, slots=2)
for n, d in zip(names, dirs):
    engine.load(n, engine.read(d))
assert all(torch.equal(engine.pool_a[k], store.pool_a[k]) for k in store.pool_a)
served = MultiTenantModel(model, store)
x = torch.tensor(X)
with torch.no_grad():
    torch.save(served(input_ids=x, adapter_names=names + [None]).logits, out)
print("OK")
"""


def test_serving_and_vllm_plugin_work_without_peft(tmp_path):
    from test_peft_method import VOCAB, X

    pm = peft.get_peft_model(llama(), cfg())
    randomize(pm)
    pm.save_pretrained(tmp_path / "mos")
    lora, _ = peft_lora_dir(tmp_path)
    miss, _ = peft_miss_dir(tmp_path)
    dirs = [str(tmp_path / "mos"), str(lora), str(miss)]
    x = torch.cat([X, X])  # one row per adapter, then a base row

    from mos_ext.serving import AdapterStore, MultiTenantModel

    model = llama()
    store = AdapterStore(model, capacity_bytes=1 << 22, max_tenants=8, max_rank=8, slots=2)
    names = [f"t{i}" for i in range(len(dirs))]
    for n, d in zip(names, dirs):
        store.load(n, d)
    with torch.no_grad():
        want = MultiTenantModel(model, store)(input_ids=x, adapter_names=names + [None]).logits

    script = tmp_path / "serve.py"
    script.write_text(SERVE.replace("VOCAB", str(VOCAB)).replace("torch.tensor(X)", f"torch.tensor({x.tolist()})"))
    out = tmp_path / "logits.pt"
    root = os.path.dirname(os.path.dirname(os.path.abspath(mos_ext.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(script), str(out), *dirs], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    assert torch.equal(torch.load(out), want)
