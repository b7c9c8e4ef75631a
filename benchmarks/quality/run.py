"""Quality experiment: does MoS deliver LoRA-level held-out loss with fewer trainable parameters?

Everything comes from the Python interpreter this runs under, so nothing is downloaded:

1. Corpus: the standard library's ``*.py`` files (``sysconfig.get_paths()["stdlib"]``), read as
   bytes (vocabulary 256, no tokenizer).
   * pretraining domain: every stdlib module outside the test suites (any path component
     ``test``/``tests``/``idle_test``), ``site-packages`` and ``pydoc_data``;
   * fine-tuning domain (shifted), ``--domain tests`` (default): the regression-test package
     ``test/``; ``--domain docs``: the language-reference prose in ``pydoc_data/topics.py``.
     Files (topics) are split deterministically by CRC32 of their path: 10% held-out test
     (the reported numbers), 10% validation (used only by ``--lr-sweep``), the rest train.
2. Pretrain a small Llama-shaped model (``LlamaConfig``, random init, fixed seed) on the
   pretraining domain; the checkpoint is cached (``--cache``, default ``benchmarks/out/quality``,
   which git ignores) so reruns skip it.
3. Fine-tune the frozen base on the shifted domain with every adapter of the grid, each for the
   same number of steps, on the same batches (the batch of step ``i`` depends only on the
   seed and ``i``), for every seed; all seven projections adapted; AdamW, warmup + cosine,
   gradient clipping 1.0, no dropout, ``lora_alpha = 2 r`` (so LoRA and MoS both run at
   ``scale = 2``; MiSS has scale 1 by definition).
   * LoRA ``r`` in {1, 2, 4, 8, 16, 32};
   * MoS at equivalent rank ``e`` in {1, 2, 4}: ``l = 4``, ``r`` the largest of 4e, 3e, 2e the
     layer count allows (``r - p <= (e - p) L``), ``p = 0`` for ``e = 1`` (``p = e`` would make it
     LoRA), else ``p = max(1, e // 2)`` (a small private rank);
   * ablations at ``e = 2`` (``--ablate-e``): ``l = 1``, ``p = 0``, tied index tables;
   * MiSS default with ``r`` chosen so its parameter count is nearest each MoS budget.
4. Report the held-out loss (nats per byte) and perplexity against trainable parameters: a
   markdown table, a PNG (one curve per method) and the parameter-savings factor: the number
   of parameters LoRA needs to reach each method's loss, by interpolating LoRA's
   loss-vs-log(params) curve, divided by that method's parameters.

    python benchmarks/quality/run.py --quick                  # CPU, reduced size, < ~20 min on 2 cores
    python benchmarks/quality/run.py --full --device cuda     # full size (GPU)
    python benchmarks/quality/run.py --quick --lr-sweep       # the one-off lr sweep (validation split)
    python benchmarks/quality/run.py --depth-sweep --depths 6,12,24,32 --hidden 64 --threads 1   # resumable
    python benchmarks/quality/run.py --depth-sweep --depths 6,12,24,32 --hidden 64 --report-only

``--layers/--hidden/--inter/--heads/--seq/--batch/--pretrain-lr/--eval-windows`` change the model of
a ``--quick``/``--full`` run (its files are then named after the changed sizes). ``--depth-sweep``
runs the same grid at every depth of ``--depths`` (MoS r up to 8e there; ablations and
``--deep-seeds`` seeds at the deepest) and writes one JSON per finished run under
``out/depth/H<hidden>-<recipe hash>/L<depth>/`` (committed), so a rerun resumes; bases are cached
in ``out/depth/bases/`` (git-ignored). Report: ``results_depth.md`` and ``quality_depth.png``.

Writes ``benchmarks/quality/out/quality_<mode>.json`` (raw per-run results),
``benchmarks/quality/results_<mode>.md`` (table, savings, command, machine, wall time) and
``benchmarks/quality/quality_<mode>.png`` (needs matplotlib; skipped with a message otherwise).
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import sysconfig
import time
import zlib

# libgomp's default spin-wait (300,000 spins per barrier) makes every step ~25x slower when another
# process shares the cores; OMP_WAIT_POLICY=PASSIVE avoids that but costs ~1.5x on an idle machine.
# A short spin keeps the idle-machine speed and bounds the loss under contention (set either
# variable yourself to override).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(HERE))
from _plot import pyplot  # noqa: E402

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Sizes. quick: CPU, ~20 minutes on 2 cores. full: GPU.
MODES = {
    "quick": dict(layers=6, hidden=128, inter=352, heads=4, seq=128, batch=16, pretrain_steps=1000,
                  pretrain_lr=3e-3, finetune_steps=150, eval_windows=96, seeds=2),
    "full": dict(layers=8, hidden=512, inter=1408, heads=8, seq=256, batch=32, pretrain_steps=6000,
                 pretrain_lr=1.5e-3, finetune_steps=1000, eval_windows=512, seeds=3),
}
# One learning rate per method family (AdamW). Picked once with --lr-sweep on the quick setting
# (validation split, seed 0); see README.md.
LRS = {"lora": 1e-2, "mos": 1e-2, "miss": 3e-3}
SWEEP_LRS = (3e-3, 1e-2, 3e-2)


# ----------------------------------------------------------------------------- corpus


def stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


_SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "pydoc_data", "__pycache__"}


def _py_files(root: str):
    out = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".py"):
                out.append(os.path.relpath(os.path.join(d, f), root))
    return sorted(out)


def _split(key: str) -> str:
    h = zlib.crc32(key.encode()) % 10
    return "test" if h == 0 else "val" if h == 1 else "train"


def load_corpus(domain: str):
    """{"pretrain": bytes, "train": bytes, "val": bytes, "test": bytes} and a description."""
    root = stdlib_dir()
    files = _py_files(root)
    sep = b"\n\n"

    def read(rel):
        with open(os.path.join(root, rel), "rb") as f:
            return f.read()

    pre = [f for f in files
           if not (set(f.split(os.sep)[:-1]) & _SKIP_PARTS) and "sysconfigdata" not in f
           and not f.split(os.sep)[0].startswith("config-")]
    parts = {"train": [], "val": [], "test": []}
    if domain == "tests":
        ft = [f for f in files if f.split(os.sep)[0] == "test"]
        if not ft:
            raise SystemExit(f"no test/ package under {root}: this Python ships without its test suite; "
                             f"use --domain docs")
        for f in ft:
            parts[_split(f)].append(read(f))
    elif domain == "docs":
        path = os.path.join(root, "pydoc_data", "topics.py")
        if not os.path.isfile(path):
            raise SystemExit(f"{path} is missing (this Python ships without pydoc topics); use --domain tests")
        tree = ast.parse(read(os.path.join("pydoc_data", "topics.py")))
        topics = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign))
        for k in sorted(topics):
            parts[_split(k)].append(topics[k].encode("utf-8"))
        ft = sorted(topics)
    else:
        raise SystemExit(f"unknown domain {domain!r}")
    data = {"pretrain": sep.join(read(f) for f in pre)}
    data.update({k: sep.join(v) for k, v in parts.items()})
    desc = dict(stdlib=root, python=platform.python_version(), domain=domain, pretrain_files=len(pre),
                finetune_units=len(ft), **{f"{k}_bytes": len(v) for k, v in data.items()},
                sha256={k: hashlib.sha256(v).hexdigest()[:16] for k, v in data.items()})
    return data, desc


def to_tensor(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8).to(torch.long)


def batch_at(stream: torch.Tensor, seed: int, step: int, batch: int, seq: int) -> torch.Tensor:
    """Random windows of ``seq + 1`` bytes; depends only on (seed, step): every method sees the same data."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + step)
    starts = torch.randint(0, stream.numel() - seq - 1, (batch,), generator=g)
    return stream[starts.unsqueeze(1) + torch.arange(seq + 1)]


