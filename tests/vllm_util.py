"""Helpers for the vLLM tests and benchmark: a tiny Llama + tokenizer saved locally (no hub), adapters
written through the PEFT API, a vLLM server process started by PID and always stopped."""
from __future__ import annotations

import copy
import json
import os
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
