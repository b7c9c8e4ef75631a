"""benchmarks/quality/run.py: option parsing, the --quick path left as it was, and a tiny depth sweep
(resume without retraining, partial and complete reports). Tiny sizes: well under a minute on 2 cores."""
import hashlib
import importlib.util
import inspect
import json
import os
import re

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
RUN_PY = os.path.join(os.path.dirname(HERE), "benchmarks", "quality", "run.py")


@pytest.fixture(scope="module")
def R():
    spec = importlib.util.spec_from_file_location("quality_run", RUN_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True)
def _threads_restored():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


class _Stop(Exception):
    pass


# ----------------------------------------------------------------------------- --quick is untouched

# Fingerprints of the --quick path taken before the depth sweep was added: the configuration (sizes, lrs,
# grid) and the source of every function a --quick run goes through. A change to either changes the
# published results_quick.md numbers, so it must be deliberate (rerun --quick and update both).
QUICK_CONFIG_SHA = "7ca0cd413abb40ac77c9854060f22696407f7193bdd223011e378a739966cf4a"
QUICK_SOURCE_SHA = "c6c54bd6e93ac5f48f3406c15392aad59874df16ebb4c7a37ec6da4ce23badb8"
QUICK_FUNCS = ["load_corpus", "_py_files", "_split", "to_tensor", "batch_at", "eval_windows", "llama_config",
               "new_model", "lm_loss", "evaluate", "lr_at", "train", "pretrained_base", "mos_rank", "adapter_params",
               "grid", "make_cfg", "finetune", "lora_params_for", "summarize"]


def test_quick_config_and_code_unchanged(R):
    cfg = json.dumps(dict(mode=R.MODES["quick"], lrs=R.LRS, sweep=list(R.SWEEP_LRS), grid=R.grid(R.MODES["quick"]),
                          skip=sorted(R._SKIP_PARTS), all7=R.ALL7), sort_keys=True)
    assert hashlib.sha256(cfg.encode()).hexdigest() == QUICK_CONFIG_SHA
    src = "\n".join(inspect.getsource(getattr(R, n)) for n in QUICK_FUNCS)
    assert hashlib.sha256(src.encode()).hexdigest() == QUICK_SOURCE_SHA


def _model_of(R, monkeypatch, argv):
    """The model dict main() hands to pretraining for ``argv`` (stopped there; nothing trains)."""
    seen = {}

    def fake_base(m, data, desc, device, cache_dir):
        seen["m"] = m
        raise _Stop

    monkeypatch.setattr(R, "pretrained_base", fake_base)
    with pytest.raises(_Stop):
        R.main(argv)
    return seen["m"]


def test_quick_model_and_size_options(R, monkeypatch):
    assert _model_of(R, monkeypatch, ["--quick"]) == R.MODES["quick"]
    # naming the quick sizes explicitly changes nothing
    assert _model_of(R, monkeypatch, ["--quick", "--layers", "6", "--hidden", "128"]) == R.MODES["quick"]
    m = _model_of(R, monkeypatch, ["--quick", "--layers", "12", "--hidden", "64", "--inter", "176", "--heads", "2"])
    assert m == dict(R.MODES["quick"], layers=12, hidden=64, inter=176, heads=2)


