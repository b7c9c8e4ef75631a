"""Two (or more) CPU processes over gloo for the data-parallel tests: one launcher that waits, reports
progress and tolerates a stuck torch.distributed teardown, and one per-rank context that sets the
process group up and tears it down the same way in every worker."""
import contextlib
import datetime
import faulthandler
import os
import time
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DIST_DEADLINE_S = 300  # each run takes ~10-20 s on an idle 2-core machine
TEARDOWN_GRACE_S = 60  # after every rank saved its results, for gloo's teardown


@contextlib.contextmanager
def gloo_rank(rank, world, out_dir):
    """A worker's body runs inside: a file rendezvous (no port to race for), gloo on loopback, one
    thread; ``stage(msg)`` logs progress to ``rank<r>.log``. After the body (which saves
    ``rank<r>.pt``) every rank meets at a barrier, tears down, and leaves with ``os._exit(0)``."""
    log = open(os.path.join(out_dir, f"rank{rank}.log"), "a", buffering=1)

    def stage(msg):
        log.write(f"{time.monotonic():.1f} {msg}\n")

    torch.set_num_threads(1)
    stage("init_process_group")
    dist.init_process_group("gloo", init_method="file://" + os.path.join(out_dir, "rendezvous"), rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    finished = False
    try:
        yield stage
        stage("done")
        dist.barrier()  # every rank is past its last collective before any tears down
        finished = True
    finally:
        # a teardown that hangs leaves its Python stacks in the log for the test's message
        faulthandler.dump_traceback_later(TEARDOWN_GRACE_S / 2, file=log)
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()
        stage("destroyed")
    if finished:  # nothing of ours runs in interpreter teardown: skip it (its thread joins can hang)
        log.close()
        os._exit(0)


def run_gloo_ranks(worker, args, tmp_path, monkeypatch, what="", world=2):
    """Spawns ``worker(rank, world, out_dir, *args)`` on ``world`` ranks and returns each rank's
    ``rank<r>.pt``. A worker that fails fails the test; one still running after DIST_DEADLINE_S too,
    with every rank's progress. Ranks that all saved but whose gloo teardown is stuck past
    TEARDOWN_GRACE_S (seen once in CI under load) are killed with a warning: not what the tests are about."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ctx = mp.start_processes(worker, args=(world, str(tmp_path), *args), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DIST_DEADLINE_S
    saved_at = None
    while not ctx.join(timeout=5):  # raises if a worker failed
        logs = {f.name: f.read_text() for f in sorted(tmp_path.glob("rank*.log"))}
        saved = len(logs) == world and all(" done\n" in t for t in logs.values())
        saved_at = saved_at or (time.monotonic() if saved else None)
        if saved and time.monotonic() > saved_at + TEARDOWN_GRACE_S:
            for proc in ctx.processes:
                proc.kill()
            warnings.warn(f"{what}: gloo teardown did not finish in {TEARDOWN_GRACE_S} s; logs: {logs}")
            break
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail(f"{what} workers did not finish in {DIST_DEADLINE_S} s; their progress: {logs}")
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
