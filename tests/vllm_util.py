"""Helpers for the vLLM tests and benchmark: a tiny Llama + tokenizer saved locally (no hub), adapters
written through the PEFT API, a vLLM server process started by PID and always stopped."""
from __future__ import annotations

import copy
import json
import os
import sys
import signal
import socket
import subprocess
import time

import torch

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEXT = ("the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
        "all that glitters is not gold. to be or not to be, that is the question. ") * 40


def vllm_python():
    """The vLLM virtual environment's python: $MOS_EXT_VLLM_PYTHON or /work/venv-vllm/bin/python; None if absent."""
    env = os.environ.get("MOS_EXT_VLLM_PYTHON")
    if env:  # named explicitly (CI): a broken environment is an error, not a skip
        if not (os.path.isfile(env) and os.access(env, os.X_OK)):
            raise FileNotFoundError(f"MOS_EXT_VLLM_PYTHON={env} is not an executable python")
        return env
    p = "/work/venv-vllm/bin/python"
    return p if os.path.isfile(p) and os.access(p, os.X_OK) else None


def bench_vllm_python():
    """vllm_python() for the benchmarks: exits with what to set when there is no vLLM environment."""
    py = vllm_python()
    if py is None:
        sys.exit("no vLLM environment: set MOS_EXT_VLLM_PYTHON to a python with vllm and mos_ext (see .ci/run)")
    return py


def llama_config(hidden=256, layers=4, inter=512, vocab=512, heads=4, kv_heads=2):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, torch_dtype="float32")


