"""MoS as a PEFT method: PeftModel API, adapter management, bases, dtypes, imports and refusals."""
import json
import os
import subprocess
import sys

import pytest
import torch

import mos_ext

peft = pytest.importorskip("peft")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 64


def llama(seed=0, layers=2):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()


def cfg(**kw):
    base = dict(r=3, equivalent_rank=2, shards_per_vector=2, private_rank=1, lora_alpha=6,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    base.update(kw)
    return mos_ext.MoSConfig(**base)


def randomize(pm, name="default", seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in pm.base_model.pools(name).items():
            if "frozen" not in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


X = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(5))


def logits(m, x=X):
    with torch.no_grad():
        return m(x).logits


def dense_reference(pm, name="default", x=X):
    """fp64 forward of the same model with every adapter materialized as scale * B A (from the
    pools and tables by plain indexing, not by the ops)."""
    import copy

    tuner = pm.base_model
    ref = copy.deepcopy(tuner.model).double()
    for n, lay in list(tuner.mos_layers()):
        pa, pb = lay.pools(name)
        ia, ib = lay.mos_idx_a[name][0].long(), lay.mos_idx_b[name][0].long()
        A = torch.where((ia >= 0)[..., None], pa.double()[ia.clamp(min=0)], 0.0).reshape(ia.shape[0], -1)
        Bt = torch.where((ib >= 0)[..., None], pb.double()[ib.clamp(min=0)], 0.0).reshape(ib.shape[0], -1)
        base = copy.deepcopy(lay.get_base_layer()).double()
        w = base.weight
        dw = lay.mos_scale[name] * (Bt.T @ A)
        with torch.no_grad():
            w.add_(dw.T if lay.base_kind == "conv1d" else dw)
        parent, _, leaf = n.rpartition(".")
        setattr(ref.get_submodule(parent), leaf, base)
    if hasattr(ref, "shard_pools"):
        del ref.shard_pools
    with torch.no_grad():
        return ref(x).logits


def test_get_peft_model_returns_peft_model_with_mos_layers_and_paper_param_count():
    pm = peft.get_peft_model(llama(layers=3), cfg())
    assert isinstance(pm, peft.PeftModel) and isinstance(pm.base_model, mos_ext.MoSModel)
    lays = list(pm.base_model.mos_layers())
    assert len(lays) == 7 * 3 and all(isinstance(m, mos_ext.MoSLinear) for _, m in lays)
    trainable = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    dims = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
            "gate_proj": (32, 64), "up_proj": (32, 64), "down_proj": (64, 32)}
    assert trainable == sum(2 * 3 * (h + o) for h, o in dims.values())  # e * L * (h + o) per type
    # base frozen, tables int32
    assert all(not p.requires_grad for n, p in pm.named_parameters() if "shard_pools" not in n)
    assert all(m.mos_idx_a["default"].dtype == torch.int32 for _, m in lays)


def test_forward_matches_dense_reference_and_save_is_compressed(tmp_path):
    pm = peft.get_peft_model(llama(), cfg())
    randomize(pm)
    torch.testing.assert_close(logits(pm).double(), dense_reference(pm), rtol=1e-4, atol=1e-4)
    pm.save_pretrained(tmp_path)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(tmp_path))
    from safetensors.torch import load_file

    sd = load_file(tmp_path / "adapter_model.safetensors")
    pools = [k for k in sd if ".shard_pools." in k]
    tables = [k for k in sd if k.endswith((".mos_idx_a", ".mos_idx_b"))]
    assert len(pools) == 14 and len(tables) == 2 * 14 and len(sd) == len(pools) + len(tables)
    assert all(sd[k].dtype == torch.int32 for k in tables)
    meta = json.load(open(tmp_path / "adapter_config.json"))
    assert meta["peft_type"] == "MOS" and meta["format_version"] == 2 and len(meta["type_layers"]) == 7


