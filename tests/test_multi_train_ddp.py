"""Joint training of many tenants under DDP (2 gloo CPU processes) equals one process on the whole batch
(issue 22, item 3). Teardown handled as in test_training.py's DDP test."""
import datetime
import faulthandler
import os
import sys
import time
import warnings

import pytest
import torch

peft = pytest.importorskip("peft")
pytest.importorskip("transformers")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_multi_train import KINDS, SETTINGS, build, mixed_batch, pools  # noqa: E402

DIST_DEADLINE_S = 300
TEARDOWN_GRACE_S = 60
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
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "a", buffering=1)

    def stage(msg):
        log.write(f"{time.monotonic():.1f} {msg}\n")

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "rendezvous"), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    finished = False
    try:
        pm = build(torch.float64)
        joint = JointTraining(pm)
        for n in KINDS:
            joint.add_tenant(n, SETTINGS[n])
        ddp = torch.nn.parallel.DistributedDataParallel(JointModel(joint))
        run_steps(joint, ddp, lambda n: slice(0, SPLIT) if rank == 0 else slice(SPLIT, n))
        torch.save({n: pools(pm, n) for n in KINDS}, os.path.join(out_dir, f"rank{rank}.pt"))
        stage("done")
        dist.barrier()
        finished = True
    finally:
        faulthandler.dump_traceback_later(TEARDOWN_GRACE_S / 2, file=log)
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()
        stage("destroyed")
    if finished:
        log.close()
        os._exit(0)


def test_joint_ddp_gloo_equals_one_process(tmp_path, monkeypatch):
    from mos_ext.multi_train import JointModel, JointTraining
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx = mp.start_processes(_worker, args=(2, str(tmp_path)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + DIST_DEADLINE_S
    saved_at = None
    while not ctx.join(timeout=5):
        logs = {f.name: f.read_text() for f in sorted(tmp_path.glob("rank*.log"))}
        saved = len(logs) == 2 and all(" done\n" in t for t in logs.values())
        saved_at = saved_at or (time.monotonic() if saved else None)
        if saved and time.monotonic() > saved_at + TEARDOWN_GRACE_S:
            for proc in ctx.processes:
                proc.kill()
            warnings.warn(f"gloo teardown did not finish in {TEARDOWN_GRACE_S} s; logs: {logs}")
            break
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"workers did not finish in {DIST_DEADLINE_S} s; their progress: {logs}")
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")

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