def eval_windows(stream: torch.Tensor, n: int, seq: int) -> torch.Tensor:
    """``n`` windows spread evenly over the stream (fixed; the same for every run)."""
    n = min(n, (stream.numel() - 1) // (seq + 1))
    starts = torch.linspace(0, stream.numel() - seq - 2, n).long()
    return stream[starts.unsqueeze(1) + torch.arange(seq + 1)]


# ----------------------------------------------------------------------------- model


def llama_config(m):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=m["hidden"], intermediate_size=m["inter"],
                       num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
                       num_key_value_heads=m["heads"], max_position_embeddings=m["seq"], tie_word_embeddings=False,
                       bos_token_id=None, eos_token_id=None, pad_token_id=None)


def new_model(m, device):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(llama_config(m))
    return model.to(device)


def lm_loss(model, win: torch.Tensor) -> torch.Tensor:
    """Mean next-byte cross-entropy (nats) of windows [B, T+1]."""
    logits = model(input_ids=win[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1))


@torch.no_grad()
def evaluate(model, wins: torch.Tensor, device, bs: int = 32) -> float:
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, wins.shape[0], bs):
        w = wins[i:i + bs].to(device)
        tot += lm_loss(model, w).item() * w.shape[0]
        n += w.shape[0]
    model.train()
    return tot / n