def test_multiple_adapters_set_delete_disable_merge_unload(tmp_path):
    pm = peft.get_peft_model(llama(), cfg(), adapter_name="a")
    randomize(pm, "a", seed=1)
    pm.add_adapter("b", cfg(seed=3, method="lora", r=2))
    randomize(pm, "b", seed=2)
    base = logits(llama())
    pm.set_adapter("a")
    la = logits(pm)
    torch.testing.assert_close(la.double(), dense_reference(pm, "a"), rtol=1e-4, atol=1e-4)
    assert all(p.requires_grad == ("mos_" in n and ".a" in n[-2:]) for n, p in pm.named_parameters()
               if "shard_pools" in n and "frozen" not in n)
    pm.set_adapter("b")
    lb = logits(pm)
    torch.testing.assert_close(lb.double(), dense_reference(pm, "b"), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(la, lb)
    with pm.disable_adapter():
        torch.testing.assert_close(logits(pm), base, rtol=0, atol=0)
    torch.testing.assert_close(logits(pm), lb, rtol=0, atol=0)
    # save both; reload b alone by name
    pm.save_pretrained(tmp_path)
    re = peft.PeftModel.from_pretrained(llama(), tmp_path / "b", adapter_name="b")
    torch.testing.assert_close(logits(re), lb, rtol=0, atol=0)
    # merge into the base weights and back
    pm.merge_adapter()
    torch.testing.assert_close(logits(pm), lb, rtol=1e-4, atol=1e-4)
    pm.unmerge_adapter()
    torch.testing.assert_close(logits(pm), lb, rtol=1e-5, atol=1e-5)
    pm.delete_adapter("a")
    assert list(pm.peft_config) == ["b"] and not any(k.endswith("_a") or ".a" == k[-2:] for k in pm.state_dict())
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, mos_ext.MoSLinear) for m in merged.modules()) and not hasattr(merged, "shard_pools")
    torch.testing.assert_close(logits(merged), lb, rtol=1e-4, atol=1e-4)
    pm2 = peft.get_peft_model(llama(), cfg())
    randomize(pm2)
    plain = pm2.unload()
    torch.testing.assert_close(logits(plain), base, rtol=0, atol=0)


def test_gpt2_conv1d_base_matches_reference_and_exported_lora(tmp_path):
    torch.manual_seed(0)
    g = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    pm = peft.get_peft_model(g, cfg(target_modules=["c_attn", "c_proj", "c_fc"], r=2, equivalent_rank=2))
    types = pm.base_model.peft_config["default"].type_layers
    assert {"c_attn", "attn_c_proj", "mlp_c_proj", "c_fc"} == set(types)
    randomize(pm)
    ref = logits(pm)
    torch.testing.assert_close(ref.double(), dense_reference(pm), rtol=1e-4, atol=1e-4)
    mos_ext.export_lora(pm, tmp_path)
    torch.manual_seed(0)
    g2 = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32)).eval()
    lp = peft.PeftModel.from_pretrained(g2, tmp_path)
    torch.testing.assert_close(logits(lp), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "to_bf16"])
def test_dtype_casts_keep_the_forward_working_and_correct(cast):
    pm = peft.get_peft_model(llama(), cfg())
    randomize(pm)
    want = dense_reference(pm)
    m = pm.to(torch.bfloat16) if cast == "to_bf16" else getattr(pm, cast)()
    dt = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64, "to_bf16": torch.bfloat16}[cast]
    out = logits(m)
    assert out.dtype == dt
    tol = {torch.float16: 5e-2, torch.bfloat16: 2e-1, torch.float64: 1e-9}[dt]
    # low precision: compare against the same cast base weights in fp64 (the base cast itself moves logits)
    ref = want if dt == torch.float64 else dense_reference(m).to(torch.float64)
    torch.testing.assert_close(out.double(), ref, rtol=tol, atol=tol)


def test_autocast_adapter_dtype_convention():
    base = llama().to(torch.bfloat16)
    pm = peft.get_peft_model(base, cfg())
    assert all(p.dtype == torch.float32 for p in pm.base_model.pools().values())  # fp32 masters (PEFT default)
    out = logits(pm)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    pm2 = peft.get_peft_model(llama().to(torch.bfloat16), cfg(), autocast_adapter_dtype=False)
    assert all(p.dtype == torch.bfloat16 for p in pm2.base_model.pools().values())
    assert torch.isfinite(logits(pm2)).all()


# ---------------------------------------------------------------------------- importing other adapters
def peft_lora_dir(tmp_path, safe=True, **kw):
    args = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    args.update(kw)
    lm = peft.get_peft_model(llama(), peft.LoraConfig(**args))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    d = tmp_path / "lora"
    lm.save_pretrained(d, safe_serialization=safe)
    return d, logits(lm)


def peft_miss_dir(tmp_path, init=True, r=4, mini_r=None):
    kw = dict(r=r, target_modules=["q_proj", "up_proj", "down_proj"], init_weights=init)
    if mini_r:
        kw["mini_r"] = mini_r
    mm = peft.get_peft_model(llama(), peft.MissConfig(**kw))
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for n, p in mm.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    d = tmp_path / f"miss_{init}"
    mm.save_pretrained(d)
    return d, logits(mm)


