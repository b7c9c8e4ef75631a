"""Tensor-parallel shares of an adapter (mos_ext/integrations/tp_shard.py, used by the vLLM plugin at TP > 1):
every rank's share, served from its own store, gives exactly its part of the whole adapter's delta, also
when rank boundaries fall inside shards; rows are held once per rank that uses them."""
import os
import sys

import pytest
import torch

from mos_ext.adapter_io import AdapterSpec, Side, read_adapter
from mos_ext.batch import add_sgmv, build_segments
from mos_ext.integrations.tp_shard import shard_spec
from mos_ext.serving import AdapterStore

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def dense(spec, path):
    """scale * B^T A of one layer, [out, in], float64."""
    out = []
    for sd in spec.layers[path]:
        pool = sd.pool.double()
        rows = torch.where((sd.idx >= 0).unsqueeze(-1), pool[sd.idx.clamp(min=0).long()], torch.zeros(()))
        out.append(rows.reshape(sd.idx.shape[0], -1))  # [r, features]
    a, b = out
    return spec.scale * b.t() @ a


def synthetic(in_f=96, out_f=48, s_a=24, s_b=12, r=3, seed=0):
    """Two layers sharing pools; shards of 24 / 12 features; rank boundaries at 32 / 16 (TP 3) fall inside."""
    g = torch.Generator().manual_seed(seed)
    pa, pb = torch.randn(7, s_a, generator=g), torch.randn(5, s_b, generator=g)
    layers = {}
    for name in ("l0.proj", "l1.proj"):
        ia = torch.randint(-1, 7, (r, in_f // s_a), generator=g)
        ib = torch.randint(-1, 5, (r, out_f // s_b), generator=g)
        layers[name] = (Side(pa, ia), Side(pb, ib))
    return AdapterSpec(kind="mos", rank=r, scale=0.5, layers=layers)


def share_rows(spec, ranges=None):
    """Pool features a rank's share uses per side ("A", "B"): distinct (pool row, piece) features its
    tables reference, shared pools counted once. ``ranges=None``: the whole adapter."""
    share = shard_spec(spec, ranges or {})
    out = {}
    for col, side in ((0, "A"), (1, "B")):
        seen = {}
        for sides in share.layers.values():
            sd = sides[col]
            used = seen.setdefault(id(sd.pool), (sd.pool.shape[1], set()))[1]
            used.update(int(i) for i in sd.idx.reshape(-1).tolist() if i >= 0)
        out[side] = sum(width * len(rows) for width, rows in seen.values())
    return out


@pytest.mark.parametrize("side,tp", [("B", 3), ("A", 3), ("B", 2), ("A", 2)])
def test_shares_are_exact_parts_of_the_delta(side, tp):
    spec = synthetic()
    full = {p: dense(spec, p) for p in spec.layers}
    for k in range(tp):
        ranges = {}
        for p in spec.layers:
            feats = full[p].shape[0 if side == "B" else 1]
            ranges[p] = (side, k * feats // tp, feats // tp)
        share = shard_spec(spec, ranges)
        for p, (_, start, n) in ranges.items():
            want = full[p][start:start + n] if side == "B" else full[p][:, start:start + n]
            torch.testing.assert_close(dense(share, p), want, rtol=0, atol=1e-12)
    # the sliced side's rows: each rank holds only what it uses; together never less than the whole
    whole = share_rows(spec)
    per = [share_rows(spec, {p: (side, k * 48 // tp if side == "B" else k * 96 // tp, 48 // tp if side == "B"
                                 else 96 // tp) for p in spec.layers}) for k in range(tp)]
    assert all(x[side] <= whole[side] for x in per) and sum(x[side] for x in per) >= whole[side]
    other = "A" if side == "B" else "B"
    assert all(x[other] == whole[other] for x in per)


def test_row_parallel_partial_sums_through_the_store():
    """Row-parallel: each rank's store applies its A share to its input features; the sum over ranks
    (the base layer's all-reduce) equals the whole adapter; column-parallel: the concatenation does."""
    spec = synthetic(in_f=96, out_f=48)
    tp, path = 3, "l0.proj"
    x = torch.randn(5, 96, dtype=torch.float64)
    want = x @ dense(spec, path).t()
    parts, cols = [], []
    for k in range(tp):
        for side, dims, rng in (("A", (32, 48), ("A", 32 * k, 32)), ("B", (96, 16), ("B", 16 * k, 16))):
            ranges = {p: rng for p in spec.layers}
            store = AdapterStore(layer_dims={p: dims for p in spec.layers}, target_modules=["proj"],
                                 capacity_bytes=1 << 20, max_tenants=2, max_rank=4, slots=4, dtype=torch.float64)
            store.load("t", store.read(shard_spec(spec, ranges)))
            seg = build_segments([store.slot("t")] * 5, device="cpu")
            out = torch.zeros(5, dims[1], dtype=torch.float64)
            xi = x[:, 32 * k:32 * (k + 1)] if side == "A" else x
            add_sgmv(out, xi.contiguous(), [store.sgmv_slice(path)], store.scale, seg, store.dtype)
            (parts if side == "A" else cols).append(out)
    torch.testing.assert_close(sum(parts), want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(torch.cat(cols, 1), want, rtol=1e-10, atol=1e-10)


def test_peft_lora_and_mos_directories_split_in_halves(tmp_path):
    """Real adapter directories (MoS with shared pools, PEFT LoRA whose l = 1 vector straddles the
    boundary) at TP 2: shares are exact; per-rank rows of the sliced side are reported."""
    pytest.importorskip("peft")
    import vllm_util as U
    from mos_ext import MoSConfig

    cfg = U.llama_config(hidden=64, inter=128, layers=4, vocab=64)
    dims = {f"model.layers.{i}.{m}": d for i in range(4) for m, d in
            [("self_attn.q_proj", (64, 64)), ("self_attn.k_proj", (64, 32)), ("self_attn.v_proj", (64, 32)),
             ("self_attn.o_proj", (64, 64)), ("mlp.gate_proj", (64, 128)), ("mlp.up_proj", (64, 128)),
             ("mlp.down_proj", (128, 64))]}
    U.write_mos_adapter(cfg, MoSConfig(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1, lora_alpha=8,
                                       target_modules=U.ALL7, seed=1), str(tmp_path / "mos"), seed=3)
    U.write_peft_lora(cfg, str(tmp_path / "lora"), seed=4, r=4)
    for name in ("mos", "lora"):
        spec = read_adapter(str(tmp_path / name), dims=dims)
        for k in range(2):
            ranges = {p: (("A", k * d[0] // 2, d[0] // 2) if p.endswith(("o_proj", "down_proj"))
                          else ("B", k * d[1] // 2, d[1] // 2)) for p, d in dims.items()}
            share = shard_spec(spec, ranges)
            for p, (side, start, n) in ranges.items():
                w = dense(spec, p)
                want = w[start:start + n] if side == "B" else w[:, start:start + n]
                torch.testing.assert_close(dense(share, p), want, rtol=0, atol=1e-12)
