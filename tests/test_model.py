"""The training API (MoS as a PEFT method) on tiny Hugging Face models built from configs (no downloads)."""
import contextlib
import datetime
import json
import os
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM  # noqa: E402

import mos_ext  # noqa: E402
from mos_ext import MoSConfig, get_mos_model  # noqa: E402
from mos_ext.layers import MoSLinear, MoSPoolBank  # noqa: E402
from mos_ext.pools import init_pools, sample_tables  # noqa: E402

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


def pools(pm, adapter="default"):
    """{type: (A pool, B pool)} of one adapter of a PeftModel (A is MiSS's frozen identity for MiSS)."""
    cfg = pm.base_model.peft_config[adapter]
    return {t: pm.base_model.pool_bank().get(adapter, t) for t in cfg.type_layers}


def trainable(pm) -> int:
    return sum(p.numel() for p in pm.parameters() if p.requires_grad)


def randomize_pools(pm, seed=1, std=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, b in pools(pm).values():
            b.copy_(torch.randn(b.shape, generator=g) * std)


def adapter_sd(pm):
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(pm).items()}


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
    assert trainable(model) == expected
    assert model.get_nb_trainable_parameters()[0] == expected
    # a model on meta gets its pools on meta: nothing of pool size is materialized on the host
    assert all(p.device.type == "meta" for p in model.base_model.pool_bank().parameters())


def test_llama32_3b_count():
    model = get_mos_model(_meta_llama(3072, 8192, 28, 24, 8),
                          MoSConfig(r=8, equivalent_rank=2, shards_per_vector=4, private_rank=1, target_modules=ALL7))
    assert trainable(model) == 3_039_232


def test_count_independent_of_r_l_p():
    counts = set()
    for r, l, p in ((4, 4, 1), (6, 2, 0), (2, 1, 2), (3, 8, 1)):
        m = get_mos_model(tiny_llama(), mos_cfg(r=r, shards_per_vector=l, private_rank=p, equivalent_rank=2))
        counts.add(trainable(m))
    assert counts == {2 * 3 * (128 + 96 + 96 + 128 + 160 + 160 + 160)}


# ------------------------------------------------------------------ config validation


