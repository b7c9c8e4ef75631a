"""Multi-tenant serving: AdapterStore (load/unload/capacity/validation) and MultiTenantModel
(isolation: each sequence of a mixed batch equals its tenant served alone)."""
import copy
import json
import random

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

peft = pytest.importorskip("peft")

from mos_ext import MoSConfig  # noqa: E402
from mos_ext.serving import AdapterStore, CapacityError, MultiTenantModel  # noqa: E402

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

CONFIGS = {
    "mos_a": MoSConfig(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1, target_modules=ALL7, seed=1),
    "mos_b": MoSConfig(r=3, equivalent_rank=2, shards_per_vector=8, private_rank=1, target_modules=ALL7, seed=2,
                       tie_indices=True),
    "mos_q": MoSConfig(r=2, equivalent_rank=1, shards_per_vector=2, private_rank=0, target_modules=["q_proj", "v_proj"],
                       seed=3),
    "lora": MoSConfig(r=6, method="lora", lora_alpha=12, target_modules=ALL7),
    "miss": MoSConfig(r=4, method="miss", target_modules=ALL7),
    "miss_mini": MoSConfig(r=4, method="miss_mini", mini_r=16, target_modules=ALL7),
}


def mos_model(model, name):
    """A PeftModel with the MoS adapter CONFIGS[name] (a copy: injection fills in the config's type_layers)."""
    return peft.get_peft_model(model, copy.deepcopy(CONFIGS[name]))


def trainable(pm) -> int:
    return sum(p.numel() for p in pm.parameters() if p.requires_grad)


