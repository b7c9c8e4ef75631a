"""benchmarks/bench_cuda.py --dry-run: every case of the GPU benchmark is built (small) and every
implementation, the mos ops and each baseline, agrees with the fp64 reference on the CPU. Also:
setup.py with MOS_EXT_CUDA=1 refuses to build CPU-only."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_cuda", os.path.join(ROOT, "benchmarks", "bench_cuda.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_dry_run_builds_and_checks_every_case(tmp_path):
    bench = load_bench()
    out = tmp_path / "dry.json"
    assert bench.main(["--dry-run", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    cases = {r["case"] for r in res["rows"]}
    want = {"decode N=64", "decode N=256", "decode N=1024", "prefill N=4096 S=1", "prefill N=4096 S=64",
            "prefill N=16384 S=1", "prefill N=16384 S=64", "prefill fp16 N=4096 S=1", "punica 4096->11008 r=16 fp16 N=64",
            "shard_grad 32 layers N=512", "shard_grad 32 layers N=4096"}
    assert cases == want
    assert all(r["ok"] for r in res["rows"]), [r for r in res["rows"] if not r["ok"]]
    impls = {r["impl"] for r in res["rows"]}
    assert {"mos", "mos l=1", "addmm_ (1 adapter)", "mm pair (1 adapter)", "PEFT loop", "per-token bmm",
            "cuBLAS dA + index_add_", "mos deterministic"} <= impls
    checked = [r for r in res["rows"] if r["impl"].startswith("mos") and r["rel_err"] is not None]
    assert checked and all(r["rel_err"] < 2e-2 for r in checked)


def test_bench_refuses_without_gpu_unless_dry():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_cuda.py"), "--cases", "decode"],
                       capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert r.returncode != 0 and "needs a GPU" in r.stderr


def test_setup_with_cuda_forced_fails_loudly_without_cuda():
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    env = dict(os.environ, MOS_EXT_CUDA="1", CUDA_HOME="/nonexistent")
    r = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, env=env)
    assert r.returncode != 0
    assert "MOS_EXT_CUDA=1 but the CUDA kernels cannot be built" in r.stderr
    assert "CPU-only build" in r.stderr


def test_gpu_paths_dry_run():
    """tools/gpu_paths.py (the sanitizer's workload) with --dry-run: every problem it builds is
    valid and every call runs on the CPU ops. The first H200 run (2026-12-04) stopped at its
    r=1024 case, whose one-tenant problem named tenant 2 in a segment (a script bug, not a kernel's)."""
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_paths.py"), "--dry-run"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "every kernel path ran and agreed" in res.stdout