@pytest.mark.parametrize("kw,msg", [
    (dict(private_rank=3), "private_rank must satisfy"),
    (dict(private_rank=2, r=4, equivalent_rank=2), "leaves no shared shards"),
    (dict(shards_per_vector=5), "divisible by shards_per_vector=5"),
    (dict(r=12), "exceed the public pool"),
    (dict(target_modules=["nope_proj"]), r"match no module|\['nope_proj'\] not found"),
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
    names = [n for n, _ in m.named_parameters() if "shard_pools" in n]
    assert sorted(names) == sorted(f"base_model.model.shard_pools.mos_{s}_{t}.default" for t in ALL7 for s in "AB")
    assert all(not p.requires_grad for n, p in m.named_parameters() if "shard_pools" not in n)
    assert all(p.requires_grad for n, p in m.named_parameters() if "shard_pools" in n)
    # every layer of a type reads the very same pool tensors
    for _, lay in m.base_model.mos_layers():
        t = next(t for t, ps in m.base_model.peft_config["default"].type_layers.items()
                 if any(lay is m.base_model.model.get_submodule(p) for p in ps))
        assert all(x is y for x, y in zip(lay.pools("default"), pools(m)[t]))
    randomize_pools(m)
    out = m(IDS).logits
    out.float().pow(2).mean().backward()
    for t, (a, b) in pools(m).items():
        assert a.grad is not None and a.grad.abs().sum() > 0, t
        assert b.grad is not None and b.grad.abs().sum() > 0, t


def test_pool_gradients_equal_naive_autograd():
    """MoSLinear's fused path against A = P_A[I_A], B = P_B[I_B] through plain autograd."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24)
    cfg = mos_cfg(r=4, equivalent_rank=2, private_rank=1, shards_per_vector=4)
    bank = MoSPoolBank()
    a0, b0 = init_pools(cfg, 32, 24, 3, gen=torch.Generator().manual_seed(0))
    bank.add("default", "t", a0, b0, a_frozen=False)
    pool_a, pool_b = bank.get("default", "t")
    with torch.no_grad():
        pool_b.normal_()
    ia, ib = sample_tables(cfg, 32, 24, 3, torch.Generator().manual_seed(1))
    layers = []
    for k in range(3):
        lay = MoSLinear(base)
        lay.update_layer("default", bank, "t", ia[k], ib[k], cfg.scale, 0.0)
        layers.append(lay)
    x = torch.randn(5, 7, 32)
    loss = sum((lay(x) ** 2).sum() for lay in layers)
    loss.backward()
    ga, gb = pool_a.grad.clone(), pool_b.grad.clone()

    pa = pool_a.detach().clone().requires_grad_()
    pb = pool_b.detach().clone().requires_grad_()
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
    assert all(a.dtype == torch.float32 and a.grad is not None for a, _ in pools(m).values())
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)


def test_lora_method_reproduces_peft_lora():
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
        for t, names in m.base_model.peft_config["default"].type_layers.items():
            a, b = pools(m)[t]
            for k, n in enumerate(names):
                lm = pm.base_model.model.get_submodule(n)
                a[k * 4:(k + 1) * 4] = lm.lora_A["default"].weight
                b[k * 4:(k + 1) * 4] = lm.lora_B["default"].weight.T
    torch.testing.assert_close(m(IDS).logits, pm(IDS).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ save / load

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


def test_save_load_roundtrip_bit_exact(tmp_path):
    m = get_mos_model(tiny_llama(seed=4), mos_cfg())
    randomize_pools(m)
    out = m(IDS).logits
    m.save_pretrained(str(tmp_path))
    assert set(os.listdir(tmp_path)) - {"README.md"} == ADAPTER_FILES  # PEFT adds a model card
    for m2 in (peft.PeftModel.from_pretrained(tiny_llama(seed=4), str(tmp_path)),
               peft.PeftModel.from_pretrained(tiny_llama(seed=4), str(tmp_path), is_trainable=True)):
        assert torch.equal(m2(IDS).logits, out)
        sd1, sd2 = adapter_sd(m), adapter_sd(m2)
        assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # compressed size: pools + int32 tables + a small header, never a materialized LoRA
    from safetensors.torch import load_file

    on_disk = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert on_disk.keys() == sd1.keys()
    payload = sum(v.numel() * v.element_size() for v in sd1.values())
    assert payload == sum(v.numel() * v.element_size() for v in on_disk.values())
    size = os.path.getsize(tmp_path / "adapter_model.safetensors")
    assert payload <= size <= payload + 16_384
    tables = [k for k in on_disk if k.endswith((".mos_idx_a", ".mos_idx_b"))]
    assert len(tables) == 2 * 7 * 3 and all(on_disk[k].dtype == torch.int32 for k in tables)
    assert all(k in tables or ".shard_pools." in k for k in on_disk)  # pools + tables, nothing else
    types = m.base_model.peft_config["default"].type_layers
    lora_equiv = 0  # fp32 rank-r LoRA bytes
    for t, paths in types.items():
        lay = m.base_model.model.get_submodule(paths[0])
        lora_equiv += 4 * (lay.in_features + lay.out_features) * len(paths) * 4
    assert size < lora_equiv


def test_pickled_adapter_roundtrip(tmp_path):
    """save_pretrained(safe_serialization=False) writes PEFT's adapter_model.bin: every loader
    reads it back (torch.load with weights_only=True) to the same adapter."""
    m = get_mos_model(tiny_llama(seed=4), mos_cfg())
    randomize_pools(m)
    out = m(IDS).logits
    m.save_pretrained(str(tmp_path), safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").is_file() and not (tmp_path / "adapter_model.safetensors").exists()
    for m2 in (peft.PeftModel.from_pretrained(tiny_llama(seed=4), str(tmp_path)),
               peft.PeftModel.from_pretrained(tiny_llama(seed=4), str(tmp_path), is_trainable=True)):
        assert torch.equal(m2(IDS).logits, out)
    spec = mos_ext.read_adapter(str(tmp_path))
    assert set(spec.layers) == set(mos_ext.read_adapter(m).layers)


def _corrupt_variant(tmp_path, good, name, edit_cfg=None, edit_tensors=None, raw=None):
    import shutil

    from safetensors.torch import load_file, save_file

    d = tmp_path / name
    shutil.copytree(good, d)
    if edit_cfg:
        meta = json.load(open(d / "adapter_config.json"))
        edit_cfg(meta)
        json.dump(meta, open(d / "adapter_config.json", "w"))
    if edit_tensors:
        t = load_file(str(d / "adapter_model.safetensors"))
        edit_tensors(t)
        save_file(t, str(d / "adapter_model.safetensors"))
    if raw:
        raw(d)
    return str(d)


def _halve(f):
    b = open(f, "rb").read()
    open(f, "wb").write(b[: len(b) // 2])


def _trunc(d):
    _halve(d / "adapter_model.safetensors")


def _as_bin(d, payload=None, cut=False):
    """The variant in PEFT's pickled layout (adapter_model.bin), or a payload saved in its place."""
    from safetensors.torch import load_file

    st = d / "adapter_model.safetensors"
    torch.save(load_file(str(st)) if payload is None else payload, d / "adapter_model.bin")
    os.remove(st)
    if cut:
        _halve(d / "adapter_model.bin")


POOL = "base_model.model.shard_pools.mos_{}_{}"
FIRST_IDX = "base_model.model.model.layers.0.self_attn.q_proj.mos_idx_a"
CORRUPT = {  # name: (variant kwargs, what the error must say)
    "trunc": (dict(raw=_trunc), "corrupt adapter weights"),
    "badjson": (dict(raw=lambda d: open(d / "adapter_config.json", "w").write("{not json")), "corrupt adapter config"),
    "nopefttype": (dict(edit_cfg=lambda m: m.pop("peft_type")), "peft_type"),
    "version": (dict(edit_cfg=lambda m: m.update(format_version=99)), "format_version"),
    "missing": (dict(edit_tensors=lambda t: t.pop(POOL.format("B", "q_proj"))), "missing"),
    "shape": (dict(edit_tensors=lambda t: t.update({POOL.format("A", "q_proj"): t[POOL.format("A", "q_proj")][:-1].clone()})),
              "shape|outside"),  # one row short: the tables then point past the pool
    "grown": (dict(edit_tensors=lambda t: t.update({POOL.format("A", "q_proj"): torch.cat(
        [t[POOL.format("A", "q_proj")], torch.zeros(1, t[POOL.format("A", "q_proj")].shape[1])])})), "shape"),
    "nan": (dict(edit_tensors=lambda t: t[POOL.format("B", "v_proj")].fill_(float("nan"))), "non-finite"),
    "range": (dict(edit_tensors=lambda t: t[FIRST_IDX].fill_(10**6)), "outside"),
    "dtype": (dict(edit_tensors=lambda t: t.update({FIRST_IDX: t[FIRST_IDX].float()})), "integer"),
    "extra": (dict(edit_tensors=lambda t: t.update({"junk": torch.zeros(1)})), "junk"),
    "cfg": (dict(edit_cfg=lambda m: m.update(r=40)), r"exceed the public pool|expected \[40"),
    "alpha": (dict(edit_cfg=lambda m: m.update(lora_alpha=float("inf"))), "lora_alpha must be finite"),
    "bin_trunc": (dict(raw=lambda d: _as_bin(d, cut=True)), "corrupt adapter weights .*adapter_model.bin"),
    "bin_code": (dict(raw=lambda d: _as_bin(d, payload={"x": datetime.date(2026, 1, 1)})),
                 "corrupt adapter weights .*UnpicklingError"),  # weights_only: never unpickles objects
    "bin_nontensor": (dict(raw=lambda d: _as_bin(d, payload={"x": [1, 2]})), "not a mapping of names to tensors"),
}


@pytest.fixture(scope="module")
def good_adapter(tmp_path_factory):
    m = get_mos_model(tiny_llama(seed=5), mos_cfg())
    randomize_pools(m)
    good = tmp_path_factory.mktemp("good")
    m.save_pretrained(str(good))
    return good


@contextlib.contextmanager
def raises_naming(exc, msg, path):
    """pytest.raises(exc) whose message, with the adapter's path taken out, matches msg."""
    with pytest.raises(exc) as info:
        yield info
    text = str(info.value).replace(str(path), "<dir>")
    assert re.search(msg, text), f"{msg!r} not in {text!r}"


def _untouched(target):
    before = {k: v.clone() for k, v in target.state_dict().items()}
    mods_before = [type(mod) for mod in target.modules()]

    def check(path):
        assert [type(mod) for mod in target.modules()] == mods_before, f"{path}: the model's modules changed"
        assert target.state_dict().keys() == before.keys(), f"{path}: the model's state keys changed"
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), f"{path}: weights changed"
    return check


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_adapter_refused_by_name_model_untouched(tmp_path, good_adapter, case):
    kw, msg = CORRUPT[case]
    path = _corrupt_variant(tmp_path, good_adapter, "d", **kw)  # a neutral name: the message must name the problem
    with raises_naming(ValueError, msg, path):
        mos_ext.read_adapter(path)
    target = tiny_llama(seed=5)
    check = _untouched(target)
    with raises_naming(ValueError, msg, path):
        if case in MOS_DISPATCHED:  # a MoS directory: PEFT's loader; the rest: import_adapter, naming it too
            peft.PeftModel.from_pretrained(target, path, is_trainable=True)
        else:
            mos_ext.import_adapter(target, path)
    check(path)


# A directory whose config PEFT cannot even dispatch to MoS (bad JSON, no peft_type) fails inside PEFT
# before any MoS code runs; every other case is a readable MoS config, so MoS decides.
MOS_DISPATCHED = [c for c in CORRUPT if c not in ("badjson", "nopefttype")]


@pytest.mark.parametrize("case", MOS_DISPATCHED)
def test_corrupt_adapter_refused_by_peft_from_pretrained(tmp_path, good_adapter, case):
    """PEFT's own loading path (PeftModel.from_pretrained) refuses it too, naming the problem."""
    kw, msg = CORRUPT[case]
    path = _corrupt_variant(tmp_path, good_adapter, "d", **kw)
    with raises_naming(ValueError, msg, path):
        peft.PeftModel.from_pretrained(tiny_llama(seed=5), path)


@pytest.mark.parametrize("case", list(CORRUPT))
def test_corrupt_adapter_onto_live_model_changes_nothing(tmp_path, good_adapter, case):
    """PeftModel.load_adapter of a bad directory raises and leaves the live model as it was."""
    kw, _ = CORRUPT[case]
    path = _corrupt_variant(tmp_path, good_adapter, "d", **kw)
    m = get_mos_model(tiny_llama(seed=5), mos_cfg())
    randomize_pools(m, seed=9)
    ref = m(IDS).logits
    snap = {k: v.clone() for k, v in m.state_dict().items()}
    # a config PEFT cannot dispatch to MoS fails inside PEFT (KeyError for a missing peft_type)
    with pytest.raises(ValueError if case in MOS_DISPATCHED else (ValueError, KeyError)):
        m.load_adapter(path, adapter_name="other")
    assert list(m.peft_config) == ["default"], path
    assert m.state_dict().keys() == snap.keys() and all(torch.equal(snap[k], v) for k, v in m.state_dict().items())
    assert torch.equal(m(IDS).logits, ref)


def test_mismatched_model_refused_model_untouched(good_adapter):
    """An adapter trained on hidden 64 onto a hidden-128 model: refused, naming the shapes, before
    the model is touched."""
    target = tiny_llama(hidden=128, inter=96)
    check = _untouched(target)
    with raises_naming(ValueError, r"128.*64|64.*128", good_adapter):
        peft.PeftModel.from_pretrained(target, str(good_adapter), is_trainable=True)
    check(good_adapter)


def test_mismatched_model_refused_by_peft_from_pretrained(good_adapter):
    with raises_naming(ValueError, r"128.*64|64.*128", good_adapter):
        peft.PeftModel.from_pretrained(tiny_llama(hidden=128, inter=96), str(good_adapter))


def test_import_adapter_leaves_format2_to_peft(good_adapter):
    """One way per job: a format-2 directory is PEFT's (PeftModel.from_pretrained); import_adapter says so."""
    target = tiny_llama()
    check = _untouched(target)
    with pytest.raises(ValueError, match="PeftModel.from_pretrained"):
        mos_ext.import_adapter(target, str(good_adapter))
    check(good_adapter)


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError):
        mos_ext.import_adapter(tiny_llama(), str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError):
        mos_ext.read_adapter(str(tmp_path / "nowhere"))


