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
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the PNG (pip install matplotlib)", flush=True)
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


# ----------------------------------------------------------------------------- main


def main():
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
    a = ap.parse_args()
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