def base_model(cfg, seed=0):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def save_base(out_dir, cfg, seed=0):
    """Tiny fp32 Llama + byte-level BPE tokenizer trained on TEXT, saved as an HF model directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    os.makedirs(out_dir, exist_ok=True)
    m = base_model(cfg, seed)
    m.generation_config.do_sample = False
    m.save_pretrained(out_dir, safe_serialization=True)
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=cfg.vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(out_dir)
    return m


def write_mos_adapter(base_cfg, cfg, out_dir, seed, safe=True):
    """A MoS/MiSS/LoRA-as-shards adapter made with peft.get_peft_model(..., MoSConfig) and random B pools
    (as if trained), saved with save_pretrained (``safe=False``: PEFT's pickled adapter_model.bin).
    Returns the PeftModel."""
    import peft

    import mos_ext  # noqa: F401

    pm = peft.get_peft_model(base_model(base_cfg), copy.deepcopy(cfg))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in pm.base_model.pools("default").items():
            if k.startswith("mos_B_") or (cfg.method in ("miss", "miss_mini") and k.startswith("mos_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    pm.save_pretrained(out_dir, safe_serialization=safe)
    return pm.eval()


def write_uneven_adapter(base_cfg, out_dir, seed=60):
    """A MoS adapter on gate_proj (r=32, e=12, l=8) whose B tables use their first four slots as drawn
    (~300 distinct pool rows) and only row 0 in the last four: at TP 2 (B cut by output) rank 0's share
    needs ~630 store rows of gate_proj B and rank 1's 2, so with the test servers' 1.5 MiB store and
    --max-loras 2 (534 rows per adapter per rank at TP 2) rank 0 refuses it and rank 1 would not.
    It fits at TP 1 (~310 of 384)."""
    from safetensors.torch import load_file, save_file

    from mos_ext import MoSConfig

    write_mos_adapter(base_cfg, MoSConfig(r=32, equivalent_rank=12, shards_per_vector=8, private_rank=0,
                                          lora_alpha=32, target_modules=["gate_proj"], seed=7), out_dir, seed=seed)
    f = os.path.join(out_dir, "adapter_model.safetensors")
    t = load_file(f)
    for k in t:
        if k.endswith("gate_proj.mos_idx_b"):
            t[k][..., 4:] = 0
    save_file(t, f, metadata={"format": "pt"})


def write_peft_lora(base_cfg, out_dir, seed, r=8, targets=ALL7, alpha=16):
    import peft

    pm = peft.get_peft_model(base_model(base_cfg), peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    pm.save_pretrained(out_dir)
    return pm.eval()


@torch.no_grad()
def greedy(forward, ids, n):
    """Greedy continuation of ``ids`` [B, T] for ``n`` tokens by full recomputation (argmax of fp32 logits)."""
    out = ids
    for _ in range(n):
        nxt = forward(out)[:, -1].argmax(-1, keepdim=True)
        out = torch.cat([out, nxt], dim=1)
    return out[:, ids.shape[1]:]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m vllm.entrypoints.openai.api_server`` in its own process group; ``stop()`` kills it by PID."""

    def __init__(self, python, model_dir, lora_modules=(), *, max_loras=2, max_lora_rank=16, max_cpu_loras=None,
                 env=None, log_path=None, extra=()):
        self.port = free_port()
        cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", "127.0.0.1",
               "--port", str(self.port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "256",
               "--seed", "0", "--enable-lora", "--max-loras", str(max_loras), "--max-lora-rank", str(max_lora_rank),
               "--max-num-seqs", "32", "--served-model-name", "base"]
        if max_cpu_loras:
            cmd += ["--max-cpu-loras", str(max_cpu_loras)]
        if lora_modules:
            cmd += ["--lora-modules"] + [f"{n}={p}" for n, p in lora_modules]
        cmd += list(extra)
        e = dict(os.environ)
        e.update({"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                  "TOKENIZERS_PARALLELISM": "false", "VLLM_LOGGING_LEVEL": "INFO", "HF_HUB_OFFLINE": "1",
                  "PYTHONPATH": os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                                               + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))})
        e.update(env or {})
        self.log_path = log_path or f"/tmp/mos_vllm_{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=e, start_new_session=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout=240):
        import urllib.request

        t0 = time.time()
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"vLLM server exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return time.time() - t0
            except OSError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"vLLM server not ready in {timeout}s:\n{self.tail()}")

    def tail(self, n=60):
        self.log.flush()
        try:
            with open(self.log_path) as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=20)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=10)
        self.log.close()

    def post(self, route, body):
        """(status, parsed JSON or text) of a POST."""
        import urllib.error
        import urllib.request

        req = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=120) as r:
                raw = r.read().decode()
                status = r.status
        except urllib.error.HTTPError as e:
            raw, status = e.read().decode(), e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw


# ------------------------------------------------------------------ many tenants, and load under fire
def write_bad_adapters(cfg, root, mos_cfg):
    """Adapters a server with a 1.5 MiB store, max rank 32 and --max-loras 2 must refuse, {kind: dir}:
    corrupt (truncated safetensors), mismatch (saved for hidden 128), rank (PEFT LoRA r=64), size (r=32 on all
    7 projections: 2 MiB of pools), share (r=16: fits alone, not in a 1/max_loras share), dora (use_dora)."""
    bad = {k: os.path.join(root, k) for k in ("corrupt", "mismatch", "rank", "size", "share", "dora")}
    write_mos_adapter(cfg, mos_cfg, bad["corrupt"], seed=30)
    with open(os.path.join(bad["corrupt"], "adapter_model.safetensors"), "r+b") as f:
        f.truncate(100)
    write_mos_adapter(llama_config(hidden=128, inter=256), mos_cfg, bad["mismatch"], seed=31)
    write_peft_lora(cfg, bad["rank"], seed=32, r=64)
    write_peft_lora(cfg, bad["size"], seed=33, r=32)
    write_peft_lora(cfg, bad["share"], seed=35, r=16)
    write_peft_lora(cfg, bad["dora"], seed=34, r=4)
    meta_path = os.path.join(bad["dora"], "adapter_config.json")
    meta = json.load(open(meta_path))
    meta["use_dora"] = True
    json.dump(meta, open(meta_path, "w"))
    return bad