def test_auto_peft_model_loads_a_saved_mos_adapter(tmp_path):
    """PEFT's AutoPeftModelForCausalLM: config type from the registry, base from the adapter
    config's base_model_name_or_path, the same logits."""
    llama().save_pretrained(tmp_path / "base")
    pm = peft.get_peft_model(LlamaForCausalLM.from_pretrained(tmp_path / "base").eval(), cfg())
    randomize(pm)
    pm.save_pretrained(tmp_path / "adapter")
    assert type(peft.PeftConfig.from_pretrained(tmp_path / "adapter")) is mos_ext.MoSConfig
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    assert isinstance(auto.base_model, mos_ext.MoSModel)
    torch.testing.assert_close(logits(auto), logits(pm), rtol=0, atol=0)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_peft_lora_dir_loads_as_lora_method_with_equal_logits_and_trains(tmp_path, safe):
    d, ref = peft_lora_dir(tmp_path, safe=safe, use_rslora=True)
    assert (d / "adapter_model.bin").is_file() != safe
    pm = mos_ext.import_adapter(llama(), d)
    assert pm.base_model.peft_config["default"].method == "lora"
    torch.testing.assert_close(logits(pm), ref, rtol=1e-5, atol=1e-5)
    loss = pm(X, labels=X).loss
    loss.backward()
    assert all(p.grad is not None for n, p in pm.named_parameters() if p.requires_grad)


@pytest.mark.parametrize("init,mini_r", [(True, None), ("mini", 8)])
def test_peft_miss_dir_loads_with_equal_logits_and_exports(tmp_path, init, mini_r):
    d, ref = peft_miss_dir(tmp_path, init, mini_r=mini_r)
    pm = mos_ext.import_adapter(llama(), d)
    assert pm.base_model.peft_config["default"].method == ("miss_mini" if mini_r else "miss")
    assert not torch.allclose(ref, logits(llama()))
    torch.testing.assert_close(logits(pm), ref, rtol=1e-5, atol=1e-5)
    e = tmp_path / "exported"
    mos_ext.export_lora(pm, e)
    torch.testing.assert_close(logits(peft.PeftModel.from_pretrained(llama(), e)), ref, rtol=1e-5, atol=1e-5)


def store_for(model):
    from mos_ext.serving import AdapterStore

    return AdapterStore(model, capacity_bytes=1 << 20, max_tenants=4, max_rank=8, slots=2)


REFUSED_LORA = [
    ("use_dora", dict(use_dora=True), "DoRA"),
    ("lora_bias", dict(lora_bias=True), "lora_bias"),
    ("embedding", dict(target_modules=["q_proj", "embed_tokens"]), "embed"),
    ("lm_head", dict(target_modules=["q_proj", "lm_head"]), "lm_head"),
    ("modules_to_save", dict(modules_to_save=["lm_head"]), "modules_to_save"),
    ("rank_pattern", dict(rank_pattern={"q_proj": 2}), "rank_pattern"),
    ("alpha_pattern", dict(alpha_pattern={"q_proj": 3}), "alpha_pattern"),
    ("alpha_nan", dict(lora_alpha=float("nan")), "scale.*not finite"),
]


@pytest.mark.parametrize("name,kw,word", REFUSED_LORA, ids=[r[0] for r in REFUSED_LORA])
def test_unsupported_peft_lora_parts_are_refused_by_name_everywhere(tmp_path, name, kw, word):
    d, _ = peft_lora_dir(tmp_path, **kw)
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=word):
        mos_ext.import_adapter(model, d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, mos_ext.MoSLinear) for m in model.modules())
    store = store_for(llama())
    ok, _ = peft_lora_dir(tmp_path / "ok")
    store.load("ok", ok)
    snap = {k: v.clone() for k, v in store.pool_a.items()}
    with pytest.raises(ValueError, match=word):
        store.load("bad", d)
    assert store.names() == ["ok"] and all(torch.equal(snap[k], store.pool_a[k]) for k in snap)


@pytest.mark.parametrize("method", ["mos", "lora", "miss"])
def test_embedding_and_lm_head_targets_refused_at_creation(method):
    """What could not be read back (PEFT also saves an lm_head's base weight) is not trained:
    refused before anything is created."""
    model = llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for target in ("lm_head", "embed_tokens"):
        cfg = mos_ext.MoSConfig(method=method, r=2, equivalent_rank=2, shards_per_vector=2, private_rank=1,
                                target_modules=["q_proj", target])
        with pytest.raises(ValueError, match=f"{target}.*embeddings or lm_head are not supported"):
            peft.get_peft_model(model, cfg)
        assert not any(isinstance(m, mos_ext.MoSLinear) for m in model.modules())
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_unsupported_miss_parts_are_refused(tmp_path):
    d, _ = peft_miss_dir(tmp_path, "bat", r=4)
    with pytest.raises(ValueError, match="bat"):
        mos_ext.import_adapter(llama(), d)
    with pytest.raises(ValueError, match="bat"):
        store_for(llama()).load("x", d)
    d2, _ = peft_miss_dir(tmp_path, True, r=5)  # 32 in-features not divisible by 5: PEFT pads, we refuse
    with pytest.raises(ValueError, match="not divisible by r=5"):
        mos_ext.import_adapter(llama(), d2)
    with pytest.raises(ValueError, match="not divisible by r=5"):
        store_for(llama()).load("x", d2)