def test_load_adapter_into_live_model(tmp_path):
    a = get_mos_model(tiny_llama(seed=6), mos_cfg(seed=1))
    randomize_pools(a, seed=3)
    a.save_pretrained(str(tmp_path))
    b = get_mos_model(tiny_llama(seed=6), mos_cfg(seed=1))
    b.load_adapter(str(tmp_path), adapter_name="loaded")
    b.set_adapter("loaded")
    assert torch.equal(a(IDS).logits, b(IDS).logits)


# ------------------------------------------------------------------ merge / export


def test_merge_unmerge_and_unload():
    m = get_mos_model(tiny_llama(seed=7), mos_cfg())
    randomize_pools(m, std=0.2)
    w0 = {k: v.clone() for k, v in m.base_model.model.state_dict().items() if k.endswith("weight")}
    ref = m(IDS).logits
    with m.disable_adapter():
        plain = m(IDS).logits
    torch.testing.assert_close(m(IDS).logits, ref, rtol=0, atol=0)
    assert (ref - plain).abs().max() > 1e-3  # the adapter does something
    m.merge_adapter()
    assert all(lay.merged for _, lay in m.base_model.mos_layers())
    torch.testing.assert_close(m(IDS).logits, ref, rtol=1e-5, atol=1e-5)
    m.unmerge_adapter()
    for k, v in m.base_model.model.state_dict().items():
        if k in w0:
            torch.testing.assert_close(v, w0[k], rtol=0, atol=1e-6)
    torch.testing.assert_close(m(IDS).logits, ref, rtol=1e-6, atol=1e-6)
    base = m.merge_and_unload()
    assert not any(isinstance(mod, (MoSLinear, MoSPoolBank)) for mod in base.modules())
    torch.testing.assert_close(base(IDS).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["mos", "miss"])
