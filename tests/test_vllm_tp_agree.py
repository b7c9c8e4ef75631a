"""The vLLM plugin's two-phase load at TP > 1 (mos_ext/integrations/vllm.py ``_Runtime.load``), without vLLM:
one worker's runtime with a scripted other rank (``_agree`` returns what the other rank said).

The end-to-end case (a real refusal on one rank of a TP 2 server) is tests/test_vllm.py::
test_tp2_refusal_on_one_rank_changes_no_rank; this covers the paths a server cannot be made to take on
purpose: a commit that fails on the other rank after this one committed."""
import copy
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vllm_util as U  # noqa: E402

peft = pytest.importorskip("peft")
from mos_ext import MoSConfig  # noqa: E402
from mos_ext.integrations import vllm as plugin  # noqa: E402
from mos_ext.serving import AdapterStore  # noqa: E402

CFG = MoSConfig(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1, lora_alpha=16, target_modules=U.ALL7,
                seed=1)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    cfg = U.llama_config(hidden=64, inter=128, layers=3, vocab=64, heads=4, kv_heads=2)
    out = {}
    for i, n in enumerate(["v1", "v2"]):
        d = str(tmp_path_factory.mktemp(n))
        U.write_mos_adapter(cfg, CFG, d, seed=30 + i)
        out[n] = d
    out["dims"] = {f"model.layers.{i}.{'self_attn' if t in ('q_proj', 'k_proj', 'v_proj', 'o_proj') else 'mlp'}.{t}": s
                   for i in range(3) for t, s in {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32),
                                                  "o_proj": (64, 64), "gate_proj": (64, 128), "up_proj": (64, 128),
                                                  "down_proj": (128, 64)}.items()}
    return out


def runtime(dirs, others):
    """A TP 2 worker's runtime (rank 0, no TP cut: the other rank is scripted) whose ``_agree`` answers with
    ``others`` in turn: what the other rank said in each exchange ("" = ok)."""
    rt = object.__new__(plugin._Runtime)
    rt.tp = 2
    rt.store = AdapterStore(layer_dims=dirs["dims"], capacity_bytes=1 << 22, max_tenants=8, max_rank=8,
                            target_modules=U.ALL7, dtype=torch.float64)
    rt.tenants = plugin._Tenants(rt.store, 2, lambda: set())
    script = list(others)
    rt.said = []  # what this rank told the other in each exchange

    def agree(err):
        rt.said.append(err)
        other = script.pop(0)
        return err or other

    rt._agree = agree
    return rt, script


def snapshot(rt):
    st = rt.store
    return (st.names(), st.free_rows(), {k: v.clone() for k, v in st.pool_b.items()},
            {k: v.clone() for k, v in st.map_b.items()}, {p: t.clone() for p, t in st.idx_b.items()},
            dict(rt.tenants.paths), set(rt.tenants.plans))


def same(a, b):
    """Equal store state: tenants, free rows, maps, tables, host copies (free rows' stale values aside)."""
    return a[0] == b[0] and a[1] == b[1] and a[5] == b[5] and a[6] == b[6] and all(
        all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a[3:5], b[3:5]))


@pytest.mark.parametrize("other,match", [
    (["mos_ext adapter 'x' at /p: too big (the other rank's words)"],  # refused in prepare: nothing was changed
     "the other rank's words.*refused on another tensor-parallel"),
    (["", "mos_ext adapter 'x': commit failed over there"], "commit failed over there"),  # committed here: undone
])
def test_a_new_adapter_refused_elsewhere_changes_nothing(dirs, other, match):
    rt, script = runtime(dirs, other + [""] * (2 - len(other)))
    before = snapshot(rt)
    with pytest.raises(plugin.MoSAdapterError, match=match):
        rt.load(1, "x", dirs["v1"], replace=False)
    assert same(before, snapshot(rt))


def test_an_unexpected_error_here_still_takes_part_in_the_exchange(dirs, monkeypatch):
    """Whatever fails on this rank (not only a refusal), it tells the other ranks, which are waiting in the
    same exchange, before raising: no rank is left blocked."""
    rt, script = runtime(dirs, [""])

    def boom(adapter):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(rt.store, "read", boom)
    with pytest.raises(RuntimeError, match="disk on fire"):
        rt.load(1, "x", dirs["v1"], replace=False)
    assert rt.said == ["mos_ext refused adapter: RuntimeError: disk on fire"] and not script
    assert "vllm-1" not in rt.store


def test_commit_failed_elsewhere_reverts_an_inplace_reload(dirs):
    rt, script = runtime(dirs, ["", ""])
    assert rt.load(1, "x", dirs["v1"], replace=False) == CFG.r
    before = snapshot(rt)
    script += ["", "mos_ext adapter 'x': commit failed over there"]
    with pytest.raises(plugin.MoSAdapterError, match="commit failed over there"):
        rt.load(1, "x", dirs["v2"], replace=True)
    after = snapshot(rt)
    # the old contents are back: same pool values, tables and host copy (rows may sit elsewhere)
    assert after[0] == before[0] and after[5] == before[5] and after[6] == before[6]
    slot = rt.store.slot("vllm-1")
    for k in rt.store.type_dims:
        b0, b1 = int(before[3][k][slot, 1]), int(after[3][k][slot, 1])
        n = rt.store.rows_needed(rt.tenants.plans[1])[(k, "B")]
        assert torch.equal(before[2][k][b0:b0 + n], after[2][k][b1:b1 + n]), k
    # and a reload both ranks accept goes through
    script += ["", ""]
    rt.load(1, "x", dirs["v2"], replace=True)
    assert rt.tenants.paths[1] == ("x", dirs["v2"]) and not script


def test_evicted_here_resident_there_takes_part_in_both_exchanges(dirs):
    """A host-copy reload on this rank while the other rank has the adapter resident: both ranks take part
    in both exchanges (no deadlock), and if the other rank failed, the reload here is undone but the host
    copy kept (the adapter stays registered, evicted)."""
    rt, script = runtime(dirs, ["", ""])
    rt.load(1, "x", dirs["v1"], replace=False)
    assert rt.tenants.plans[1].spec.layers == {}  # the host copy keeps rows and tables, not the source adapter
    rt.store.unload("vllm-1")
    rt.tenants.lru.pop(1)
    script += ["", ""]
    rt.load(1, "x", dirs["v1"], replace=False)  # back from the host copy
    assert "vllm-1" in rt.store and not script
    rt.store.unload("vllm-1")
    rt.tenants.lru.pop(1)
    script += ["", "mos_ext adapter 'x': over there"]
    with pytest.raises(plugin.MoSAdapterError):
        rt.load(1, "x", dirs["v1"], replace=False)
    assert "vllm-1" not in rt.store and 1 in rt.tenants.plans and 1 in rt.tenants.paths and not script


def test_a_steps_load_is_not_agreed(dirs):
    """vLLM re-activating an adapter inside a step (set_active_adapters) loads it on the ranks whose vLLM
    cache dropped it, not necessarily all: such a load runs alone (an exchange would wait forever)."""
    rt, script = runtime(dirs, ["", ""])
    rt.load(1, "x", dirs["v1"], replace=False)  # add_lora: agreed
    rt.store.unload("vllm-1")
    rt.tenants.lru.pop(1)
    said = list(rt.said)
    rt.load(1, "x", dirs["v1"], replace=False, agree=False)
    assert rt.said == said and "vllm-1" in rt.store and not script