def test_depth_options(R):
    with pytest.raises(SystemExit):
        R.main(["--depth-sweep", "--quick"])
    with pytest.raises(SystemExit):
        R.main(["--depth-sweep", "--layers", "8"])
    ap_defaults = R.argparse.Namespace(hidden=None, inter=None, heads=None, seq=None, batch=None, pretrain_steps=None,
                                       pretrain_lr=None, finetune_steps=None, eval_windows=None)
    m = R.depth_model(ap_defaults, 32)
    assert (m["layers"], m["hidden"], m["inter"], m["heads"]) == (32, 64, 176, 4)
    assert {k: m[k] for k in ("seq", "batch", "pretrain_steps", "finetune_steps", "eval_windows")} == \
        {k: R.MODES["quick"][k] for k in ("seq", "batch", "pretrain_steps", "finetune_steps", "eval_windows")}
    # r: the largest the constraint r - p <= (e - p) L allows, at most 8e
    assert [R.depth_mos_rank(e, R._private(e), 6) for e in (1, 2, 4)] == [6, 7, 14]
    assert [R.depth_mos_rank(e, R._private(e), 12) for e in (1, 2, 4)] == [8, 13, 26]
    assert [R.depth_mos_rank(e, R._private(e), 32) for e in (1, 2, 4)] == [8, 16, 32]
    g = R.depth_grid(m, [1, 2, 4], [1, 2, 4, 8, 16, 32])
    assert [r["label"] for r in g] == ["LoRA"] * 6 + ["MoS"] * 3 + ["MiSS"] * 3
    for run in g:  # every config is valid for the model (MoSConfig checks the pool constraint)
        for h, o in ((64, 64), (64, 176), (176, 64)):
            R.make_cfg(run, 0).check_type("x", h, o, 32)
    assert [r["r"] for r in g if r["label"] == "MiSS"] == [2, 4, 8]


TINY = ["--depth-sweep", "--depths", "2,3", "--hidden", "16", "--heads", "2", "--seq", "16", "--batch", "2",
        "--pretrain-steps", "3", "--finetune-steps", "2", "--eval-windows", "4", "--seeds", "1", "--deep-seeds", "2",
        "--lora-ranks", "1,2", "--es", "1,2", "--threads", "1"]


def test_depth_sweep_resumes_and_reports(R, tmp_path, monkeypatch, capsys):
    argv = TINY + ["--depth-out", str(tmp_path / "out"), "--report-dir", str(tmp_path)]
    calls = []
    real = R.finetune

    def counted(run, seed, lr, base_sd, m, *args, **kw):
        calls.append((m["layers"], run["label"], seed, run["name"]))
        return real(run, seed, lr, base_sd, m, *args, **kw)

    monkeypatch.setattr(R, "finetune", counted)
    R.main(argv + ["--max-runs", "5"])  # an interrupted sweep
    assert len(calls) == 5
    files = sorted((tmp_path / "out").rglob("*_s*.json"))
    assert len(files) == 5
    assert all(f.stat().st_size < 2048 for f in files)
    assert len(list((tmp_path / "out" / "bases").glob("*.pt"))) == 1  # only L=2's base so far
    md = (tmp_path / "results_depth.md").read_text()
    done, total = map(int, re.search(r"\*\*PARTIAL: (\d+) of (\d+) runs finished", md).groups())
    assert done == 5
    assert total == 2 * 6 + 6 + 2 * 3  # main grid at L=2,3 (6 runs), seed 1 at L=3, 3 ablations x 2 seeds

    R.main(argv)  # resume: only what is missing trains
    assert len(calls) == total and len(set(calls)) == total  # every job once
    # order: the main grid depth by depth (shallow first), then extra seeds, then ablations at the deepest
    assert [c[0] for c in calls[:6]] == [2] * 6 and [c[0] for c in calls[6:]] == [3] * 18
    assert [c[2] for c in calls[:12]] == [0] * 12 and [c[2] for c in calls[12:18]] == [1] * 6
    assert [c[1] for c in calls[18:]] == ["MoS l=1", "MoS p=0", "MoS tied"] * 2

    def no_training(*args, **kw):
        raise AssertionError("a finished sweep must not train again")

    monkeypatch.setattr(R, "finetune", no_training)
    monkeypatch.setattr(R, "train", no_training)
    capsys.readouterr()
    R.main(argv)  # a second complete run: nothing to do, bases not retrained either
    assert "trained 0 runs" in capsys.readouterr().out
    R.main(argv + ["--report-only"])
    md = (tmp_path / "results_depth.md").read_text()
    assert "PARTIAL" not in md
    assert "## Savings factor of MoS against LoRA, per depth" in md
    assert "| 3 |" in md and "MoS tied" in md and "separates?" in md
    assert "--depths 2,3 --hidden 16" in md
    png = tmp_path / "quality_depth.png"
    try:
        import matplotlib  # noqa: F401
        assert png.stat().st_size > 1000
    except ImportError:
        assert not png.exists()