def test_export_lora_loads_in_peft(tmp_path, method):
    kw = dict(method="miss", r=4) if method == "miss" else {}
    m = get_mos_model(tiny_llama(seed=8), mos_cfg(**kw))
    randomize_pools(m, std=0.1)
    ref = m(IDS).logits
    mos_ext.export_lora(m, str(tmp_path))
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
        assert trainable(m) == sum(L * per(o) for o in outs.values())
        layer = m.base_model.model.model.layers[0].self_attn.q_proj
        x = torch.randn(3, 64)
        pa, pb = pools(m)["q_proj"]
        with torch.no_grad():
            pb.normal_()
        D = pb[0:4]  # layer 0's D
        folded = x.reshape(3, -1, 4).sum(1)  # S(x): sum of r-blocks
        expect = folded @ (D if kw["method"] == "miss" else D.repeat(1, 64 // 8))
        torch.testing.assert_close(layer.delta(x, "default"), expect, rtol=1e-5, atol=1e-5)
        out = m(IDS).logits
        out.pow(2).mean().backward()
        assert not pa.requires_grad and pa.grad is None and pb.grad is not None


def _tiny_gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=128, n_positions=32)).eval()


def test_gpt2_conv1d(tmp_path):
    """Conv1D layers ([in, out] weights); the two c_proj shapes become two pool types."""
    m = get_mos_model(_tiny_gpt2(), mos_cfg(target_modules=["c_attn", "c_proj", "c_fc"]))
    assert set(pools(m)) == {"c_attn", "attn_c_proj", "mlp_c_proj", "c_fc"}
    randomize_pools(m, std=0.2)
    ref = m(IDS).logits
    m.merge_adapter()
    torch.testing.assert_close(m(IDS).logits, ref, rtol=1e-4, atol=1e-4)
    m.unmerge_adapter()
    m.save_pretrained(str(tmp_path))
    m2 = peft.PeftModel.from_pretrained(_tiny_gpt2(), str(tmp_path))
    assert torch.equal(m2(IDS).logits, ref)