def tiny(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """name -> (directory written by save_pretrained, PeftModel serving it alone)."""
    out = {}
    for i, name in enumerate(CONFIGS):
        m = mos_model(tiny(), name)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():
            for k, p in m.base_model.pools("default").items():
                if k.startswith("mos_B_"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        d = tmp_path_factory.mktemp(name)
        m.save_pretrained(str(d))
        out[name] = (str(d), m.eval())
    return out


def make_store(model, **kw):
    args = dict(capacity_bytes=4_000_000, max_tenants=16, max_rank=16)
    args.update(kw)
    return AdapterStore(model, **args)


IDS = torch.randint(0, 128, (6, 9), generator=torch.Generator().manual_seed(0))


def alone(adapters, name, ids):
    if name is None:
        return tiny()(ids).logits
    return adapters[name][1](ids).logits


@pytest.mark.parametrize("seed", range(4))
def test_isolation_random_mixes(adapters, seed):
    store = make_store(tiny())
    for name, (d, _) in adapters.items():
        store.load(name, d)
    mt = MultiTenantModel(tiny(), store)
    rng = random.Random(seed)
    names = [rng.choice(list(adapters) + [None]) for _ in range(IDS.shape[0])]
    out = mt(input_ids=IDS, adapter_names=names).logits
    base = tiny()(IDS).logits
    for b, n in enumerate(names):
        ref = alone(adapters, n, IDS[b:b + 1])[0]
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5, msg=f"sequence {b} ({n})")
        if n is not None:
            assert (out[b] - base[b]).abs().max() > 1e-3, f"{n} had no effect"


def test_greedy_generation_and_beams(adapters):
    store = make_store(tiny())
    for name, (d, _) in adapters.items():
        store.load(name, d)
    mt = MultiTenantModel(tiny(), store)
    names = ["mos_a", None, "lora", "miss", "mos_b", "miss_mini"]
    ids = IDS[:, :5]
    gen = mt.generate(input_ids=ids, attention_mask=torch.ones_like(ids), adapter_names=names, max_new_tokens=6,
                      do_sample=False, pad_token_id=0)
    for b, n in enumerate(names):
        solo_model = tiny() if n is None else adapters[n][1]
        solo = solo_model.generate(input_ids=ids[b:b + 1], attention_mask=torch.ones_like(ids[b:b + 1]), max_new_tokens=6,
                                   do_sample=False, pad_token_id=0)
        assert torch.equal(gen[b], solo[0]), n
    beams = mt.generate(input_ids=ids[:2], attention_mask=torch.ones_like(ids[:2]), adapter_names=["lora", "mos_a"],
                        max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
    for b, n in enumerate(["lora", "mos_a"]):
        solo = adapters[n][1].generate(input_ids=ids[b:b + 1], attention_mask=torch.ones_like(ids[b:b + 1]),
                                       max_new_tokens=4, num_beams=3, do_sample=False, pad_token_id=0)
        assert torch.equal(beams[b], solo[0]), n


def test_left_padded_prompts_of_mixed_lengths(adapters):
    """A left-padded batch of prompts of different lengths, one tenant (or none) per row: each row
    generates what its tenant generates for the unpadded prompt alone."""
    store = make_store(tiny())
    for name, (d, _) in adapters.items():
        store.load(name, d)
    mt = MultiTenantModel(tiny(), store)
    names, lens = ["mos_a", None, "lora", "miss", "mos_q"], [7, 3, 5, 2, 9]
    width = max(lens)
    ids = torch.zeros(len(names), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lens):
        ids[b, width - n:], mask[b, width - n:] = IDS[b, :n], 1
    gen = mt.generate(input_ids=ids, attention_mask=mask, adapter_names=names, max_new_tokens=6, do_sample=False,
                      pad_token_id=0)
    for b, (name, n) in enumerate(zip(names, lens)):
        solo = (tiny() if name is None else adapters[name][1]).generate(
            input_ids=IDS[b:b + 1, :n], attention_mask=torch.ones(1, n, dtype=torch.long), max_new_tokens=6,
            do_sample=False, pad_token_id=0)
        assert torch.equal(gen[b, width:], solo[0, n:]), name


def test_peft_lora_directory_matches_peft(adapters, tmp_path):
    peft = pytest.importorskip("peft")
    pm = peft.get_peft_model(tiny(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    pm.save_pretrained(str(tmp_path))
    store = make_store(tiny())
    store.load("peft", str(tmp_path))
    store.load("mos_a", adapters["mos_a"][0])
    mt = MultiTenantModel(tiny(), store)
    names = ["peft", "mos_a", "peft", None]
    out = mt(input_ids=IDS[:4], adapter_names=names).logits
    ref = pm.eval()(IDS[:4]).logits
    for b in (0, 2):
        torch.testing.assert_close(out[b], ref[b], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[1], alone(adapters, "mos_a", IDS[1:2])[0], rtol=1e-5, atol=1e-5)
    # PEFT's own mixed-batch path agrees too
    with torch.no_grad():
        mixed = pm(IDS[:4], adapter_names=["default", "__base__", "default", "__base__"]).logits
    torch.testing.assert_close(out[0], mixed[0], rtol=1e-5, atol=1e-5)


def test_store_memory_is_compressed_size(adapters):
    store = make_store(tiny())
    for name, (d, m) in adapters.items():
        store.load(name, d)
        full = trainable(m) * 4
        if name == "lora":
            assert store.memory_bytes(name) == full
        elif name.startswith("mos"):
            # pool rows that no layer's table uses are not stored
            assert 0.8 * full <= store.memory_bytes(name) <= full, name
    assert store.memory_bytes() == sum(store.memory_bytes(n) for n in store.names())
    assert store.memory_bytes("mos_a") * 3 == store.memory_bytes("lora")  # e=2 vs r=6, every row used


def test_capacity_unload_and_reuse(adapters):
    one = trainable(mos_model(tiny(), "mos_a")) * 4
    store = make_store(tiny(), capacity_bytes=int(one * 2.5))
    mt = MultiTenantModel(tiny(), store)
    store.load("t1", adapters["mos_a"][0])
    store.load("t2", adapters["mos_b"][0])
    before = mt(input_ids=IDS[:2], adapter_names=["t1", "t2"]).logits
    free = store.free_rows()
    with pytest.raises(CapacityError, match="store is full"):
        store.load("t3", adapters["mos_a"][0])
    assert store.names() == ["t1", "t2"] and store.free_rows() == free
    assert torch.equal(mt(input_ids=IDS[:2], adapter_names=["t1", "t2"]).logits, before)
    store.unload("t1")
    with pytest.raises(KeyError, match="not loaded"):
        mt(input_ids=IDS[:1], adapter_names=["t1"])
    store.load("t3", adapters["mos_a"][0])  # reuses t1's rows
    after = mt(input_ids=IDS[:2], adapter_names=["t3", "t2"]).logits
    assert torch.equal(after, before)
    # slots run out too
    small = make_store(tiny(), max_tenants=1)
    small.load("a", adapters["miss"][0])
    with pytest.raises(CapacityError, match="slots"):
        small.load("b", adapters["miss"][0])


def test_bad_adapters_change_nothing(adapters, tmp_path):
    store = make_store(tiny(), max_rank=5)
    store.load("ok", adapters["mos_a"][0])
    mt = MultiTenantModel(tiny(), store)
    ref = mt(input_ids=IDS[:1], adapter_names=["ok"]).logits
    snap = ({k: v.clone() for k, v in store.pool_a.items()}, store.free_rows(), store.names())

    def broken(name, edit):
        import shutil

        from safetensors.torch import load_file, save_file

        d = tmp_path / name
        shutil.copytree(adapters["mos_a"][0], d)
        t = load_file(str(d / "adapter_model.safetensors"))
        edit(t, d)
        save_file(t, str(d / "adapter_model.safetensors"))
        return str(d)

    pool = "base_model.model.shard_pools.mos_{}_{}".format
    cases = [
        # neutral directory names: the message itself must name the problem
        (broken("b0", lambda t, d: t[pool("B", "q_proj")].fill_(float("nan"))), ValueError, "finite"),
        (broken("b1", lambda t, d: t["base_model.model.model.layers.1.mlp.up_proj.mos_idx_a"].fill_(10**5)),
         ValueError, "outside"),
        (broken("b2", lambda t, d: t.pop(pool("A", "k_proj"))), ValueError, "missing"),
        (adapters["lora"][0], ValueError, "max_rank"),  # r=6 > 5
        (str(tmp_path / "nowhere"), FileNotFoundError, "nowhere.*does not exist|adapter_config"),
    ]
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{oops")
    cases.append((str(bad_json), ValueError, "corrupt"))
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    cases.append((str(other), ValueError, "IA3.*not supported"))
    wrong_model = mos_model(LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=96,
                                                         num_hidden_layers=3, num_attention_heads=4,
                                                         num_key_value_heads=2)), "mos_a")
    cases.append((wrong_model, ValueError, "features"))
    for src, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            store.load("bad", src)
        assert store.names() == snap[2] and store.free_rows() == snap[1]
        assert all(torch.equal(store.pool_a[k], v) for k, v in snap[0].items())
        assert torch.equal(mt(input_ids=IDS[:1], adapter_names=["ok"]).logits, ref)
    with pytest.raises(ValueError, match="already loaded"):
        store.load("ok", adapters["mos_a"][0])
    with pytest.raises(ValueError, match="adapter_names has 2 entries"):
        mt(input_ids=IDS[:1], adapter_names=["ok", None])


def test_from_live_model_object(adapters):
    store = make_store(tiny())
    store.load("live", adapters["miss_mini"][1])
    mt = MultiTenantModel(tiny(), store)
    torch.testing.assert_close(mt(input_ids=IDS[:1], adapter_names=["live"]).logits,
                               alone(adapters, "miss_mini", IDS[:1]), rtol=1e-5, atol=1e-5)


def test_store_from_layer_dims_equals_store_from_model(adapters):
    """AdapterStore(layer_dims=...) (a serving engine's own layers, e.g. vLLM's) lays tenants out exactly as
    AdapterStore(model); read() validates without changing the store; rows_needed() is what load() takes."""
    from mos_ext.bases import base_dims

    model = tiny()
    dims = {n: base_dims(m)[:2] for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ALL7}
    a, b = make_store(model), make_store(None, layer_dims=dims, dtype=torch.float32)
    assert a.layers == b.layers and a.rows == b.rows
    for name, (d, _) in adapters.items():
        spec = b.read(d)
        free = b.free_rows()
        assert b.names() == [n for n in adapters if n in b.names()]  # read() changed nothing
        need = b.rows_needed(spec)
        a.load(name, d)
        b.load(name, spec)
        assert all(free[k] - b.free_rows()[k] == n for k, n in need.items())
        assert a.memory_bytes(name) == b.memory_bytes(name)
    for p in a.layers:
        assert torch.equal(a.idx_a[p], b.idx_a[p]) and torch.equal(a.idx_b[p], b.idx_b[p])
    for k in a.pool_a:
        assert torch.equal(a.pool_a[k], b.pool_a[k]) and torch.equal(a.pool_b[k], b.pool_b[k])
    assert b.table_bytes() == sum(2 * 16 * 8 * 4 for _ in b.layers)
    with pytest.raises(ValueError, match="exceeds the store's max_rank"):
        make_store(None, layer_dims=dims, max_rank=2).read(adapters["lora"][0])
    with pytest.raises(ValueError, match="exactly one of model and layer_dims"):
        AdapterStore(model, layer_dims=dims, capacity_bytes=1 << 20)
    with pytest.raises(ValueError, match=r"layer_dims\['x'\]"):
        AdapterStore(layer_dims={"x": 5}, capacity_bytes=1 << 20)


# ---------------------------------------------------------------- shared tables (docs/OPS.md)

@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """Five tenants of one recipe (CONFIGS["mos_a"], same seed: equal tables), different weights,
    plus each one's PeftModel served alone."""
    out = []
    for i in range(5):
        m = mos_model(tiny(), "mos_a")
        g = torch.Generator().manual_seed(500 + i)
        with torch.no_grad():
            for k, p in m.base_model.pools("default").items():
                p.copy_(torch.randn(p.shape, generator=g) * (0.2 if k.startswith("mos_B_") else 0.3))
        d = tmp_path_factory.mktemp(f"recipe{i}")
        m.save_pretrained(str(d))
        out.append((str(d), m.eval()))
    return out


def _check_all(store, recipe, names):
    mt = MultiTenantModel(tiny(), store)
    out = mt(input_ids=IDS[:len(names)], adapter_names=names).logits
    for b, n in enumerate(names):
        ref = tiny()(IDS[b:b + 1]).logits[0] if n is None else recipe[int(n[1:])][1](IDS[b:b + 1]).logits[0]
        torch.testing.assert_close(out[b], ref, rtol=1e-5, atol=1e-5, msg=f"sequence {b} ({n})")


def test_one_recipe_shares_one_table(recipe, adapters):
    store = make_store(tiny(), max_tables=3)
    for i, (d, _) in enumerate(recipe):
        store.load(f"t{i}", d)
    assert store.tables_in_use() == 1 and all(store.info(f"t{i}")["shared_table"] for i in range(5))
    assert len({store.info(f"t{i}")["table_slot"] for i in range(5)}) == 1
    # each tenant has its own run of rows: its map rows hold different bases, one table
    bases = {tuple(int(store.map_a[k][store.slot(f"t{i}"), 1]) for k in store.type_dims) for i in range(5)}
    assert len(bases) == 5
    _check_all(store, recipe, ["t0", "t3", None, "t1", "t4", "t2"])
    # every byte a tenant costs: pools + slot + a fifth of the one table
    per = store.tenant_bytes("t0")
    assert per == store.memory_bytes("t0") + store.slot_bytes() + store.table_bytes() / 5
    # a tenant of another recipe takes a table of its own; plain LoRAs of one rank share theirs
    store.load("lora", adapters["lora"][0])
    assert store.tables_in_use() == 2
    store.unload("lora")
    assert store.tables_in_use() == 1
    # the table goes when its last holder goes, and a reload takes it again
    for i in range(5):
        store.unload(f"t{i}")
    assert store.tables_in_use() == 0 and all(bool((store.idx_a[p] == -1).all()) for p in store.layers)
    assert all(bool((m == 0).all()) for m in store.map_a.values())  # free slots read the empty table 0
    store.load("t2", recipe[2][0])
    _check_all(store, recipe, ["t2", None])


def test_fragmented_store_falls_back_to_a_table_of_its_own(recipe, adapters):
    """With no free run long enough, a tenant takes rows from several runs and a table of its own
    (global rows, base 0); it serves exactly as alone, and its batch mates are unaffected."""
    probe = make_store(tiny())
    probe.load("x", recipe[0][0])
    store = make_store(tiny(), capacity_bytes=5 * probe.memory_bytes("x"), max_tables=4)
    n = store.rows // 5
    assert store.rows == 5 * n and set(probe.rows_needed(recipe[0][0]).values()) == {n}
    for i in range(5):
        store.load(f"t{i}", recipe[i][0])
    for i in (0, 2, 4):
        store.unload(f"t{i}")
    assert all(r.runs == [[0, n], [2 * n, 3 * n], [4 * n, 5 * n]] for r in store._free.values())
    assert set(store.rows_needed(adapters["lora"][0]).values()) == {3 * n}  # only 3 runs of n are free
    store.load("lora", adapters["lora"][0])
    assert not store.info("lora")["shared_table"] and store.info("t1")["shared_table"]
    assert store.tables_in_use() == 2 and all(len(r) == 0 for r in store._free.values())
    mt = MultiTenantModel(tiny(), store)
    names = ["lora", "t1", None, "t3"]
    out = mt(input_ids=IDS[:4], adapter_names=names).logits
    for b, nm in enumerate(names):
        ref = (tiny() if nm is None else adapters["lora"][1] if nm == "lora" else recipe[int(nm[1])][1])(IDS[b:b + 1])
        torch.testing.assert_close(out[b], ref.logits[0], rtol=1e-5, atol=1e-5, msg=nm)
    store.unload("lora")
    store.unload("t1")
    store.unload("t3")
    assert all(r.runs == [[0, 5 * n]] for r in store._free.values()) and store.tables_in_use() == 0


def test_max_tables_full_is_refused_and_changes_nothing(recipe, adapters):
    store = make_store(tiny(), max_tables=1)
    store.load("t0", recipe[0][0])
    store.load("t1", recipe[1][0])  # same table: fits
    snap = ({k: v.clone() for k, v in store.pool_a.items()}, store.free_rows(), store.names(),
            {p: t.clone() for p, t in store.idx_a.items()}, {k: m.clone() for k, m in store.map_a.items()})
    with pytest.raises(CapacityError, match=r"all 1 tables \(max_tables\)"):
        store.load("lora", adapters["lora"][0])
    assert store.names() == snap[2] and store.free_rows() == snap[1]
    assert all(torch.equal(store.pool_a[k], v) for k, v in snap[0].items())
    assert all(torch.equal(store.idx_a[p], t) for p, t in snap[3].items())
    assert all(torch.equal(store.map_a[k], m) for k, m in snap[4].items())
    _check_all(store, recipe, ["t1", "t0"])
