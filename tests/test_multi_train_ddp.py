"""Joint training of many tenants under DDP (2 gloo CPU processes) equals one process on the whole batch
(issue 22, item 3). The processes are run by tests/gloo_util.py, as test_training.py's DDP test."""
import os
import sys

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gloo_util import gloo_rank, run_gloo_ranks  # noqa: E402
from test_multi_train import KINDS, SETTINGS, build, mixed_batch, pools  # noqa: E402

STEPS = 2
SPLIT = 3  # rank 0 takes rows [0, 3), rank 1 the rest: tenant mos2's rows are split across the ranks


def run_steps(joint, model_call, rows_of):
    for k in range(STEPS):
        ids, labels, who = mixed_batch(list(KINDS), k)
        sl = rows_of(ids.shape[0])
        joint.zero_grad()
        out = model_call(input_ids=ids[sl], labels=labels[sl], adapter_names=who[sl])
        out["loss"].backward()
        joint.optimizer_step()


def _worker(rank, world, out_dir):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from mos_ext.multi_train import JointModel, JointTraining
    with gloo_rank(rank, world, out_dir):
        pm = build(torch.float64)
        joint = JointTraining(pm)
        for n in KINDS:
            joint.add_tenant(n, SETTINGS[n])
        ddp = torch.nn.parallel.DistributedDataParallel(JointModel(joint))
        run_steps(joint, ddp, lambda n: slice(0, SPLIT) if rank == 0 else slice(SPLIT, n))
        torch.save({n: pools(pm, n) for n in KINDS}, os.path.join(out_dir, f"rank{rank}.pt"))


def test_joint_ddp_gloo_equals_one_process(tmp_path, monkeypatch):
    from mos_ext.multi_train import JointModel, JointTraining
    r0, r1 = run_gloo_ranks(_worker, (), tmp_path, monkeypatch, what="joint DDP")

    pm = build(torch.float64)
    joint = JointTraining(pm)
    for n in KINDS:
        joint.add_tenant(n, SETTINGS[n])
    run_steps(joint, JointModel(joint), lambda n: slice(0, n))
    for n in KINDS:
        want = pools(pm, n)
        for k in want:
            assert torch.equal(r0[n][k], r1[n][k]), f"ranks disagree on {n} {k}"
            torch.testing.assert_close(r0[n][k], want[k], rtol=1e-10, atol=1e-12)