# ------------------------------------------------------------------ training-path wiring (issue 11)


def test_config_deterministic_reaches_the_op(monkeypatch):
    """MoSConfig(deterministic=True) holds the fixed-order pool-gradient reduction on for that
    adapter's forward (and so its backward), and only for it."""
    from mos_ext import ops

    seen = []
    real = ops.sharded_lora

    def spy(*a):
        seen.append(mos_ext.deterministic_grads_enabled())
        return real(*a)

    monkeypatch.setattr(ops, "sharded_lora", spy)
    grads = {}
    for det in (False, True):
        m = get_mos_model(tiny_llama(seed=7), mos_cfg(deterministic=det))
        randomize_pools(m)
        seen.clear()
        m(IDS, labels=IDS).loss.backward()
        assert seen and all(s == det for s in seen), (det, seen)
        grads[det] = [p.grad.clone() for p in m.base_model.pool_bank().parameters() if p.grad is not None]
    assert mos_ext.deterministic_grads_enabled() is False  # restored after each call
    assert len(grads[True]) == len(grads[False]) > 0
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(grads[True], grads[False]))


def test_pool_gradients_go_through_one_tap_per_pool():
    """In training, each layer reads its pools through the bank's gradient taps: one tap per pool per
    forward pass (one fp32 accumulator), and the gradients equal those of a pass without taps."""
    m = get_mos_model(tiny_llama(seed=8), mos_cfg())
    randomize_pools(m)
    bank = m.base_model.pool_bank()
    loss = m(IDS, labels=IDS).loss
    n_pools = sum(1 for p in bank.parameters() if p.requires_grad)
    assert len(bank.grad_taps._taps) == n_pools  # 7 types x (A, B), each tapped once for its 3 layers
    loss.backward()
    tapped = [p.grad.clone() for p in bank.parameters()]
    for p in bank.parameters():
        p.grad = None
    bank.grad_taps.take = lambda owner, *pools: pools  # no taps: each layer's gradient flows on its own
    m(IDS, labels=IDS).loss.backward()
    plain = [p.grad for p in bank.parameters()]
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(tapped, plain))


def test_loaded_tables_validated_by_any_loader():
    """A table loaded through plain load_state_dict (as transformers' load_adapter does) is checked once."""
    m = get_mos_model(tiny_llama(seed=9), mos_cfg())
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    key = next(k for k in sd if k.endswith("mos_idx_a.default"))
    sd[key].fill_(10**6)
    with pytest.raises(ValueError, match="mos_idx_a"):
        m.load_state_dict(sd)
