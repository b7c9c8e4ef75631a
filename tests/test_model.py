"""The training API on tiny Hugging Face models built from configs (no downloads)."""
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

from mos_ext import MoSConfig, MoSModel, get_mos_model  # noqa: E402
from mos_ext.layers import MoSLinear  # noqa: E402
from mos_ext.pools import sample_tables  # noqa: E402

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(seed=0, layers=3, hidden=64, inter=96):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def mos_cfg(**kw):
    base = dict(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1, lora_alpha=16, target_modules=ALL7, seed=3)
    base.update(kw)
    return MoSConfig(**base)


def randomize_pools(model, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.pools.values():
            p.B.copy_(torch.randn(p.B.shape, generator=g) * std)


IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------ parameter counts


def _meta_llama(h, inter, layers, heads, kv):
    cfg = LlamaConfig(vocab_size=32000, hidden_size=h, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv)
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


@pytest.mark.parametrize("e,r,p,expected", [(2, 8, 1, 4_997_120), (8, 16, 4, 19_988_480), (64, 64, 16, 159_907_840)])
def test_llama2_7b_counts(e, r, p, expected):
    model = get_mos_model(_meta_llama(4096, 11008, 32, 32, 32),
                          MoSConfig(r=r, equivalent_rank=e, shards_per_vector=4, private_rank=p, target_modules=ALL7))
    assert model.num_trainable_parameters() == expected


def test_llama32_3b_count():
    model = get_mos_model(_meta_llama(3072, 8192, 28, 24, 8),
                          MoSConfig(r=8, equivalent_rank=2, shards_per_vector=4, private_rank=1, target_modules=ALL7))
    assert model.num_trainable_parameters() == 3_039_232


def test_count_independent_of_r_l_p():
    counts = set()
    for r, l, p in ((4, 4, 1), (6, 2, 0), (2, 1, 2), (3, 8, 1)):
        m = get_mos_model(tiny_llama(), mos_cfg(r=r, shards_per_vector=l, private_rank=p, equivalent_rank=2))
        counts.add(m.num_trainable_parameters())
    assert counts == {2 * 3 * (128 + 96 + 96 + 128 + 160 + 160 + 160)}


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize("kw,msg", [
    (dict(private_rank=3), "private_rank must satisfy"),
    (dict(private_rank=2, r=4, equivalent_rank=2), "leaves no shared shards"),
    (dict(shards_per_vector=5), "divisible by shards_per_vector=5"),
    (dict(r=12), "exceed the public pool"),
    (dict(target_modules=["nope_proj"]), "match no module"),
    (dict(method="vera"), "method must be one of"),
    (dict(lora_dropout=1.5), "lora_dropout"),
])
def test_config_errors(kw, msg):
    with pytest.raises(ValueError, match=msg):
        get_mos_model(tiny_llama(), mos_cfg(**kw))


def test_config_json_roundtrip():
    c = mos_cfg(tie_indices=True)
    assert MoSConfig.from_dict(json.loads(json.dumps(c.to_dict()))) == c
    with pytest.raises(ValueError, match="unknown MoSConfig fields"):
        MoSConfig.from_dict({**c.to_dict(), "bogus": 1})


# ------------------------------------------------------------------ index tables


@pytest.mark.parametrize("tie", [False, True])
def test_table_invariants(tie):
    cfg = mos_cfg(r=6, equivalent_rank=3, private_rank=2, shards_per_vector=4, tie_indices=tie)
    L, l, p, e, r = 5, 4, 2, 3, 6
    ia, ib = sample_tables(cfg, 64, 32, L, torch.Generator().manual_seed(0))
    P0 = (e - p) * L * l
    assert ia.dtype == torch.int32 and ia.shape == (L, r, l)
    for t in (ia, ib):
        for k in range(L):
            flat = t[k].reshape(-1)
            assert flat.unique().numel() == flat.numel(), "repeat inside one layer"
            shared, private = flat[: (r - p) * l], flat[(r - p) * l:]
            assert (shared < P0).all() and (shared >= 0).all()
            assert torch.equal(private, P0 + k * p * l + torch.arange(p * l, dtype=torch.int32))
        assert int(t.max()) < e * L * l
    assert torch.equal(ia, ib) == tie
    # layers draw independently
    assert not torch.equal(ia[0, : r - p], ia[1, : r - p])


def test_lora_tables_are_private_identity():
    cfg = MoSConfig(r=4, method="lora", target_modules=ALL7)
    ia, ib = sample_tables(cfg, 64, 32, 3, torch.Generator())
    for k in range(3):
        assert torch.equal(ia[k, :, 0], k * 4 + torch.arange(4, dtype=torch.int32))
        assert torch.equal(ib[k], ia[k])


# ------------------------------------------------------------------ forward / gradients


def test_pools_registered_once_and_forward_backward():
    m = get_mos_model(tiny_llama(), mos_cfg())
    names = [n for n, _ in m.named_parameters() if "pools" in n]
    assert sorted(names) == sorted(f"pools.{t}.{s}" for t in ALL7 for s in "AB")
    assert all(not p.requires_grad for n, p in m.named_parameters() if "pools" not in n)
    randomize_pools(m)
    out = m(IDS).logits
    out.float().pow(2).mean().backward()
    for t, p in m.pools.items():
        assert p.A.grad is not None and p.A.grad.abs().sum() > 0, t
        assert p.B.grad is not None and p.B.grad.abs().sum() > 0, t


def test_pool_gradients_equal_naive_autograd():
    """MoSLinear's fused path against A = P_A[I_A], B = P_B[I_B] through plain autograd."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24)
    cfg = mos_cfg(r=4, equivalent_rank=2, private_rank=1, shards_per_vector=4)
    from mos_ext.pools import ShardPools

    pools = ShardPools(cfg, 32, 24, 3, gen=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pools.B.normal_()
    ia, ib = sample_tables(cfg, 32, 24, 3, torch.Generator().manual_seed(1))
    layers = [MoSLinear(base, pools, ia[k], ib[k], cfg.scale) for k in range(3)]
    x = torch.randn(5, 7, 32)
    loss = sum((lay(x) ** 2).sum() for lay in layers)
    loss.backward()
    ga, gb = pools.A.grad.clone(), pools.B.grad.clone()

    pa = pools.A.detach().clone().requires_grad_()
    pb = pools.B.detach().clone().requires_grad_()
    ref = 0
    for k in range(3):
        A = pa[ia[k].long()].reshape(4, 32)
        B = pb[ib[k].long()].reshape(4, 24).T
        ref = ref + ((base(x) + cfg.scale * (x @ A.T) @ B.T) ** 2).sum()
    ref.backward()
    torch.testing.assert_close(ga, pa.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, pb.grad, rtol=1e-4, atol=1e-4)


def test_autocast_and_plain_fp32_agree():
    m = get_mos_model(tiny_llama(), mos_cfg())
    randomize_pools(m)
    ref = m(IDS).logits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(IDS).logits
        out.float().mean().backward()
    assert all(p.A.dtype == torch.float32 and p.A.grad is not None for p in m.pools.values())
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_lora_method_reproduces_peft_lora():
    peft = pytest.importorskip("peft")
    base = tiny_llama(seed=1)
    ref_model = tiny_llama(seed=1)
    pm = peft.get_peft_model(ref_model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=ALL7, lora_dropout=0.0))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for n, mod in pm.named_modules():
            if hasattr(mod, "lora_B") and "default" in getattr(mod, "lora_B", {}):
                mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape, generator=g) * 0.1)
    m = get_mos_model(base, MoSConfig(r=4, lora_alpha=8, method="lora", target_modules=ALL7))
    with torch.no_grad():
        for t, names in m.layer_names.items():
            for k, n in enumerate(names):
                lm = pm.base_model.model.get_submodule(n)
                m.pools[t].A[k * 4:(k + 1) * 4] = lm.lora_A["default"].weight
                m.pools[t].B[k * 4:(k + 1) * 4] = lm.lora_B["default"].weight.T
    torch.testing.assert_close(m(IDS).logits, pm(IDS).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ save / load


def test_save_load_roundtrip_bit_exact(tmp_path):
    m = get_mos_model(tiny_llama(seed=4), mos_cfg())
    randomize_pools(m)
    out = m(IDS).logits
    m.save_adapter(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "adapter_config.json"]
    m2 = MoSModel.from_pretrained(tiny_llama(seed=4), str(tmp_path))
    assert torch.equal(m2(IDS).logits, out)
    sd1, sd2 = m.adapter_state_dict(), m2.adapter_state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # compressed size: pools + int32 tables + a small header, never a materialized LoRA
    payload = sum(v.numel() * v.element_size() for v in sd1.values())
    size = os.path.getsize(tmp_path / "adapter.safetensors")
    assert payload <= size <= payload + 16_384
    assert all(v.dtype == torch.int32 for k, v in sd1.items() if k.startswith("index."))
    lora_equiv = sum(4 * (m.pools[t].h + m.pools[t].o) * 3 * 4 for t in m.pools)  # fp32 rank-r LoRA bytes
    assert size < lora_equiv


def _corrupt_cases(tmp_path, good):
    import shutil

    from safetensors.torch import load_file, save_file

    def variant(name, edit_cfg=None, edit_tensors=None, raw=None):
        d = tmp_path / name
        shutil.copytree(good, d)
        if edit_cfg:
            meta = json.load(open(d / "adapter_config.json"))
            edit_cfg(meta)
            json.dump(meta, open(d / "adapter_config.json", "w"))
        if edit_tensors:
            t = load_file(str(d / "adapter.safetensors"))
            edit_tensors(t)
            save_file(t, str(d / "adapter.safetensors"))
        if raw:
            raw(d)
        return str(d)

    def trunc(d):
        b = open(d / "adapter.safetensors", "rb").read()
        open(d / "adapter.safetensors", "wb").write(b[: len(b) // 2])

    first_idx = "index.model.layers.0.self_attn.q_proj.A"
    return [
        (variant("trunc", raw=trunc), "corrupt adapter weights"),
        (variant("badjson", raw=lambda d: open(d / "adapter_config.json", "w").write("{not json")), "corrupt adapter config"),
        (variant("noformat", edit_cfg=lambda m: m.pop("format")), "not a mos_ext adapter"),
        (variant("version", edit_cfg=lambda m: m.update(format_version=99)), "format_version"),
        (variant("missing", edit_tensors=lambda t: t.pop("pools.q_proj.B")), "missing"),
        (variant("shape", edit_tensors=lambda t: t.update({"pools.q_proj.A": t["pools.q_proj.A"][:-1].clone()})), "shape"),
        (variant("nan", edit_tensors=lambda t: t["pools.v_proj.B"].fill_(float("nan"))), "non-finite"),
        (variant("range", edit_tensors=lambda t: t[first_idx].fill_(10**6)), "outside"),
        (variant("dtype", edit_tensors=lambda t: t.update({first_idx: t[first_idx].float()})), "integer table"),
        (variant("extra", edit_tensors=lambda t: t.update({"junk": torch.zeros(1)})), "unexpected tensors"),
        (variant("cfg", edit_cfg=lambda m: m["config"].update(r=40)), "exceed the public pool"),
    ]


def test_corrupt_or_mismatched_adapter_leaves_model_untouched(tmp_path):
    m = get_mos_model(tiny_llama(seed=5), mos_cfg())
    randomize_pools(m)
    good = tmp_path / "good"
    m.save_adapter(str(good))
    for path, msg in _corrupt_cases(tmp_path, good):
        target = tiny_llama(seed=5)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        mods_before = [type(mod) for mod in target.modules()]
        with pytest.raises(ValueError, match=msg):
            MoSModel.from_pretrained(target, path)
        assert [type(mod) for mod in target.modules()] == mods_before, path
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), path
        # load_adapter onto a live model: nothing changes either
        snap = {k: v.clone() for k, v in m.adapter_state_dict().items()}
        with pytest.raises(ValueError):
            m.load_adapter(path)
        assert all(torch.equal(snap[k], v) for k, v in m.adapter_state_dict().items()), path
    with pytest.raises(ValueError, match=r"is 128->128 in the model but 64->64 in the adapter"):
        MoSModel.from_pretrained(tiny_llama(hidden=128, inter=96), str(good))
    with pytest.raises(FileNotFoundError):
        MoSModel.from_pretrained(tiny_llama(), str(tmp_path / "nowhere"))


def test_load_adapter_replaces_weights(tmp_path):
    a = get_mos_model(tiny_llama(seed=6), mos_cfg(seed=1))
    randomize_pools(a, seed=3)
    a.save_adapter(str(tmp_path))
    b = get_mos_model(tiny_llama(seed=6), mos_cfg(seed=1))
    b.load_adapter(str(tmp_path))
    assert torch.equal(a(IDS).logits, b(IDS).logits)


# ------------------------------------------------------------------ merge / export


def test_merge_unmerge_and_unload():
    m = get_mos_model(tiny_llama(seed=7), mos_cfg())
    randomize_pools(m, std=0.2)
    w0 = {k: v.clone() for k, v in m.base_model.state_dict().items() if k.endswith("weight")}
    ref = m(IDS).logits
    m.set_adapter_enabled(False)
    plain = m(IDS).logits
    m.set_adapter_enabled(True)
    assert (ref - plain).abs().max() > 1e-3  # the adapter does something
    m.merge()
    torch.testing.assert_close(m(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    m.unmerge()
    for k, v in m.base_model.state_dict().items():
        if k in w0:
            torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(m(IDS).logits, ref, rtol=1e-6, atol=1e-6)
    base = m.merge_and_unload()
    assert not any(isinstance(mod, MoSLinear) for mod in base.modules())
    torch.testing.assert_close(base(IDS).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["mos", "miss"])
def test_export_lora_loads_in_peft(tmp_path, method):
    peft = pytest.importorskip("peft")
    kw = dict(method="miss", r=4) if method == "miss" else {}
    m = get_mos_model(tiny_llama(seed=8), mos_cfg(**kw))
    randomize_pools(m, std=0.1)
    ref = m(IDS).logits
    m.export_lora(str(tmp_path))
    pm = peft.PeftModel.from_pretrained(tiny_llama(seed=8), str(tmp_path))
    torch.testing.assert_close(pm(IDS).logits, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ MiSS and GPT-2


def test_miss_default_and_mini():
    for kw in (dict(method="miss", r=4), dict(method="miss_mini", r=4, mini_r=8)):
        m = get_mos_model(tiny_llama(seed=9), mos_cfg(**kw))
        # trainable: D per layer: r * o (default) or r * mini_r (mini)
        L = 3
        outs = {"q_proj": 64, "k_proj": 32, "v_proj": 32, "o_proj": 64, "gate_proj": 96, "up_proj": 96, "down_proj": 64}
        per = (lambda o: 4 * o) if kw["method"] == "miss" else (lambda o: 4 * 8)
        assert m.num_trainable_parameters() == sum(L * per(o) for o in outs.values())
        layer = m.base_model.model.layers[0].self_attn.q_proj
        x = torch.randn(3, 64)
        with torch.no_grad():
            m.pools["q_proj"].B.normal_()
        D = m.pools["q_proj"].B[0:4]  # layer 0's D
        folded = x.reshape(3, -1, 4).sum(1)  # S(x): sum of r-blocks
        expect = folded @ (D if kw["method"] == "miss" else D.repeat(1, 64 // 8))
        torch.testing.assert_close(layer.delta(x), expect, rtol=1e-5, atol=1e-5)
        out = m(IDS).logits
        out.pow(2).mean().backward()
        assert m.pools["q_proj"].A.grad is None and m.pools["q_proj"].B.grad is not None


def _tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=32)).eval()


def test_gpt2_conv1d(tmp_path):
    """Conv1D layers ([in, out] weights); the two c_proj shapes become two pool types."""
    m = get_mos_model(_tiny_gpt2(), mos_cfg(target_modules=["c_attn", "c_proj", "c_fc"]))
    assert set(m.pools) == {"c_attn", "attn_c_proj", "mlp_c_proj", "c_fc"}
    randomize_pools(m, std=0.2)
    ref = m(IDS).logits
    m.merge()
    torch.testing.assert_close(m(IDS).logits, ref, rtol=1e-4, atol=1e-4)
    m.unmerge()
    m.save_adapter(str(tmp_path))
    m2 = MoSModel.from_pretrained(_tiny_gpt2(), str(tmp_path))
    assert torch.equal(m2(IDS).logits, ref)
