"""Joint training of many tenants under transformers.Trainer (issue 22, item 3): the Trainer path equals
the plain-PyTorch joint loop, tenants leave when their data ends and join at their start step, and every
checkpoint holds one adapter directory per tenant."""
import copy
import os

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from transformers import TrainingArguments  # noqa: E402

from mos_ext.multi_train import JointTraining, TenantSettings  # noqa: E402
from mos_ext.integrations.trainer import JointTrainer, TenantCollator, TenantMix  # noqa: E402

from test_multi_train import KINDS, SETTINGS, VOCAB, build, pools  # noqa: E402


class Rows(torch.utils.data.Dataset):
    def __init__(self, n, seq, seed):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def datasets():  # different sizes and lengths: lora2 ends early, miss4 joins at step 1
    return {"mos4": Rows(8, 10, 1), "mos2": Rows(6, 8, 2), "lora2": Rows(2, 12, 3), "miss4": Rows(4, 10, 4)}


def test_trainer_equals_plain_joint_loop(tmp_path):
    mix = TenantMix(datasets(), rows_per_step=2, start_step={"miss4": 1})
    assert len(mix) == 4 and [len(mix[k]) for k in range(4)] == [6, 6, 6, 2]
    pm = build(torch.float32)
    ref = copy.deepcopy(pm)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=1, max_grad_norm=0,
                             num_train_epochs=1, logging_steps=1, save_steps=2, save_strategy="steps", report_to=[],
                             use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    tr = JointTrainer(model=pm, tenants=SETTINGS, args=args, train_dataset=mix)
    tr.train()
    assert {n: t.steps for n, t in tr.joint.tenants.items()} == {"mos4": 4, "mos2": 3, "lora2": 1, "miss4": 2}

    joint = JointTraining(ref)
    for n in KINDS:
        joint.add_tenant(n, SETTINGS[n])
    coll = TenantCollator(0)
    for k in range(len(mix)):
        b = coll([mix[k]])
        joint.train_step(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"],
                         adapter_names=b["adapter_names"])
    for n in KINDS:
        got, want = pools(pm, n), pools(ref, n)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)

    ck = tmp_path / "run" / "checkpoint-2" / "tenants"
    assert sorted(os.listdir(ck)) == sorted(KINDS)
    for n in KINDS:
        assert {"adapter_config.json", "adapter_model.safetensors", "tenant_state.pt"} <= set(os.listdir(ck / n))


def test_resume_from_checkpoint_equals_one_run(tmp_path):
    """Trainer(resume_from_checkpoint=checkpoint-2): every tenant's pools, optimizer, schedule and step counts
    come back from the checkpoint's tenant directories (JointTraining.restore_tenant), and the resumed run ends
    where the uninterrupted one does; a directory that is not the tenant's checkpoint is refused."""
    def run(out, resume=None):
        pm = build(torch.float32)
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=1, max_grad_norm=0,
                                 num_train_epochs=1, save_steps=2, save_strategy="steps", report_to=[], use_cpu=True,
                                 seed=0, dataloader_num_workers=0, disable_tqdm=True)
        mix = TenantMix(datasets(), rows_per_step=2, start_step={"miss4": 1})
        tr = JointTrainer(model=pm, tenants=SETTINGS, args=args, train_dataset=mix)
        tr.train(resume_from_checkpoint=resume)
        return pm, tr

    whole, _ = run(tmp_path / "a")
    ck = tmp_path / "a" / "checkpoint-2"
    resumed, tr = run(tmp_path / "b", resume=str(ck))
    assert {n: t.steps for n, t in tr.joint.tenants.items()} == {"mos4": 4, "mos2": 3, "lora2": 1, "miss4": 2}
    for n in KINDS:
        got, want = pools(resumed, n), pools(whole, n)
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="not a checkpoint of tenant 'mos4'"):
        tr.joint.restore_tenant("mos4", str(ck / "tenants" / "lora2"))


def test_trainer_refuses_global_clipping_and_accumulation(tmp_path):
    pm = build(torch.float32)
    for kw, msg in ((dict(max_grad_norm=1.0), "max_grad_norm"), (dict(max_grad_norm=0, gradient_accumulation_steps=2),
                                                                  "gradient_accumulation_steps")):
        args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)
        with pytest.raises(ValueError, match=msg):
            JointTrainer(model=pm, tenants={"mos4": TenantSettings()}, args=args, train_dataset=TenantMix(datasets()))