def lr_at(step: int, steps: int, lr: float) -> float:
    warm = max(1, steps // 20)
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train(model, params, stream, seed, steps, lr, m, device, weight_decay=0.0, log=None):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    model.train()
    recent = []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        win = batch_at(stream, seed, step, m["batch"], m["seq"]).to(device)
        loss = lm_loss(model, win)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        if log and (step % log == 0 or step == steps - 1):
            print(f"    step {step:5d}/{steps}  train loss {statistics.mean(recent):.4f}", flush=True)
    return statistics.mean(recent)


def pretrained_base(m, data, desc, device, cache_dir):
    key = hashlib.sha256(json.dumps([m, desc["sha256"]["pretrain"], "v1"], sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir, f"base_{key}.pt")
    model = new_model(m, device)
    if os.path.isfile(path):
        model.load_state_dict(torch.load(path, map_location=device))
        print(f"pretrained base: loaded {path}", flush=True)
        return model, path, 0.0
    t0 = time.perf_counter()
    print(f"pretraining the base ({m['pretrain_steps']} steps) -> {path}", flush=True)
    params = list(model.parameters())
    stream = to_tensor(data["pretrain"])
    train(model, params, stream, seed=12345, steps=m["pretrain_steps"], lr=m["pretrain_lr"], m=m, device=device,
          weight_decay=0.1, log=max(1, m["pretrain_steps"] // 10))
    os.makedirs(cache_dir, exist_ok=True)
    torch.save(model.state_dict(), path + ".tmp")
    os.replace(path + ".tmp", path)
    return model, path, time.perf_counter() - t0


# ----------------------------------------------------------------------------- the grid


def mos_rank(e, p, l, L):
    """Largest r in (4e, 3e, 2e) with (r - p) l <= (e - p) L l (MOS.md section 2)."""
    for r in (4 * e, 3 * e, 2 * e):
        if r - p <= (e - p) * L:
            return r
    return e


def adapter_params(m, method, r, e=None):
    """Trainable parameters of the grid's adapters (all seven projections, every layer)."""
    H, I, L = m["hidden"], m["inter"], m["layers"]
    dims = [(H, H)] * 4 + [(H, I), (H, I), (I, H)]  # q k v o gate up down (no GQA)
    if method == "miss":
        return L * r * sum(o for _, o in dims)
    return L * (e if method == "mos" else r) * sum(h + o for h, o in dims)


def grid(m, es=(1, 2, 4), lora_ranks=(1, 2, 4, 8, 16, 32), ablate_e=2):
    L, H, I = m["layers"], m["hidden"], m["inter"]
    runs = []
    for r in lora_ranks:
        runs.append(dict(family="lora", label="LoRA", name=f"r={r}", method="lora", r=r))
    for e in es:
        p = 0 if e == 1 else max(1, e // 2)
        r = mos_rank(e, p, 4, L)
        runs.append(dict(family="mos", label="MoS", name=f"e={e} r={r} l=4 p={p}", method="mos", r=r, e=e, l=4, p=p))
    if ablate_e:
        e = ablate_e
        p = 0 if e == 1 else max(1, e // 2)
        r = mos_rank(e, p, 4, L)
        # every ablation changes one thing of the main MoS config at this budget (same r)
        runs.append(dict(family="mos", label="MoS l=1", name=f"e={e} r={r} l=1 p={p}", method="mos", r=r, e=e, l=1, p=p))
        runs.append(dict(family="mos", label="MoS p=0", name=f"e={e} r={r} l=4 p=0", method="mos", r=r, e=e, l=4, p=0))
        runs.append(dict(family="mos", label="MoS tied", name=f"e={e} r={r} l=4 p={p} tied", method="mos", r=r, e=e,
                         l=4, p=p, tie=True))
    divisors = [d for d in range(1, 65) if H % d == 0 and I % d == 0]
    for e in es:
        target = adapter_params(m, "mos", 0, e)
        r = min(divisors, key=lambda d: abs(math.log(adapter_params(m, "miss", d) / target)))
        runs.append(dict(family="miss", label="MiSS", name=f"r={r} (~e={e})", method="miss", r=r))
    return runs


def make_cfg(run, seed):
    from mos_ext import MoSConfig

    if run["method"] == "lora":
        return MoSConfig(method="lora", r=run["r"], lora_alpha=2 * run["r"], target_modules=ALL7, seed=seed)
    if run["method"] == "miss":
        return MoSConfig(method="miss", r=run["r"], target_modules=ALL7, seed=seed)
    return MoSConfig(r=run["r"], equivalent_rank=run["e"], shards_per_vector=run["l"], private_rank=run["p"],
                     lora_alpha=2 * run["r"], tie_indices=run.get("tie", False), target_modules=ALL7, seed=seed)


def finetune(run, seed, lr, base_sd, m, streams, device, eval_split="test"):
    from mos_ext import get_mos_model

    model = new_model(m, device)
    model.load_state_dict(base_sd)
    torch.manual_seed(seed)
    model = get_mos_model(model, make_cfg(run, seed))
    params = [p for p in model.parameters() if p.requires_grad]
    n = sum(p.numel() for p in params)
    t0 = time.perf_counter()
    tr = train(model, params, streams["train"], seed, m["finetune_steps"], lr, m, device)
    loss = evaluate(model, streams[eval_split], device)
    return dict(params=n, loss=loss, train_loss=tr, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------- analysis


def lora_params_for(loss, curve):
    """Parameters LoRA needs to reach ``loss``: interpolate loss linearly in log(params) along LoRA's
    points sorted by params, made monotone by a running minimum (the smallest LoRA budget that
    reaches the loss). Returns (params, how), how in {"interp", "above", "below"}: "above" = worse
    than LoRA's smallest point (the factor is an upper bound), "below" = better than every LoRA
    point (a lower bound)."""
    pts, best = [], float("inf")
    for p, l in sorted(curve):
        best = min(best, l)
        pts.append((p, best))
    if loss >= pts[0][1]:
        return pts[0][0], "above"
    if loss < pts[-1][1]:
        return pts[-1][0], "below"
    for (p0, l0), (p1, l1) in zip(pts, pts[1:]):
        if l1 <= loss < l0:
            t = (l0 - loss) / (l0 - l1)
            return math.exp(math.log(p0) + t * (math.log(p1) - math.log(p0))), "interp"
    return pts[-1][0], "below"  # unreachable


def summarize(results, runs):
    rows = []
    for run in runs:
        rs = [r for r in results if r["run"] == run["id"]]
        losses = [r["loss"] for r in rs]
        mean = statistics.mean(losses)
        std = statistics.stdev(losses) if len(losses) > 1 else 0.0
        rows.append(dict(id=run["id"], family=run["family"], label=run["label"], name=run["name"],
                         params=rs[0]["params"], loss_mean=mean, loss_std=std, ppl=math.exp(mean),
                         train_loss=statistics.mean(r["train_loss"] for r in rs), n=len(rs),
                         seconds=statistics.mean(r["seconds"] for r in rs)))
    curve = [(r["params"], r["loss_mean"]) for r in rows if r["label"] == "LoRA"]
    for r in rows:
        if r["label"] == "LoRA" or not curve:
            continue
        need, how = lora_params_for(r["loss_mean"], curve)
        r["lora_params_needed"] = need
        r["savings"] = need / r["params"]
        r["savings_kind"] = how
    return rows


def fmt_savings(r):
    if "savings" not in r:
        return ""
    s = r["savings"]
    return {"interp": f"{s:.2f}x", "above": f"< {s:.2f}x", "below": f"> {s:.2f}x"}[r["savings_kind"]]


def table(rows, base_loss):
    out = ["| method | config | trainable params | held-out loss (nats/byte), mean ± std | ppl | "
           "LoRA params for same loss | savings factor |",
           "|---|---|---:|---:|---:|---:|---:|",
           f"| base (no adapter) | — | 0 | {base_loss:.4f} | {math.exp(base_loss):.3f} | | |"]
    for r in rows:
        need = f"{r['lora_params_needed']:,.0f}" if "lora_params_needed" in r else ""
        if r.get("savings_kind") == "above":
            need = "< " + need
        elif r.get("savings_kind") == "below":
            need = "> " + need
        out.append(f"| {r['label']} | {r['name']} | {r['params']:,} | {r['loss_mean']:.4f} ± {r['loss_std']:.4f} | "
                   f"{r['ppl']:.3f} | {need} | {fmt_savings(r)} |")
    return "\n".join(out)


def plot(rows, path, title):
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 5))
    # label: (format, colour, x offset factor; the ablations share MoS e=2's budget, so they are drawn
    # slightly apart to stay readable)
    styles = {"LoRA": ("o-", "C0", 1.0), "MoS": ("s-", "C3", 1.0), "MiSS": ("^-", "C2", 1.0),
              "MoS l=1": ("v", "C1", 0.93), "MoS p=0": ("D", "C4", 1.07), "MoS tied": ("X", "C5", 1.14)}
    for label, (fmt, color, dx) in styles.items():
        rs = sorted((r for r in rows if r["label"] == label), key=lambda r: r["params"])
        if not rs:
            continue
        name = label if dx == 1.0 else f"{label} (e={rs[0]['name'].split()[0][2:]}, drawn offset)"
        ax.errorbar([r["params"] * dx for r in rs], [r["loss_mean"] for r in rs], yerr=[r["loss_std"] for r in rs],
                    fmt=fmt, color=color, label=name, capsize=3, markersize=6 if len(rs) > 1 else 7)
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters")
    ax.set_ylabel("held-out loss (nats / byte), mean ± std over seeds")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def machine():
    if torch.cuda.is_available():
        try:
            return torch.cuda.get_device_name(0)
        except Exception:
            pass
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}"


# ----------------------------------------------------------------------------- depth sweep
#
# Does MoS's saving grow with the number of layers (its pools are shared across all of them)?
# One base per depth (same recipe as --quick, narrower: hidden 64 by default), the same fine-tuning
# grid at every depth, every finished run written to its own small JSON under
# ``out/depth/<recipe>/L<depth>/`` (committed: they are the evidence), so an interrupted sweep resumes
# where it stopped. Pretrained bases go to ``out/depth/bases/`` (git-ignored, rebuilt
# deterministically from the recipe when missing).

DEPTH_DIR = os.path.join(HERE, "out", "depth")
DEPTH_VERSION = "depth-v1"


def depth_model(a, L):
    """The model/recipe dict of one depth: --quick's recipe with the sizes given on the command line."""
    q = MODES["quick"]
    hidden = a.hidden or 64
    inter = a.inter or 4 * max(1, round(hidden * q["inter"] / q["hidden"] / 4))  # quick's ratio, multiple of 4
    return dict(layers=L, hidden=hidden, inter=inter, heads=a.heads or q["heads"], seq=a.seq or q["seq"],
                batch=a.batch or q["batch"], pretrain_steps=_pick(a.pretrain_steps, q["pretrain_steps"]),
                pretrain_lr=a.pretrain_lr or q["pretrain_lr"],
                finetune_steps=_pick(a.finetune_steps, q["finetune_steps"]),
                eval_windows=a.eval_windows or q["eval_windows"])


def _pick(v, default):
    return default if v is None else v


def _hash(obj, n=10):
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:n]


def depth_mos_rank(e, p, L, cap=8):
    """The largest r <= cap * e that MOS.md section 2 allows: r - p <= (e - p) L (an e = p config is LoRA)."""
    return min(cap * e, p + (e - p) * L)


def _private(e):
    return 0 if e == 1 else max(1, e // 2)


def depth_grid(m, es, lora_ranks, ablate_e=None):
    """Main grid of one depth (LoRA ranks, MoS at each e, MiSS at each MoS budget), or with ``ablate_e``
    only the three ablations of MoS at that e (each changes one thing of the main config, same r)."""
    L, H, I = m["layers"], m["hidden"], m["inter"]
    runs = []
    if ablate_e:
        e, p = ablate_e, _private(ablate_e)
        r = depth_mos_rank(e, p, L)
        runs.append(dict(family="mos", label="MoS l=1", name=f"e={e} r={r} l=1 p={p}", method="mos", r=r, e=e, l=1,
                         p=p))
        runs.append(dict(family="mos", label="MoS p=0", name=f"e={e} r={r} l=4 p=0", method="mos", r=r, e=e, l=4, p=0))
        runs.append(dict(family="mos", label="MoS tied", name=f"e={e} r={r} l=4 p={p} tied", method="mos", r=r, e=e,
                         l=4, p=p, tie=True))
        return runs
    for r in lora_ranks:
        runs.append(dict(family="lora", label="LoRA", name=f"r={r}", method="lora", r=r))
    for e in es:
        p = _private(e)
        r = depth_mos_rank(e, p, L)
        runs.append(dict(family="mos", label="MoS", name=f"e={e} r={r} l=4 p={p}", method="mos", r=r, e=e, l=4, p=p))
    divisors = [d for d in range(1, 65) if H % d == 0 and I % d == 0]
    for e in es:
        target = adapter_params(m, "mos", 0, e)
        r = min(divisors, key=lambda d: abs(math.log(adapter_params(m, "miss", d) / target)))
        runs.append(dict(family="miss", label="MiSS", name=f"r={r} (~e={e})", method="miss", r=r, e_match=e))
    return runs


def run_slug(run):
    s = f"{run['method']}_r{run['r']}"
    if run["method"] == "mos":
        s += f"_e{run['e']}_l{run['l']}_p{run['p']}" + ("_tied" if run.get("tie") else "")
    return s


class DepthSweep:
    """The jobs of a depth sweep in the order they run, and where each one's result lives."""

    def __init__(self, a, desc):
        self.depths = sorted({int(x) for x in a.depths.split(",")})
        self.deep = self.depths[-1]
        self.seeds = a.seeds if a.seeds is not None else 2
        self.deep_seeds = max(self.seeds, a.deep_seeds)
        self.es = [int(x) for x in a.es.split(",")]
        self.lora_ranks = [int(x) for x in a.lora_ranks.split(",")]
        self.ablate_e = a.ablate_e
        self.domain = a.domain
        self.desc = desc
        self.models = {L: depth_model(a, L) for L in self.depths}
        recipe = {k: v for k, v in self.models[self.deep].items() if k != "layers"}
        # everything but the depth that decides a number: the directory name says which recipe a JSON belongs to
        self.recipe = recipe
        self.recipe_key = _hash([DEPTH_VERSION, recipe, LRS, a.domain, desc["sha256"]], 8)
        self.root = os.path.join(os.path.abspath(a.depth_out), f"H{recipe['hidden']}-{self.recipe_key}")
        self.bases = os.path.join(os.path.abspath(a.depth_out), "bases")
        self.jobs = []  # (L, run, seed, phase)
        for L in self.depths:  # phase 1: the main grid at every depth, shallow first
            for seed in range(self.seeds):
                for run in depth_grid(self.models[L], self.es, self.lora_ranks):
                    self.jobs.append((L, run, seed, "main"))
        for seed in range(self.seeds, self.deep_seeds):  # phase 2: extra seeds at the deepest L
            for run in depth_grid(self.models[self.deep], self.es, self.lora_ranks):
                self.jobs.append((self.deep, run, seed, "deep seeds"))
        if self.ablate_e:  # phase 3: ablations at the deepest L, every deep seed
            for seed in range(self.deep_seeds):
                for run in depth_grid(self.models[self.deep], self.es, self.lora_ranks, ablate_e=self.ablate_e):
                    self.jobs.append((self.deep, run, seed, "ablations"))

    def run_key(self, L, run, seed):
        cfg = {k: run[k] for k in ("method", "r", "e", "l", "p", "tie") if k in run}
        return _hash([DEPTH_VERSION, self.models[L], cfg, seed, LRS[run["family"]], self.domain, self.desc["sha256"]],
                     16)

    def path(self, L, run, seed):
        return os.path.join(self.root, f"L{L}", f"{run_slug(run)}_s{seed}.json")

    def base_info_path(self, L):
        return os.path.join(self.root, f"L{L}", "base.json")

    def base_key(self, L):
        return _hash([DEPTH_VERSION, self.models[L], self.desc["sha256"]["pretrain"]], 12)

    def load(self, L, run, seed):
        """The cached result of a job, or None if it has not run (or ran with other settings)."""
        p = self.path(L, run, seed)
        if not os.path.isfile(p):
            return None
        with open(p) as f:
            d = json.load(f)
        return d if d.get("key") == self.run_key(L, run, seed) else None


def _write_json(path, obj):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(path + ".tmp", path)


def depth_base(sw, L, data, device, streams):
    """The pretrained base of depth L (trained once, cached in ``bases/``) and its info (losses, seconds),
    which is also written next to the runs as ``base.json``."""
    m = sw.models[L]
    key = sw.base_key(L)
    pt = os.path.join(sw.bases, f"base_L{L}_{key}.pt")
    info_path = sw.base_info_path(L)
    info = None
    if os.path.isfile(info_path):
        with open(info_path) as f:
            info = json.load(f)
        if info.get("key") != key:
            info = None
    model = new_model(m, device)
    if os.path.isfile(pt):
        model.load_state_dict(torch.load(pt, map_location=device))
        print(f"  L={L}: pretrained base loaded from {os.path.relpath(pt, REPO)}", flush=True)
        seconds = info["pretrain_seconds"] if info else None
    else:
        print(f"  L={L}: pretraining the base ({m['pretrain_steps']} steps) -> {os.path.relpath(pt, REPO)}", flush=True)
        t0 = time.perf_counter()
        train(model, list(model.parameters()), to_tensor(data["pretrain"]), seed=12345, steps=m["pretrain_steps"],
              lr=m["pretrain_lr"], m=m, device=device, weight_decay=0.1, log=max(1, m["pretrain_steps"] // 5))
        seconds = round(time.perf_counter() - t0, 1)
        os.makedirs(sw.bases, exist_ok=True)
        torch.save(model.state_dict(), pt + ".tmp")
        os.replace(pt + ".tmp", pt)
    test = evaluate(model, streams["test"], device)
    if info is not None and info["loss_test"] != test:
        print(f"  WARNING L={L}: the base's held-out loss {test!r} differs from the recorded {info['loss_test']!r} "
              f"(another thread count or torch build?); the runs already cached used the recorded base", flush=True)
    if info is None:
        pre = evaluate(model, eval_windows(to_tensor(data["pretrain"]), m["eval_windows"], m["seq"]), device)
        info = dict(key=key, layers=L, model=m, loss_test=test, loss_pretrain_domain=pre,
                    total_params=sum(p.numel() for p in model.parameters()), pretrain_seconds=seconds,
                    threads=torch.get_num_threads(), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M %Z"))
        _write_json(info_path, info)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return sd, info


def depth_sweep(a, device):
    data, desc = load_corpus(a.domain)
    sw = DepthSweep(a, desc)
    total = len(sw.jobs)
    todo = [j for j in sw.jobs if sw.load(j[0], j[1], j[2]) is None]
    print(f"depth sweep: depths {sw.depths}, hidden {sw.recipe['hidden']}, inter {sw.recipe['inter']}, "
          f"{sw.seeds} seeds ({sw.deep_seeds} at L={sw.deep}); results in {os.path.relpath(sw.root, REPO)}; "
          f"{total - len(todo)}/{total} runs already done, {len(todo)} to go", flush=True)
    if a.report_only:
        write_depth_report(sw, a)
        return
    streams = {"train": to_tensor(data["train"])}
    streams["test"] = eval_windows(to_tensor(data["test"]), sw.recipe["eval_windows"], sw.recipe["seq"])
    t0 = time.perf_counter()
    base_L, base_sd, trained = None, None, 0
    for L, run, seed, phase in sw.jobs:
        if sw.load(L, run, seed) is not None:
            continue
        if a.max_runs is not None and trained >= a.max_runs:
            print(f"stopping after --max-runs {a.max_runs}", flush=True)
            break
        if L != base_L:
            base_sd, info = depth_base(sw, L, data, device, streams)
            base_L = L
        m = sw.models[L]
        lr = LRS[run["family"]]
        res = finetune(run, seed, lr, base_sd, m, streams, device)
        trained += 1
        out = dict(key=sw.run_key(L, run, seed), layers=L, run=run, seed=seed, lr=lr, phase=phase,
                   params=res["params"], loss=res["loss"], train_loss=res["train_loss"],
                   seconds=round(res["seconds"], 1), threads=torch.get_num_threads(),
                   date=time.strftime("%Y-%m-%d %H:%M %Z"))
        _write_json(sw.path(L, run, seed), out)
        done = sum(sw.load(*j[:3]) is not None for j in sw.jobs)
        el = time.perf_counter() - t0
        print(f"[{done:3d}/{total}] L={L:2d} {phase:10s} {run['label']:8s} {run['name']:22s} seed {seed}: "
              f"{res['params']:>9,} params  loss {res['loss']:.4f}  ({res['seconds']:.0f}s; this session "
              f"{trained} runs, {el / 60:.1f} min)", flush=True)
    print(f"trained {trained} runs this session", flush=True)
    write_depth_report(sw, a)


# ----------------------------------------------------------------------------- depth report


def _mean_std(xs):
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs else (float("nan"), 0.0)


def depth_results(sw):
    """{L: {"base": info or None, "runs": {slug: {"run", "params", "losses": {seed: loss}}}}} of what has finished."""
    out = {}
    for L in sw.depths:
        info = None
        if os.path.isfile(sw.base_info_path(L)):
            with open(sw.base_info_path(L)) as f:
                info = json.load(f)
        runs = {}
        for JL, run, seed, phase in sw.jobs:
            if JL != L:
                continue
            d = sw.load(L, run, seed)
            slot = runs.setdefault(run_slug(run), dict(run=run, params=None, losses={}, seconds=[]))
            if d is not None:
                slot["params"] = d["params"]
                slot["losses"][seed] = d["loss"]
                slot["seconds"].append(d["seconds"])
        out[L] = dict(base=info, runs=runs)
    return out


def depth_savings(res_L, slug, lora_ranks):
    """Savings of one run at one depth: from the seed-mean losses, and per seed (each seed's LoRA curve against
    the same seed's run; only seeds where every LoRA rank and the run finished)."""
    runs = res_L["runs"]
    lora = [runs[f"lora_r{r}"] for r in lora_ranks if f"lora_r{r}" in runs]
    me = runs.get(slug)
    if me is None or not me["losses"] or not lora:
        return None
    # only the seeds every point has: a mean over different seed sets would compare different data
    seeds = sorted(set(me["losses"]).intersection(*(x["losses"] for x in lora)))
    if not seeds:
        return None
    curve = [(x["params"], statistics.mean(x["losses"][s] for s in seeds)) for x in lora]
    losses = [me["losses"][s] for s in seeds]
    need, how = lora_params_for(statistics.mean(losses), curve)
    per_seed = {}
    for s in seeds:
        n_s, how_s = lora_params_for(me["losses"][s], [(x["params"], x["losses"][s]) for x in lora])
        per_seed[s] = (n_s / me["params"], how_s)
    return dict(params=me["params"], loss=statistics.mean(losses), loss_std=_mean_std(losses)[1], n=len(seeds),
                seeds=seeds, need=need, savings=need / me["params"], how=how, per_seed=per_seed)


def _fmt_sav(s, how):
    return {"interp": f"{s:.2f}x", "above": f"< {s:.2f}x", "below": f"> {s:.2f}x"}[how]


def _fmt_spread(per_seed):
    if not per_seed:
        return ""
    xs = [v for v, _ in per_seed.values()]
    bound = any(h != "interp" for _, h in per_seed.values())
    m, sd = _mean_std(xs)
    txt = f"{m:.2f} ± {sd:.2f} (n={len(xs)}; {min(xs):.2f}–{max(xs):.2f})"
    return txt + (" *" if bound else "")


def sweep_command(sw, a):
    """The command line that (re)runs this sweep: every option that decides a number, spelled out."""
    parts = ["python benchmarks/quality/run.py --depth-sweep", f"--depths {','.join(map(str, sw.depths))}",
             f"--hidden {sw.recipe['hidden']}"]
    for opt in ("inter", "heads", "seq", "batch", "pretrain_steps", "finetune_steps", "pretrain_lr", "eval_windows"):
        if getattr(a, opt) is not None:
            parts.append(f"--{opt.replace('_', '-')} {getattr(a, opt):g}")
    parts.append(f"--seeds {sw.seeds} --deep-seeds {sw.deep_seeds}")
    if sw.es != [1, 2, 4]:
        parts.append(f"--es {','.join(map(str, sw.es))}")
    if sw.lora_ranks != [1, 2, 4, 8, 16, 32]:
        parts.append(f"--lora-ranks {','.join(map(str, sw.lora_ranks))}")
    if sw.ablate_e != 2:
        parts.append(f"--ablate-e {sw.ablate_e}")
    if sw.domain != "tests":
        parts.append(f"--domain {sw.domain}")
    if os.path.abspath(a.depth_out) != DEPTH_DIR:
        parts.append(f"--depth-out {a.depth_out}")
    if os.path.abspath(a.report_dir) != HERE:
        parts.append(f"--report-dir {a.report_dir}")
    parts.append(f"--threads {a.threads}")
    return " ".join(parts)


def write_depth_report(sw, a):
    res = depth_results(sw)
    done = sum(sw.load(*j[:3]) is not None for j in sw.jobs)
    total = len(sw.jobs)
    complete = done == total
    main_runs = {L: depth_grid(sw.models[L], sw.es, sw.lora_ranks) for L in sw.depths}
    md = ["# Depth sweep: does MoS's parameter saving grow with the number of layers?", ""]
    if not complete:
        md += [f"**PARTIAL: {done} of {total} runs finished** (the sweep was still running or was interrupted when "
               f"this was written; rerun the command below to resume, then `--report-only`).", ""]
    if not complete:
        eta = _remaining_hours(sw, res)
        if eta is not None:
            md += [f"Remaining: {total - done} runs, about {eta:.1f} h more at the pace measured so far "
                   f"(fine-tuning seconds per layer per run, pretraining seconds per layer; machine load varies).", ""]
    r = sw.recipe
    walls = [s for L in sw.depths for x in res[L]["runs"].values() for s in x["seconds"]]
    pre = [res[L]["base"]["pretrain_seconds"] for L in sw.depths
           if res[L]["base"] and res[L]["base"].get("pretrain_seconds")]
    cmd = sweep_command(sw, a)
    md += ["Generated by `benchmarks/quality/run.py --depth-sweep`; method and reading in `README.md`.", "",
           f"- written: {time.strftime('%Y-%m-%d %H:%M %Z')}; machine: {machine()}",
           f"- command: `{cmd}` (resumes: finished runs are read from "
           f"`{os.path.relpath(sw.root, REPO)}/L*/*.json`); report only: the same with `--report-only`",
           f"- compute so far: {sum(walls) / 3600:.2f} h of fine-tuning ({len(walls)} runs) + "
           f"{sum(pre) / 3600:.2f} h of pretraining, at the thread count of the command",
           f"- model per depth: byte-level Llama, hidden {r['hidden']}, intermediate {r['inter']}, {r['heads']} heads, "
           f"pretrained {r['pretrain_steps']} steps x {r['batch']} x {r['seq']} bytes (lr {r['pretrain_lr']}); "
           f"fine-tuned {r['finetune_steps']} steps on domain `{sw.domain}`, lr {LRS}, lora_alpha = 2r, all 7 "
           f"projections; held-out = {r['eval_windows']} windows of {r['seq']} bytes",
           f"- seeds {sw.seeds} at every depth, {sw.deep_seeds} at L={sw.deep}; ablations (e={sw.ablate_e}) at "
           f"L={sw.deep}", ""]
    # --- savings table
    md += ["## Savings factor of MoS against LoRA, per depth", "",
           "savings = (LoRA parameters needed to reach MoS's seed-mean held-out loss, interpolated on LoRA's "
           "loss-vs-log(params) curve) / (MoS parameters = LoRA rank e parameters). Per seed: the same with each "
           "seed's own LoRA curve; mean ± std over seeds (n; min–max). `<`/`>`/`*`: outside LoRA's range, a bound.", "",
           "| L | base loss | e | MoS config | params | MoS loss, mean ± std | LoRA r=e loss | LoRA params needed | "
           "savings (mean loss) | savings per seed |",
           "|---:|---:|---:|---|---:|---:|---:|---:|---:|---|"]
    sav_plot = {}
    for L in sw.depths:
        base = res[L]["base"]
        for run in main_runs[L]:
            if run["label"] != "MoS":
                continue
            s = depth_savings(res[L], run_slug(run), sw.lora_ranks)
            lr_e = res[L]["runs"].get(f"lora_r{run['e']}")
            lora_e = ""
            if lr_e and lr_e["losses"]:
                ss = s["seeds"] if s else list(lr_e["losses"])
                lora_e = f"{statistics.mean(lr_e['losses'][k] for k in ss):.4f}"
            if s is None:
                x = res[L]["runs"][run_slug(run)]
                loss = (f"{_mean_std(list(x['losses'].values()))[0]:.4f}" if x["losses"] else "not run yet")
                md.append(f"| {L} | {base['loss_test']:.4f} | {run['e']} | {run['name']} | | {loss} | {lora_e} | | "
                          f"(LoRA curve incomplete) | |" if base else
                          f"| {L} | | {run['e']} | {run['name']} | | {loss} | {lora_e} | | | |")
                continue
            sav_plot.setdefault(run["e"], []).append((L, s))
            md.append(f"| {L} | {base['loss_test']:.4f} | {run['e']} | {run['name']} | {s['params']:,} | "
                      f"{s['loss']:.4f} ± {s['loss_std']:.4f} | {lora_e} | {s['need']:,.0f} | "
                      f"{_fmt_sav(s['savings'], s['how'])} | {_fmt_spread(s['per_seed'])} |")
    md.append("")
    md += _depth_summary(sw, sav_plot, _ablation_rows(sw, res), complete) + [""]
    # --- full per-depth tables
    md += ["## Every configuration, per depth", "",
           "| L | method | config | params | held-out loss, mean ± std | seeds | savings vs LoRA |",
           "|---:|---|---|---:|---:|---:|---:|"]
    for L in sw.depths:
        for slug, x in res[L]["runs"].items():
            if not x["losses"]:
                continue
            m, sd = _mean_std(list(x["losses"].values()))
            sv = "" if x["run"]["label"] == "LoRA" else depth_savings(res[L], slug, sw.lora_ranks)
            md.append(f"| {L} | {x['run']['label']} | {x['run']['name']} | {x['params']:,} | {m:.4f} ± {sd:.4f} | "
                      f"{len(x['losses'])} | {_fmt_sav(sv['savings'], sv['how']) if sv else ''} |")
    md.append("")
    # --- ablations
    md += [f"## Ablations at L={sw.deep} (e={sw.ablate_e}): do they separate from full MoS?", ""]
    abl = _ablation_rows(sw, res)
    if abl:
        md += ["Paired by seed (same batches, same init seed): difference = ablation loss − full MoS loss; "
               "'separates' = every seed's difference has the same sign and |mean| > 2 standard errors.", "",
               "| variant | config | loss, mean ± std | paired diff vs full MoS, mean ± std (n) | per seed | "
               "separates? | savings |", "|---|---|---:|---:|---|---|---:|"]
        md += [row["md"] for row in abl]
    else:
        md.append("No ablation has finished yet.")
    md.append("")
    have_png = plot_depth(sw, res, sav_plot, os.path.join(a.report_dir, "quality_depth.png"))
    if have_png:
        md += ["![savings vs depth; loss vs parameters per depth](quality_depth.png)", ""]
    os.makedirs(a.report_dir, exist_ok=True)
    with open(os.path.join(a.report_dir, "results_depth.md"), "w") as f:
        f.write("\n".join(md))
    print("\n".join(md[:60]), flush=True)
    print(f"wrote {os.path.join(a.report_dir, 'results_depth.md')}"
          f"{' and quality_depth.png' if have_png else ''} ({done}/{total} runs)", flush=True)


def _remaining_hours(sw, res):
    """Hours the unfinished jobs should take at the pace measured so far (both costs scale with L)."""
    ft = [(L, sec) for L in sw.depths for x in res[L]["runs"].values() for sec in x["seconds"]]
    if not ft:
        return None
    per_layer = sum(sec for _, sec in ft) / sum(L for L, _ in ft)
    pre = [(L, res[L]["base"]["pretrain_seconds"]) for L in sw.depths
           if res[L]["base"] and res[L]["base"].get("pretrain_seconds")]
    pre_per_layer = sum(sec for _, sec in pre) / sum(L for L, _ in pre) if pre else 0.0
    todo = [L for L, run, seed, _ in sw.jobs if sw.load(L, run, seed) is None]
    no_base = {L for L in todo if res[L]["base"] is None}
    return (per_layer * sum(todo) + pre_per_layer * sum(no_base)) / 3600


def _depth_summary(sw, sav_plot, abl, complete):
    """What the numbers say, in sentences generated from them (no judgement is added here)."""
    out = ["## What the numbers say" + ("" if complete else " (so far: partial)"), ""]
    if not sav_plot:
        return out + ["No depth has a complete LoRA curve and MoS run yet."]
    for e in sorted(sav_plot):
        pts = sorted(sav_plot[e], key=lambda t: t[0])
        seq = ", ".join(f"L={L}: {_fmt_sav(s['savings'], s['how'])}" for L, s in pts)
        line = f"* MoS e={e}: {seq}"
        if len(pts) >= 2:
            (L0, s0), (L1, s1) = pts[0], pts[-1]
            sd = max(_mean_std([v for v, _ in s["per_seed"].values()])[1] for _, s in (pts[0], pts[-1]))
            line += (f"; from L={L0} to L={L1} the factor changes x{s1['savings'] / s0['savings']:.2f} "
                     f"({s1['savings'] - s0['savings']:+.2f}; the larger per-seed std of the two ends is {sd:.2f})")
            mono = all(b[1]["savings"] >= a[1]["savings"] for a, b in zip(pts, pts[1:]))
            line += "; it rises at every step in depth" if mono else "; it does not rise at every step in depth"
        out.append(line + ".")
    best = max((s["savings"], e, L) for e in sav_plot for L, s in sav_plot[e])
    out.append(f"* Largest factor measured: {best[0]:.2f}x (e={best[1]}, L={best[2]}); the paper reports about 8x "
               f"at 32 layers of LLaMA2-7B.")
    if abl:
        verdicts = [f"{r['label']}: {r['sep']} ({r['diff']:+.4f} nats/byte)" for r in abl if "sep" in r]
        if verdicts:
            out.append(f"* Ablations at L={sw.deep}, e={sw.ablate_e}, paired against full MoS: " + "; ".join(verdicts)
                       + ".")
    return out


def _ablation_rows(sw, res):
    if not sw.ablate_e:
        return []
    L = sw.deep
    runs = res[L]["runs"]
    full = next((r for r in depth_grid(sw.models[L], sw.es, sw.lora_ranks) if r["label"] == "MoS"
                 and r["e"] == sw.ablate_e), None)
    if full is None or not runs[run_slug(full)]["losses"]:
        return []
    fl = runs[run_slug(full)]["losses"]
    rows = [dict(md=f"| full MoS | {full['name']} | {_mean_std(list(fl.values()))[0]:.4f} ± "
                    f"{_mean_std(list(fl.values()))[1]:.4f} | | | | "
                    f"{_sav_cell(res[L], run_slug(full), sw.lora_ranks)} |")]
    for run in depth_grid(sw.models[L], sw.es, sw.lora_ranks, ablate_e=sw.ablate_e):
        x = runs[run_slug(run)]
        if not x["losses"]:
            continue
        diffs = [x["losses"][s] - fl[s] for s in sorted(x["losses"]) if s in fl]
        m, sd = _mean_std(diffs)
        sep = "n/a (n<2)"
        if len(diffs) >= 2:
            same = all(d > 0 for d in diffs) or all(d < 0 for d in diffs)
            sep = ("yes, " + ("worse" if m > 0 else "better")) if same and abs(m) > 2 * sd / math.sqrt(len(diffs)) \
                else "no"
        lm, ls = _mean_std(list(x["losses"].values()))
        rows.append(dict(label=run["label"], diff=m, sep=sep,
                         md=f"| {run['label']} | {run['name']} | {lm:.4f} ± {ls:.4f} | {m:+.4f} ± {sd:.4f} "
                            f"({len(diffs)}) | {', '.join(f'{d:+.4f}' for d in diffs)} | {sep} | "
                            f"{_sav_cell(res[L], run_slug(run), sw.lora_ranks)} |"))
    return rows


def _sav_cell(res_L, slug, lora_ranks):
    s = depth_savings(res_L, slug, lora_ranks)
    return _fmt_sav(s["savings"], s["how"]) if s else ""


def _plot_ablations(ax, sw, res):
    """Each seed's loss of full MoS and its ablations at the deepest depth (lines join one seed's points)."""
    L = sw.deep
    runs = res[L]["runs"]
    full = next(r for r in depth_grid(sw.models[L], sw.es, sw.lora_ranks) if r["label"] == "MoS"
                and r["e"] == sw.ablate_e)
    variants = [full] + depth_grid(sw.models[L], sw.es, sw.lora_ranks, ablate_e=sw.ablate_e)
    names = ["full MoS"] + [v["label"][4:] for v in variants[1:]]
    ax.set_title(f"L={L}, e={sw.ablate_e}: full MoS vs ablations (one line per seed)", fontsize=9)
    seeds = sorted({s for v in variants for s in runs[run_slug(v)]["losses"]})
    if not any(runs[run_slug(v)]["losses"] for v in variants[1:]):
        ax.text(0.5, 0.5, "ablations not run yet", ha="center", va="center", transform=ax.transAxes, color="grey")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    for s in seeds:
        ys = [runs[run_slug(v)]["losses"].get(s, float("nan")) for v in variants]
        ax.plot(range(len(variants)), ys, "o-", alpha=0.8, label=f"seed {s}")
    lora_e = runs.get(f"lora_r{sw.ablate_e}")
    if lora_e and lora_e["losses"]:
        ax.axhline(statistics.mean(lora_e["losses"].values()), color="C0", ls="--", lw=0.8,
                   label=f"LoRA r={sw.ablate_e} (same params), seed mean")
    ax.set_xticks(range(len(variants)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("held-out loss (nats/byte)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def plot_depth(sw, res, sav_plot, path):
    plt = pyplot()
    if plt is None:
        return False
    import matplotlib.ticker
    n = 1 + len(sw.depths) + (1 if sw.ablate_e else 0)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    axes = [ax for row in axes for ax in row]
    ax = axes[0]
    for i, e in enumerate(sorted(sav_plot)):
        pts = sorted(sav_plot[e], key=lambda t: t[0])
        dx = 1.0 + 0.025 * (i - (len(sav_plot) - 1) / 2)  # the e's side by side, not on top of each other
        xs = [L * dx for L, _ in pts]
        ys = [s["savings"] for _, s in pts]
        err = [_mean_std([v for v, _ in s["per_seed"].values()])[1] for _, s in pts]
        ax.errorbar(xs, ys, yerr=err, fmt="o-", color=f"C{i}", capsize=3, label=f"MoS e={e}")
        bounds = [(L, s["savings"]) for L, s in pts if s["how"] != "interp"]
        if bounds:  # outside LoRA's range: only a bound, drawn hollow
            ax.plot([b[0] * dx for b in bounds], [b[1] for b in bounds], "o", mfc="white", color=f"C{i}", zorder=3)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sw.depths)
    ax.set_xticklabels([str(L) for L in sw.depths])
    ax.set_xlabel("layers L")
    ax.set_ylabel("savings factor vs LoRA (bar: seed std; hollow: bound)")
    ax.set_title(f"MoS parameter saving vs depth (hidden {sw.recipe['hidden']})", fontsize=9)
    ax.grid(True, alpha=0.3)
    if sav_plot:
        ax.legend(fontsize=8)
    styles = {"LoRA": ("o-", "C0", 1.0), "MoS": ("s-", "C3", 1.0), "MiSS": ("^-", "C2", 1.0),
              "MoS l=1": ("v", "C1", 0.93), "MoS p=0": ("D", "C4", 1.07), "MoS tied": ("X", "C5", 1.14)}
    for ax, L in zip(axes[1:], sw.depths):
        if not any(x["losses"] for x in res[L]["runs"].values()):
            ax.set_title(f"L={L}", fontsize=9)
            ax.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for label, (fmt, color, dx) in styles.items():
            pts = sorted(((x["params"], _mean_std(list(x["losses"].values()))) for x in res[L]["runs"].values()
                          if x["run"]["label"] == label and x["losses"]), key=lambda t: t[0])
            if not pts:
                continue
            ax.errorbar([p * dx for p, _ in pts], [ms[0] for _, ms in pts], yerr=[ms[1] for _, ms in pts], fmt=fmt,
                        color=color, capsize=2, markersize=5, label=label + (" (offset)" if dx != 1.0 else ""))
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels collide
        base = res[L]["base"]
        ax.set_title(f"L={L}" + (f" (base {base['loss_test']:.3f})" if base else ""), fontsize=9)
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("held-out loss (nats/byte)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if sw.ablate_e:
        _plot_ablations(axes[1 + len(sw.depths)], sw, res)
    for ax in axes[n:]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="reduced size for the CPU (default)")
    g.add_argument("--full", action="store_true", help="full size (meant for a GPU)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--domain", choices=("tests", "docs"), default="tests")
    ap.add_argument("--seeds", type=int, default=None, help="fine-tuning seeds (default: 2 quick, 3 full)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--cache", default=os.path.join(REPO, "benchmarks", "out", "quality"),
                    help="where the pretrained base is cached")
    ap.add_argument("--out", default=os.path.join(HERE, "out"))
    ap.add_argument("--lr-sweep", action="store_true",
                    help="instead of the grid: sweep the lr of one config per family on the validation split")
    ap.add_argument("--replot", metavar="JSON", help="only rebuild the table, PNG and results file from a saved "
                    "out/quality_<mode>.json")
    ap.add_argument("--ablate-e", type=int, default=2, help="budget e of the MoS ablations (0: none)")
    ap.add_argument("--pretrain-steps", type=int, default=None)
    ap.add_argument("--finetune-steps", type=int, default=None)
    sz = ap.add_argument_group("model size (override the mode's; with --depth-sweep: per depth, default hidden 64)")
    sz.add_argument("--layers", type=int, default=None)
    sz.add_argument("--hidden", type=int, default=None)
    sz.add_argument("--inter", type=int, default=None, help="intermediate size (default: hidden x 2.75, multiple of 4)")
    sz.add_argument("--heads", type=int, default=None)
    sz.add_argument("--seq", type=int, default=None)
    sz.add_argument("--batch", type=int, default=None)
    sz.add_argument("--pretrain-lr", type=float, default=None)
    sz.add_argument("--eval-windows", type=int, default=None)
    dp = ap.add_argument_group("depth sweep")
    dp.add_argument("--depth-sweep", action="store_true", help="sweep the number of layers (resumable; see README)")
    dp.add_argument("--depths", default="6,12,24,32")
    dp.add_argument("--deep-seeds", type=int, default=3, help="seeds at the deepest depth (default 3)")
    dp.add_argument("--es", default="1,2,4", help="MoS equivalent ranks")
    dp.add_argument("--lora-ranks", default="1,2,4,8,16,32")
    dp.add_argument("--report-only", action="store_true", help="only rebuild the report from the finished runs")
    dp.add_argument("--max-runs", type=int, default=None, help="stop after training this many runs")
    dp.add_argument("--depth-out", default=DEPTH_DIR, help="where run JSONs (and bases/) go")
    dp.add_argument("--report-dir", default=HERE, help="where results_depth.md and quality_depth.png go")
    a = ap.parse_args(argv)
    if a.depth_sweep or a.report_only:
        if a.quick or a.full or a.lr_sweep or a.replot:
            ap.error("--depth-sweep does not combine with --quick/--full/--lr-sweep/--replot")
        if a.layers is not None:
            ap.error("--depth-sweep takes --depths, not --layers")
        torch.set_num_threads(a.threads)
        depth_sweep(a, torch.device(a.device))
        return
    if a.replot:
        with open(a.replot) as f:
            data = json.load(f)
        write_report(data, os.path.dirname(os.path.abspath(a.replot)))
        return
    mode = "full" if a.full else "quick"
    m = dict(MODES[mode])
    if a.pretrain_steps is not None:
        m["pretrain_steps"] = a.pretrain_steps
    if a.finetune_steps is not None:
        m["finetune_steps"] = a.finetune_steps
    sizes = dict(layers=a.layers, hidden=a.hidden, inter=a.inter, heads=a.heads, seq=a.seq, batch=a.batch,
                 pretrain_lr=a.pretrain_lr, eval_windows=a.eval_windows)
    sizes = {k: v for k, v in sizes.items() if v is not None and v != m[k]}
    if sizes:  # another model than the mode's: its own base and its own output files
        m.update(sizes)
        mode = mode + "".join(f"_{k}{v:g}" for k, v in sizes.items())
    seeds = list(range(a.seeds if a.seeds is not None else m["seeds"]))
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    command = "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), REPO)] + sys.argv[1:])
    t_start = time.perf_counter()

    data, desc = load_corpus(a.domain)
    print(f"corpus: Python {desc['python']} stdlib, pretrain {desc['pretrain_bytes']:,} bytes "
          f"({desc['pretrain_files']} files); fine-tune domain '{a.domain}': train {desc['train_bytes']:,} / "
          f"val {desc['val_bytes']:,} / test {desc['test_bytes']:,} bytes", flush=True)
    base, base_path, pretrain_s = pretrained_base(m, data, desc, device, a.cache)
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    streams = {"train": to_tensor(data["train"])}
    for k in ("val", "test"):
        streams[k] = eval_windows(to_tensor(data[k]), m["eval_windows"], m["seq"])
    base_losses = {k: evaluate(base, streams[k], device) for k in ("val", "test")}
    pre_loss = evaluate(base, eval_windows(to_tensor(data["pretrain"]), m["eval_windows"], m["seq"]), device)
    del base
    print(f"base model: loss on the pretraining domain {pre_loss:.4f}, on the fine-tune domain "
          f"(held-out test) {base_losses['test']:.4f} nats/byte", flush=True)
    os.makedirs(a.out, exist_ok=True)

    if a.lr_sweep:
        runs = [r for r in grid(m) if r["label"] == "LoRA" and r["r"] == 2]
        runs += [r for r in grid(m) if r["label"] == "MoS" and r.get("e") == 2]
        runs += [r for r in grid(m) if r["label"] == "MiSS" and "e=2" in r["name"]]
        out = []
        for run in runs:
            for lr in SWEEP_LRS:
                res = finetune(run, 0, lr, base_sd, m, streams, device, eval_split="val")
                out.append(dict(family=run["family"], name=run["name"], lr=lr, **res))
                print(f"  sweep {run['label']:5s} {run['name']:22s} lr {lr:g}: val loss {res['loss']:.4f} "
                      f"({res['seconds']:.0f}s)", flush=True)
        best = {}
        for r in out:
            if r["family"] not in best or r["loss"] < best[r["family"]]["loss"]:
                best[r["family"]] = r
        print("best lr per family:", {k: v["lr"] for k, v in best.items()}, flush=True)
        with open(os.path.join(a.out, f"lr_sweep_{mode}.json"), "w") as f:
            json.dump(dict(date=time.strftime("%Y-%m-%d"), command=command, machine=machine(), model=m,
                           corpus=desc, split="val", seed=0, results=out,
                           best={k: v["lr"] for k, v in best.items()},
                           wall_s=round(time.perf_counter() - t_start, 1)), f, indent=1)
        return

    runs = grid(m, ablate_e=a.ablate_e)
    for i, run in enumerate(runs):
        run["id"] = i
    total = len(runs) * len(seeds)
    results = []
    k = 0
    for seed in seeds:
        for run in runs:
            k += 1
            lr = LRS[run["family"]]
            res = finetune(run, seed, lr, base_sd, m, streams, device)
            results.append(dict(run=run["id"], seed=seed, lr=lr, **res))
            el = time.perf_counter() - t_start
            print(f"[{k:2d}/{total}] {run['label']:8s} {run['name']:24s} seed {seed}: {res['params']:>9,} params  "
                  f"held-out loss {res['loss']:.4f}  ({res['seconds']:.0f}s, elapsed {el / 60:.1f} min)", flush=True)

    wall = time.perf_counter() - t_start
    meta = dict(date=time.strftime("%Y-%m-%d %H:%M %Z"), command=command, machine=machine(), device=str(device),
                load_average_at_end=[round(x, 2) for x in os.getloadavg()],
                python=platform.python_version(), torch=torch.__version__, mode=mode, model=m, seeds=seeds,
                domain=a.domain, eval_windows=int(streams["test"].shape[0]),
                lrs=LRS, lora_alpha="2*r (scale 2) for LoRA and MoS; MiSS scale 1", dropout=0.0,
                optimizer="AdamW(betas=(0.9, 0.98), wd=0), 5% warmup + cosine to 0.1x, clip 1.0",
                corpus=desc, base_checkpoint=os.path.relpath(base_path, REPO), pretrain_seconds=round(pretrain_s, 1),
                base_loss=dict(pretrain_domain=pre_loss, **base_losses), wall_s=round(wall, 1))
    write_report(dict(meta=meta, runs=runs, results=results), a.out)


def write_report(data, out_dir):
    """Summary, table, PNG, ``results_<mode>.md`` and ``out/quality_<mode>.json`` from one run's raw data."""
    meta, runs, results = data["meta"], data["runs"], data["results"]
    mode, m, seeds = meta["mode"], meta["model"], meta["seeds"]
    rows = summarize(results, runs)
    base_test = meta["base_loss"]["test"]
    tab = table(rows, base_test)
    print("\n" + tab + "\n", flush=True)
    png = os.path.join(HERE, f"quality_{mode}.png")
    title = (f"{m['layers']}x{m['hidden']} byte-level Llama pretrained on stdlib code, fine-tuned on "
             f"'{meta['domain']}'\n({m['finetune_steps']} steps, {len(seeds)} seeds; base model without adapter: "
             f"{base_test:.3f})")
    have_png = plot(rows, png, title)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"quality_{mode}.json"), "w") as f:
        json.dump(dict(meta=meta, runs=runs, results=results, summary=rows), f, indent=1)
    desc, wall, pre_s = meta["corpus"], meta["wall_s"], meta["pretrain_seconds"]
    md = [f"# Quality experiment ({mode}): held-out loss vs trainable parameters", "",
          "Generated by `benchmarks/quality/run.py`; see `README.md` for the method and the reading.", "",
          f"- date: {meta['date']}",
          f"- machine: {meta['machine']} (device `{meta['device']}`)"
          + (f"; load average at the end {meta['load_average_at_end']}" if "load_average_at_end" in meta else ""),
          f"- command: `{meta['command']}`",
          f"- wall time: {wall / 60:.1f} min (pretraining {pre_s / 60:.1f} min"
          f"{'' if pre_s else ', base loaded from cache'})",
          f"- Python {desc['python']} stdlib, torch {meta['torch']}; corpus sha256 prefixes {desc['sha256']}",
          f"- model: Llama {m['layers']} layers, hidden {m['hidden']}, intermediate {m['inter']}, {m['heads']} heads, "
          f"byte vocabulary; pretrained {m['pretrain_steps']} steps x {m['batch']} x {m['seq']} bytes",
          f"- fine-tuning: domain `{meta['domain']}`, {m['finetune_steps']} steps x {m['batch']} x {m['seq']} bytes, "
          f"seeds {seeds}, lr {meta['lrs']}, lora_alpha = 2r, all 7 projections; held-out = {meta['eval_windows']} "
          f"windows of {m['seq']} bytes from test-split files",
          f"- base model loss: pretraining domain {meta['base_loss']['pretrain_domain']:.4f}, fine-tune domain "
          f"(held-out) {base_test:.4f} nats/byte", "",
          tab, "",
          "Savings factor = (LoRA parameters needed to reach the method's mean held-out loss, interpolated on "
          "LoRA's loss-vs-log(params) curve) / (the method's parameters). `< x`: the method is worse than LoRA "
          "r=1, so the factor is at most x; `> x`: better than LoRA r=32, so at least x.", ""]
    if have_png:
        md += [f"![loss vs trainable parameters](quality_{mode}.png)", ""]
    with open(os.path.join(HERE, f"results_{mode}.md"), "w") as f:
        f.write("\n".join(md))
    print(f"wrote {os.path.join(out_dir, f'quality_{mode}.json')}, results_{mode}.md"
          f"{', quality_' + mode + '.png' if have_png else ''}; wall {wall / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
