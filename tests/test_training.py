"""End-to-end training: a short run whose loss drops, gradient checkpointing, and DDP (gloo,
2 CPU processes) and FSDP2 giving the pool gradients and optimizer step of one process on the
whole batch."""
import os

import pytest
import torch

pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

pytest.importorskip("peft")
import peft  # noqa: E402

from gloo_util import gloo_rank, run_gloo_ranks  # noqa: E402
from mos_ext import MoSConfig  # noqa: E402

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)
    model = LlamaForCausalLM(cfg)  # a larger init than HF's 0.02 gives the toy base features to adapt
    return peft.get_peft_model(model, MoSConfig(r=3, equivalent_rank=2, shards_per_vector=4, private_rank=1,
                                                lora_alpha=8, lora_dropout=0.0, target_modules=ALL7, seed=1))


def b_pools(model):
    """The B pool of every projection type (shared by its layers; owned by the PeftModel's tuner)."""
    return [p for k, p in model.base_model.pools("default").items() if k.startswith("mos_B_")]


def batch(seed, n=8, t=16):
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern: next token = (token + 3) % 64
    start = torch.randint(0, 64, (n, 1), generator=g)
    ids = (start + 3 * torch.arange(t)) % 64
    return ids


def test_short_training_run_loss_drops():
    """Fit one batch with the pools only (the base stays frozen): the loss must fall well."""
    model = build()
    base_before = {n: p.clone() for n, p in model.named_parameters()}
    pool_ids = {id(p) for p in model.base_model.pools("default").values()}
    assert pool_ids == {id(p) for p in model.parameters() if p.requires_grad} and len(pool_ids) == 14
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-2)
    ids = batch(0)
    losses = []
    for _ in range(25):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if id(p) not in pool_ids)
    assert all(not torch.equal(p, base_before[n]) for n, p in model.named_parameters() if id(p) in pool_ids)


def test_gradient_checkpointing_same_grads():
    ids = batch(0)
    grads = []
    for ckpt in (False, True):
        model = build()
        with torch.no_grad():
            for p in b_pools(model):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
        model.train()
        if ckpt:
            model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def _init_b(model):
    with torch.no_grad():
        for p in b_pools(model):
            p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    return model


def _dist_worker(rank, world, out_dir, mode):
    with gloo_rank(rank, world, out_dir) as stage:
        stage("build")
        model = _init_b(build())
        stage(f"wrap ({mode})")
        if mode == "ddp":
            wrapped = torch.nn.parallel.DistributedDataParallel(model)
        else:  # FSDP2: each decoder layer its own unit, the root (the PeftModel) owns the shared pools
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard
            mesh = init_device_mesh("cpu", (world,))
            for layer in model.base_model.model.model.layers:
                fully_shard(layer, mesh=mesh)
            wrapped = fully_shard(model, mesh=mesh)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-2)
        ids = batch(7)[rank * 4:(rank + 1) * 4]
        stage("forward/backward")
        wrapped(input_ids=ids, labels=ids).loss.backward()
        full = (lambda t: t.full_tensor()) if mode == "fsdp" else (lambda t: t.detach().clone())
        grads = {n: full(p.grad) for n, p in model.named_parameters() if p.requires_grad}
        stage("clip + step")
        torch.nn.utils.clip_grad_norm_(params, 0.05)
        opt.step()
        after = {n: full(p.detach()) for n, p in model.named_parameters() if p.requires_grad}
        torch.save({"grad": grads, "after": after}, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_data_parallel_gloo_matches_single_process(tmp_path, monkeypatch, mode):
    """DDP and FSDP2 on 2 CPU processes (gloo): the pool gradients, the clipped AdamW step and the
    pools after it equal one process on the whole batch."""
    r0, r1 = run_gloo_ranks(_dist_worker, (mode,), tmp_path, monkeypatch, what=mode)
    model = _init_b(build())
    params = [p for p in model.parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = batch(7)
    # both average the two half-batch losses (each a token mean): the same as the halves' mean
    loss = 0.5 * (model(input_ids=ids[:4], labels=ids[:4]).loss + model(input_ids=ids[4:], labels=ids[4:]).loss)
    loss.backward()
    assert set(r0["grad"]) == set(before)
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(r0["grad"][n], r1["grad"][n], rtol=0, atol=0)
            torch.testing.assert_close(r0["grad"][n], p.grad, rtol=1e-5, atol=1e-7)
    torch.nn.utils.clip_grad_norm_(params, 0.05)
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert not torch.equal(p, before[n])  # the step moved every pool
            torch.testing.assert_close(r0["after"][n], p.detach(), rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(r1["after"][n], p.detach(), rtol=1e-5, atol=1e-6)