def write_tenants(base_cfg, root, n, kinds, seed=0):
    """``n`` adapter directories under ``root`` (``t0`` ... ``t{n-1}``), tenant i of kind ``kinds[i % len]``: a
    MoSConfig (MoS / MiSS / LoRA-as-shards, saved with save_pretrained) or ``("peft_lora", r)``. One PEFT model
    per kind; each tenant gets its own random B pools / lora_B (as if trained). Returns {name: dir}."""
    import peft

    import mos_ext  # noqa: F401

    models = {}
    for k, kind in enumerate(kinds):
        if isinstance(kind, tuple) and kind[0] == "peft_lora":
            models[k] = peft.get_peft_model(base_model(base_cfg), peft.LoraConfig(r=kind[1], lora_alpha=16,
                                                                                   target_modules=ALL7))
        else:
            models[k] = peft.get_peft_model(base_model(base_cfg), copy.deepcopy(kind))
    out = {}
    for i in range(n):
        k = i % len(kinds)
        pm, kind = models[k], kinds[k]
        g = torch.Generator().manual_seed(seed * 100003 + i)
        with torch.no_grad():
            if isinstance(kind, tuple):
                for nm, p in pm.named_parameters():
                    if "lora_B" in nm:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            else:
                for key, p in pm.base_model.pools("default").items():
                    if key.startswith("mos_B_") or (kind.method in ("miss", "miss_mini") and key.startswith("mos_B")):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        d = os.path.join(root, f"t{i}")
        pm.save_pretrained(d)
        out[f"t{i}"] = d
    return out


def reference_tokens(base_dir, dirs, prompts, n_new, max_rank, batch=32):
    """{(name, prompt index): greedy tokens} of every adapter in ``dirs`` ({name: dir}) from MultiTenantModel
    (an AdapterStore + sgmv on the HF model, fp32), the tenants of one prompt batched together."""
    from transformers import LlamaForCausalLM

    from mos_ext.serving import AdapterStore, MultiTenantModel

    names = list(dirs)
    out = {}
    for c in range(0, len(names), batch):
        chunk = names[c:c + batch]  # MultiTenantModel wraps the model's layers: a fresh model per store
        model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
        store = AdapterStore(model, capacity_bytes=1 << 27, max_tenants=len(chunk), max_rank=max_rank)
        for nm in chunk:
            store.load(nm, dirs[nm])
        served = MultiTenantModel(model, store)
        for i, p in enumerate(prompts):
            ids = torch.tensor([p] * len(chunk))
            toks = greedy(lambda x: served(input_ids=x, adapter_names=chunk).logits, ids, n_new)
            for j, nm in enumerate(chunk):
                out[(nm, i)] = toks[j].tolist()
    return out


def store_lines(log_text, what=""):
    """The plugin's memory-accounting log lines (one per load / unload / eviction, per worker) whose event
    starts with ``what``: [(rank, resident, used, free, pool bytes, evictions, host copies)]."""
    import re

    pat = re.compile(r"mos_ext store(?: \(TP rank (\d+)/\d+\))?: " + re.escape(what) + r"[^;]*; resident=(\d+) "
                     r"used_bytes=(\d+) free_bytes=(\d+) pool_bytes=(\d+) tables=\d+ table_bytes=\d+ evictions=(\d+) "
                     r"host_copies=(\d+)")
    return [(int(m.group(1) or 0),) + tuple(int(g) for g in m.groups()[1:]) for m in pat.finditer(log_text)]