def test_unknown_directory_kinds_name_what_is_supported(tmp_path):
    with pytest.raises(FileNotFoundError, match="PEFT LoRA"):
        mos_ext.import_adapter(llama(), tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(ValueError, match="IA3"):
        mos_ext.import_adapter(llama(), tmp_path)


def test_peft_version_range_is_checked():
    from mos_ext import _peft as integ

    integ.check_version(peft.__version__)
    for bad in ("0.17.1", "0.22.0", "1.0.0"):
        with pytest.raises(ImportError, match=bad):
            integ.check_version(bad)


OLD_PEFT_SCRIPT = r"""
import os, sys, tempfile, torch, peft
import mos_ext
from transformers import LlamaConfig, LlamaForCausalLM
assert peft.__version__ == sys.argv[1], (peft.__version__, peft.__file__)
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2)).eval()
cfg = mos_ext.MoSConfig(r=3, equivalent_rank=2, shards_per_vector=2, private_rank=1, target_modules=["q_proj", "v_proj", "up_proj"])
pm = peft.get_peft_model(llama(), cfg)
pm.add_adapter("b", mos_ext.MoSConfig(method="lora", r=2, target_modules=["q_proj"]))
with torch.no_grad():
    for name in ("default", "b"):
        for k, p in pm.base_model.pools(name).items():
            p.normal_()
x = torch.randint(0, 64, (2, 5))
loss = pm(x, labels=x).loss
loss.backward()
assert all(p.grad is not None for p in pm.base_model.pools("default").values())
assert all(p.grad is None for p in pm.base_model.pools("b").values())
d = tempfile.mkdtemp()
pm.save_pretrained(d)
with torch.no_grad():
    ref = pm(x).logits
    re = peft.PeftModel.from_pretrained(llama(), d)(x).logits
    assert torch.equal(ref, re), (ref - re).abs().max()
    pm.set_adapter("b")
    rb = pm(x).logits
    re_b = peft.PeftModel.from_pretrained(llama(), os.path.join(d, "b"), adapter_name="b")(x).logits
    assert torch.equal(rb, re_b)
    merged = pm.merge_and_unload()
    assert torch.allclose(merged(x).logits, rb, atol=1e-5)
print("OK", peft.__version__)
"""


def test_oldest_supported_peft(tmp_path):
    """The core PEFT path under the oldest supported PEFT (installed by .ci/run into $MOS_EXT_OLD_PEFT)."""
    target = os.environ.get("MOS_EXT_OLD_PEFT")
    if not target or not os.path.isdir(target):
        pytest.skip("set MOS_EXT_OLD_PEFT to a directory holding peft==0.18.1 (pip install --no-deps --target DIR "
                    "peft==0.18.1); .ci/run does")
    from mos_ext._peft import PEFT_MIN

    script = tmp_path / "old.py"
    script.write_text(OLD_PEFT_SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([target, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(script), "0.18.1"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "OK 0.18.1" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
    assert PEFT_MIN.startswith("0.18")


# ---------------------------------------------------------------------------- serving what training writes
def serve(model, dirs, x=X, names=None):
    from mos_ext.serving import AdapterStore, MultiTenantModel

    store = AdapterStore(model, capacity_bytes=1 << 22, max_tenants=8, max_rank=8, slots=2)
    for n, d in dirs.items():
        store.load(n, d)
    served = MultiTenantModel(model, store)
    with torch.no_grad():
        return served(input_ids=x, adapter_names=names).logits


def test_store_serves_format2_peft_lora_and_peft_miss_dirs_like_their_trainers(tmp_path):
    pm = peft.get_peft_model(llama(), cfg())
    randomize(pm)
    pm.save_pretrained(tmp_path / "mos")
    ref_mos = logits(pm)
    lora_d, ref_lora = peft_lora_dir(tmp_path)
    miss_d, ref_miss = peft_miss_dir(tmp_path, True)
    mini_d, ref_mini = peft_miss_dir(tmp_path, "mini", mini_r=8)
    dirs = {"mos": tmp_path / "mos", "lora": lora_d, "miss": miss_d, "mini": mini_d}
    xs = torch.cat([X[:1]] * 5)
    out = serve(llama(), dirs, xs, names=["mos", "lora", "miss", "mini", None])
    for i, ref in enumerate([ref_mos, ref_lora, ref_miss, ref_mini, logits(llama())]):
        torch.testing.assert_close(out[i], ref[0], rtol=1e-4, atol=1e-4)
    # and a live PeftModel, without saving
    live = serve(llama(), {"live": pm}, names=["live", "live"])
    torch.testing.assert_close(live, ref_mos, rtol=1e-4, atol=1e-4)
