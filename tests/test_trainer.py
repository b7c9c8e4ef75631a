"""MoS through the tools users train with: transformers Trainer, TRL SFTTrainer, bitsandbytes bases."""
import os

import pytest
import torch

import mos_ext

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments  # noqa: E402

VOCAB = 96


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64, pad_token_id=0))


def cfg(**kw):
    base = dict(r=3, equivalent_rank=2, shards_per_vector=2, private_rank=1, lora_alpha=8,
                target_modules=["q_proj", "v_proj", "up_proj", "down_proj"], task_type="CAUSAL_LM")
    base.update(kw)
    return mos_ext.MoSConfig(**base)


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=32, seq=12, seed=1):
        g = torch.Generator().manual_seed(seed)
        # a learnable pattern: each row counts up from a random start
        start = torch.randint(1, VOCAB - seq, (n, 1), generator=g)
        self.ids = start + torch.arange(seq)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def args(out, **kw):
    base = dict(output_dir=str(out), per_device_train_batch_size=8, learning_rate=3e-2, max_steps=6,
                logging_steps=1, save_steps=3, save_strategy="steps", report_to=[], use_cpu=True, seed=0,
                data_seed=0, dataloader_num_workers=0, disable_tqdm=True, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


def pools(pm):
    return {k: v.detach().clone() for k, v in pm.base_model.pools("default").items()}


def adapter_bytes(pm):
    """Bytes of the compressed adapter: every pool plus every int32 table, nothing else."""
    tuner = pm.base_model
    n = sum(p.numel() * p.element_size() for p in tuner.pools("default").values())
    for _, lay in tuner.mos_layers():
        n += sum(lay.mos_idx_a["default"].numel() + lay.mos_idx_b["default"].numel() for _ in [0]) * 4
    return n


def test_trainer_trains_saves_only_the_adapter_and_resumes_exactly(tmp_path):
    pm = peft.get_peft_model(tiny_llama(), cfg())
    before = pools(pm)
    tr = Trainer(model=pm, args=args(tmp_path / "run"), train_dataset=TokenData())
    res = tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert losses[-1] < losses[0], losses
    after = pools(pm)
    assert any(not torch.equal(before[k], after[k]) for k in after if "mos_B_" in k)

    ck = tmp_path / "run" / "checkpoint-3"
    files = set(os.listdir(ck))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(f.startswith("model") and f.endswith(".safetensors") for f in files), files
    size = os.path.getsize(ck / "adapter_model.safetensors")
    want = adapter_bytes(pm)
    assert want <= size <= want + 16 * 1024, (size, want)  # safetensors header only on top
    base_params = sum(p.numel() for p in pm.base_model.model.parameters()) * 4
    assert size < base_params / 10

    # resume from step 3 in a fresh model: same pools after step 6 as the uninterrupted run
    pm2 = peft.get_peft_model(tiny_llama(), cfg())
    tr2 = Trainer(model=pm2, args=args(tmp_path / "run"), train_dataset=TokenData())
    tr2.train(resume_from_checkpoint=str(ck))
    resumed = pools(pm2)
    for k in after:
        torch.testing.assert_close(resumed[k], after[k], rtol=1e-5, atol=1e-6)

    # the saved adapter reloads exactly through PEFT and through transformers' load_adapter
    final = tmp_path / "final"
    pm.save_pretrained(final)
    x = torch.randint(1, VOCAB, (2, 9))
    pm.eval()
    with torch.no_grad():
        ref = pm(x).logits
        re1 = peft.PeftModel.from_pretrained(tiny_llama(), str(final)).eval()(x).logits
        hf = tiny_llama().eval()
        hf.load_adapter(str(final))
        re2 = hf(x).logits
    torch.testing.assert_close(re1, ref, rtol=0, atol=0)
    torch.testing.assert_close(re2, ref, rtol=0, atol=0)
    assert not torch.allclose(ref, tiny_llama().eval()(x).logits)


def test_trainer_gradient_checkpointing_matches_plain(tmp_path):
    outs = []
    for gc in (False, True):
        pm = peft.get_peft_model(tiny_llama(), cfg())
        tr = Trainer(model=pm, args=args(tmp_path / f"gc{gc}", max_steps=3, save_strategy="no",
                                         gradient_checkpointing=gc,
                                         gradient_checkpointing_kwargs={"use_reentrant": False}),
                     train_dataset=TokenData())
        tr.train()
        outs.append(pools(pm))
    for k in outs[0]:
        torch.testing.assert_close(outs[1][k], outs[0][k], rtol=1e-4, atol=1e-6)


def test_trl_sft_trainer_with_mos_peft_config(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from trl import SFTConfig, SFTTrainer

    rows = [{"input_ids": list(r)} for r in TokenData().ids.tolist()]
    ds = datasets.Dataset.from_list(rows)
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={str(i): i for i in range(VOCAB)}, unk_token="0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="0", eos_token="1", unk_token="0")
    model = tiny_llama()
    a = SFTConfig(output_dir=str(tmp_path / "sft"), per_device_train_batch_size=8, learning_rate=3e-2, max_steps=3,
                  logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, dataset_kwargs={"skip_prepare_dataset": False},
                  max_length=16, disable_tqdm=True)
    tr = SFTTrainer(model=model, args=a, train_dataset=ds, peft_config=cfg(), processing_class=tokenizer)
    assert isinstance(tr.model, peft.PeftModel)
    assert isinstance(tr.model.base_model, mos_ext.MoSModel)
    before = pools(tr.model)
    tr.train()
    after = pools(tr.model)
    assert any(not torch.equal(before[k], after[k]) for k in after if "mos_B_" in k)
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))


def test_trainer_with_bitsandbytes_4bit_base(tmp_path):
    bnb = pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    src = tmp_path / "base"
    tiny_llama().save_pretrained(src)
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    try:
        model = LlamaForCausalLM.from_pretrained(src, quantization_config=q, device_map={"": "cpu"})
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"bitsandbytes 4-bit loading unavailable on this CPU build: {e}")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    pm = peft.get_peft_model(model, cfg())
    assert any(isinstance(m.get_base_layer(), bnb.nn.Linear4bit) for _, m in pm.base_model.mos_layers())
    before = pools(pm)
    tr = Trainer(model=pm, args=args(tmp_path / "q", max_steps=3, save_strategy="no"), train_dataset=TokenData())
    tr.train()
    after = pools(pm)
    assert any(not torch.equal(before[k], after[k]) for k in after if "mos_B_" in k)


def test_bench_trainer_row_runs(tmp_path):
    """benchmarks/bench_train_cpu.py --trainer at toy size: both Trainers step, the JSON row is written."""
    import json
    import subprocess
    import sys

    out = tmp_path / "row.json"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, os.path.join(root, "benchmarks", "bench_train_cpu.py"), "--trainer", "--threads", "1",
           "--hidden", "128", "--inter", "256", "--layers", "8", "--seq", "16", "--trainer-rounds", "1",
           "--trainer-steps", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    row = json.loads(out.read_text())["rows"][0]
    assert row["steps_timed"] == {"peft_lora": 2, "mos": 2}
    assert row["mos_params"] * 4 == row["peft_lora_params"]  # e = r / 4: a quarter of LoRA's parameters
    assert row["mos_ms"] > 0 and row["peft_lora_ms"] > 0