def process_tree(pid):
    """PIDs of ``pid`` and all its descendants (from /proc): the API server, engine core, workers."""
    kids = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        if p not in out:
            out.add(p)
            todo += kids.get(p, [])
    return out


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def load_under_fire(srv, tenants, expected, prompts, bad, *, n_new, requests, concurrency=8, churn=(),
                    min_rounds=1, base_share=0.1, seed=0, log=print):
    """Requests in flight while adapters load, unload, reload and fail to load, all at once, against ``srv``.

    ``tenants`` {name: dir}: loaded over HTTP while traffic for the tenants already loaded runs; ``churn``
    (names among them): unloaded and loaded again from the same directory (alternately with
    ``load_inplace``) over and over; ``bad`` [(label, dir, [words])]: loads that must be refused with a 4xx
    whose message holds every word. ``requests`` completions (``base_share`` of them for the base model),
    ``concurrency`` in flight, each tenant's greedy tokens compared with ``expected[(name, prompt index)]``.
    Runs until the requests are done, every tenant is loaded and every churn / bad action ran ``min_rounds``
    times; then every tenant is requested once more. /health is polled throughout; the server's process
    tree (API server, engine core, workers) must keep its PIDs. Returns a report dict (``problems`` lists
    every failure; empty when all held)."""
    import random
    import threading
    import urllib.request

    rng = random.Random(seed)
    pids0 = process_tree(srv.proc.pid)
    log0 = len(srv.tail(10 ** 7))  # evictions are counted from here
    names = list(tenants)
    churn = [c for c in churn if c in tenants]
    loaded = []  # tenants loaded so far, in load order
    lock = threading.Lock()
    done = threading.Event()
    problems, lat, served = [], [], [0]
    rep = dict(unload_404=0, loads=0, unloads=0, reloads=0, inplace_reloads=0, refusals={}, health_checks=0,
               health_failures=0)

    def problem(msg):
        with lock:
            problems.append(msg)
        log("PROBLEM: " + msg)

    def complete(name, i):
        body = {"model": name, "prompt": [prompts[i]], "max_tokens": n_new, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}
        t = time.perf_counter()
        st, out = srv.post("/v1/completions", body)
        return st, out, time.perf_counter() - t

    def traffic(k):
        r = random.Random(seed * 7919 + k)
        while True:
            with lock:
                if served[0] + rep["unload_404"] >= requests and done.is_set():
                    return
                pool = list(loaded)
            name = "base" if (not pool or r.random() < base_share) else r.choice(pool)
            i = r.randrange(len(prompts))
            st, out, dt = complete(name, i)
            if st == 200:
                got = list(out["choices"][0]["token_ids"])
                want = expected[("base" if name == "base" else name, i)]
                with lock:
                    served[0] += 1
                    lat.append(dt)
                if got != want:
                    problem(f"{name} prompt {i}: got {got}, want {want}")
            elif st == 404 and name in churn:
                with lock:
                    rep["unload_404"] += 1  # unloaded in the meantime: vLLM's 404 for an unknown name
            else:
                problem(f"request for {name}: HTTP {st}: {str(out)[:300]}")

    def loader():
        for nm in names:
            st, out = srv.post("/v1/load_lora_adapter", {"lora_name": nm, "lora_path": tenants[nm]})
            if st != 200:
                problem(f"load {nm}: HTTP {st}: {str(out)[:300]}")
                continue
            with lock:
                loaded.append(nm)
                rep["loads"] += 1

    def churner():
        rounds = 0
        while not churn or not done.is_set() or rounds < min_rounds:
            if not churn:
                return
            with lock:
                ready = [c for c in churn if c in loaded]
            if not ready:
                time.sleep(0.2)
                continue
            nm = rng.choice(ready)
            if rounds % 2:
                st, out = srv.post("/v1/load_lora_adapter", {"lora_name": nm, "lora_path": tenants[nm],
                                                             "load_inplace": True})
                key = "inplace_reloads"
            else:
                st, out = srv.post("/v1/unload_lora_adapter", {"lora_name": nm})
                if st != 200:
                    problem(f"unload {nm}: HTTP {st}: {str(out)[:300]}")
                with lock:
                    rep["unloads"] += 1
                time.sleep(0.3)  # requests for it meanwhile are 404s
                st, out = srv.post("/v1/load_lora_adapter", {"lora_name": nm, "lora_path": tenants[nm]})
                key = "reloads"
            if st != 200:
                problem(f"{key} {nm}: HTTP {st}: {str(out)[:300]}")
            with lock:
                rep[key] += 1
            rounds += 1
            time.sleep(0.2)

    def refuser():
        rounds = 0
        if not bad:
            return
        while not done.is_set() or rounds < min_rounds:
            for label, d, words in bad:
                st, out = srv.post("/v1/load_lora_adapter", {"lora_name": f"bad_{label}_{rounds}", "lora_path": d})
                msg = out.get("error", {}).get("message", "") if isinstance(out, dict) else str(out)
                with lock:
                    rep["refusals"].setdefault(label, []).append(st)
                if not 400 <= st < 500:
                    problem(f"bad adapter {label}: HTTP {st} (want 4xx): {msg[:300]}")
                elif not all(w in msg for w in words) or "lora_int_id" in msg:
                    problem(f"bad adapter {label}: HTTP {st}, message lacks {words}: {msg[:300]}")
                if rounds == 0:
                    rep.setdefault("refusal_messages", {})[label] = f"{st}: {msg[:400]}"
            rounds += 1
            time.sleep(0.5)

    def health():
        while not done.is_set() or rep["health_checks"] == 0:
            ok = False
            try:
                with urllib.request.urlopen(srv.url + "/health", timeout=10) as r:
                    ok = r.status == 200
            except OSError as e:
                problem(f"/health: {e}")
            with lock:
                rep["health_checks"] += 1
                rep["health_failures"] += int(not ok)
            time.sleep(0.5)

    t0 = time.time()
    side = [threading.Thread(target=f, daemon=True) for f in (loader, churner, refuser, health)]
    runners = [threading.Thread(target=traffic, args=(k,), daemon=True) for k in range(concurrency)]
    for t in side + runners:
        t.start()
    side[0].join()  # every tenant loaded
    while True:
        with lock:
            if served[0] + rep["unload_404"] >= requests:
                break
        time.sleep(0.2)
    done.set()
    for t in side[1:] + runners:
        t.join(timeout=600)
        if t.is_alive():
            problem(f"{t.name} did not finish")
    wall = time.time() - t0
    # afterwards every tenant still serves its own tokens (the churned ones reloaded)
    import concurrent.futures as cf

    with cf.ThreadPoolExecutor(concurrency) as ex:
        futs = {ex.submit(complete, nm, 0): nm for nm in names}
        for f in cf.as_completed(futs):
            st, out, _ = f.result()
            if st != 200 or list(out["choices"][0]["token_ids"]) != expected[(futs[f], 0)]:
                problem(f"after the storm, {futs[f]}: HTTP {st}: {str(out)[:200]}")
    pids1 = process_tree(srv.proc.pid)
    if srv.proc.poll() is not None:
        problem(f"server exited with {srv.proc.returncode}")
    if pids1 != pids0:
        problem(f"server processes changed: {sorted(pids0)} -> {sorted(pids1)}")
    text = srv.tail(10 ** 7)
    ev, before = {}, {}
    for rk, *_rest, evictions, _h in store_lines(text[:log0]):
        before[rk] = evictions
    for rk, *_rest, evictions, _h in store_lines(text[log0:]):
        ev[rk] = max(ev.get(rk, 0), evictions - before.get(rk, 0))
    rep.update(tenants=len(names), requests_served=served[0],
               refusals_total=sum(len(v) for v in rep["refusals"].values()),
               p50_s=percentile(lat, 0.5), p99_s=percentile(lat, 0.99), wall_s=wall,
               evictions_by_rank=ev, pids=sorted(pids0), problems=problems,
               tokens_per_s=served[0] * n_new / wall if wall else 0.0)
    return rep
