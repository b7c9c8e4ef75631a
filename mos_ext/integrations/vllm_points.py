"""The vLLM versions the plugin (:mod:`mos_ext.integrations.vllm`) supports, and the vLLM-internal
places it patches, as data, with a checker that reads a vLLM source tree (never imports it).

vLLM offers no public hook for what the plugin changes, so every patch point is an internal method
whose signature can move between releases. :func:`check_source` reads a vLLM package directory (an
installed one, or the ``vllm/`` tree of a wheel unpacked without its dependencies, e.g. the GPU
wheel on a machine that cannot run it) and reports every patch point that is missing or whose
parameters differ from what the plugin's replacement takes, plus every LoRA layer that calls the
punica kernels from a method the plugin does not hook (a new path that would bypass the store and
serve the base model's output for MoS tenants, silently). ``tools/check_vllm_patch_points.py``
runs it in CI against every supported version's own source.
"""
from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

# vLLM minor versions the plugin was written and checked against (checked in CI against each one's source)
SUPPORTED = ("0.32.", "0.34.")
# the newest patch release of each that CI reads
CHECKED = {"0.32.": "0.32.0", "0.34.": "0.34.0"}


def supported(version: str) -> bool:
    return any(str(version).startswith(p) for p in SUPPORTED)


@dataclass(frozen=True)
class PatchPoint:
    """A method the plugin replaces (or calls): file under ``vllm/``, class, method, its parameters
    (names in order, ``*`` marks keyword-only from there), async or not, and why the plugin needs it."""

    file: str
    cls: str  # "" for a module-level function
    method: str
    params: Tuple[str, ...]
    is_async: bool
    why: str
    called: bool = False  # called, not replaced: later parameters may be added if they have defaults


POINTS: Tuple[PatchPoint, ...] = (
    PatchPoint("lora/worker_manager.py", "WorkerLoRAManager", "_load_adapter", ("self", "lora_request"), False,
               "adapter directories mos_ext reads go to the worker's store"),
    PatchPoint("lora/worker_manager.py", "WorkerLoRAManager", "set_active_adapters", ("self", "requests", "mapping"),
               False, "TP > 1: a step's adapter loads are told apart from add_lora's (only those are agreed by the ranks)"),
    PatchPoint("lora/worker_manager.py", "WorkerLoRAManager", "remove_adapter", ("self", "adapter_id"), False,
               "an unloaded adapter's rows are freed in every worker's store"),
    PatchPoint("lora/model_manager.py", "LoRAModelManager", "set_adapter_mapping", ("self", "mapping"), False,
               "the step's token -> adapter mapping becomes sgmv segments"),
    PatchPoint("lora/layers/base_linear.py", "BaseLinearLayerWithLoRA", "_apply_lora_to_output",
               ("self", "x", "output"), False, "the adapter math of every linear layer (single-stream path)"),
    PatchPoint("lora/layers/base_linear.py", "BaseLinearLayerWithLoRA", "_apply_async_impl",
               ("self", "x", "bias"), False,
               "the adapter math of every linear layer on the dual-stream path (VLLM_LORA_ENABLE_DUAL_STREAM)"),
    PatchPoint("entrypoints/openai/models/serving.py", "OpenAIServingModels", "load_lora_adapter",
               ("self", "request", "base_model_name"), True, "a refused adapter answers 400 naming the problem"),
    PatchPoint("entrypoints/openai/models/serving.py", "OpenAIServingModels", "unload_lora_adapter",
               ("self", "request"), True, "/v1/unload_lora_adapter reaches the workers (engine_client.remove_lora)"),
    PatchPoint("v1/executor/multiproc_executor.py", "MultiprocExecutor", "collective_rpc",
               ("self", "method", "timeout", "args", "kwargs", "non_block", "unique_reply_rank",
                "kv_output_aggregator", "ec_output_aggregator"), False,
               "TP > 1: a failed call (a refused adapter) leaves no rank's answer queued for the next call "
               "(the wrapper swaps self.response_mqs, which the method reads)"),
    # called, not replaced
    PatchPoint("v1/engine/async_llm.py", "AsyncLLM", "remove_lora", ("self", "lora_id"), True,
               "the API server's engine client tells every worker to remove an adapter", True),
    PatchPoint("lora/lora_model.py", "LoRAModel", "__init__", ("self", "lora_model_id", "rank", "loras"), False,
               "the weightless placeholder handed to vLLM", True),
    PatchPoint("distributed/parallel_state.py", "", "get_tp_group", (), False,
               "TP > 1: the ranks agree on an adapter load (its .cpu_group) before any store changes", True),
    PatchPoint("lora/lora_weights.py", "LoRALayerWeights", "__init__",
               ("self", "module_name", "rank", "lora_alpha", "lora_a", "lora_b"), False,
               "the placeholder's one (unmatched) module entry", True),
)

# Methods of vllm/lora/layers/* that may call the punica wrapper. For linear layers: the two the
# plugin hooks (every served path passes one of them); the *WithShardedLoRA classes
# (--fully-sharded-loras), which the plugin refuses by name; and layers the store never serves
# (embeddings, logits, MoE, classification heads). A call anywhere else is a new path: CI fails.
PUNICA_CALLERS = {
    ("base_linear.py", "BaseLinearLayerWithLoRA._apply_lora_to_output"),
    ("base_linear.py", "BaseLinearLayerWithLoRA._apply_async_impl"),
    ("column_parallel_linear.py", "_mcp_apply"),  # used only by the *WithShardedLoRA classes' apply
    ("row_parallel_linear.py", "RowParallelLinearWithShardedLoRA.apply"),
    ("classifier.py", "*"), ("logits_processor.py", "*"), ("vocab_parallel_embedding.py", "*"),
    ("fused_moe.py", "*"),
    # 0.34: model-specific layers (DeepSeek V4, Step5); not in SERVED_CLASSES, so the plugin refuses them
    ("custom_layer.py", "DeepseekV4GroupedWoAWithLoRA.grouped_forward"),
}
# The linear LoRA classes the store serves (exact type names; any other adapted linear class, e.g.
# the *WithShardedLoRA ones of --fully-sharded-loras, is refused by name when an adapter loads).
# Column-parallel ones keep A whole and slice B by output; row-parallel ones slice A by input.
SERVED_CLASSES = {
    "ReplicatedLinearWithLoRA": ("replicated_linear.py", "replicated"),
    "ColumnParallelLinearWithLoRA": ("column_parallel_linear.py", "column"),
    "MergedColumnParallelLinearWithLoRA": ("column_parallel_linear.py", "column"),
    "QKVParallelLinearWithLoRA": ("column_parallel_linear.py", "column"),
    "MergedQKVParallelLinearWithLoRA": ("column_parallel_linear.py", "column"),
    "RowParallelLinearWithLoRA": ("row_parallel_linear.py", "row"),
}
# Methods of BaseLinearLayerWithLoRA whose bodies route to the hooked ones: apply -> _apply_sync or
# torch.ops.vllm.lora_linear_async (-> _apply_async_impl); _apply_sync / _apply_base_forward ->
# _apply_lora_to_output. CI checks each still calls what it is listed with.
ROUTES = {
    "apply": ("_apply_sync", "lora_linear_async"),
    "_apply_sync": ("_apply_lora_to_output",),
    "_apply_base_forward": ("_apply_lora_to_output",),
}
# subclasses of the linear LoRA layers that may override apply/forward (they call self.apply or the base's)
LINEAR_FILES = ("base_linear.py", "column_parallel_linear.py", "row_parallel_linear.py", "replicated_linear.py")


def _params(fn) -> Tuple[str, ...]:
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    elif a.kwonlyargs:
        names.append("*")
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return tuple(names)


def _classes(tree) -> Dict[str, ast.ClassDef]:
    return {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}


def _methods(cls: ast.ClassDef) -> Dict[str, ast.AST]:
    return {n.name: n for n in cls.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}


def _called_names(node) -> set:
    out = set()
    for n in ast.walk(node):
        if isinstance(n, ast.Call):
            f = n.func
            if isinstance(f, ast.Attribute):
                out.add(f.attr)
            elif isinstance(f, ast.Name):
                out.add(f.id)
    return out


def _parse(root: str, rel: str):
    path = os.path.join(root, rel)
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def _punica_callers(tree) -> List[str]:
    """Qualified names (Class.method or function) of the top-level defs that call ``*.punica_wrapper.*``."""
    out = []
    for node in tree.body:
        defs = []
        if isinstance(node, ast.ClassDef):
            defs = [(f"{node.name}.{m.name}", m) for m in node.body
                    if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            defs = [(node.name, node)]
        for name, fn in defs:
            for n in ast.walk(fn):
                if (isinstance(n, ast.Attribute) and isinstance(n.value, ast.Attribute)
                        and n.value.attr == "punica_wrapper"):
                    out.append(name)
                    break
    return out


def check_source(root: str, version: Optional[str] = None) -> List[str]:
    """Problems found in the vLLM package directory ``root`` (the folder holding ``lora/``,
    ``entrypoints/``, ...); an empty list when every patch point is where the plugin expects it."""
    problems: List[str] = []
    trees = {}

    def tree(rel):
        if rel not in trees:
            try:
                trees[rel] = _parse(root, rel)
            except (OSError, SyntaxError) as e:
                trees[rel] = None
                problems.append(f"vllm/{rel}: cannot read ({e})")
        return trees[rel]

    for p in POINTS:
        t = tree(p.file)
        if t is None:
            continue
        if p.cls:
            cls = _classes(t).get(p.cls)
            if cls is None:
                problems.append(f"vllm/{p.file}: class {p.cls} is gone (needed: {p.why})")
                continue
            fn = _methods(cls).get(p.method)
        else:  # a module-level function
            fn = next((n for n in t.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
                       and n.name == p.method), None)
        if fn is None:
            problems.append(f"vllm/{p.file}: {p.cls + '.' if p.cls else ''}{p.method} is gone (needed: {p.why})")
            continue
        got = _params(fn)
        if p.called and got[:len(p.params)] == p.params:
            extra = [g for g in got[len(p.params):] if not g.startswith("*")]
            if len(extra) <= len(fn.args.defaults) + len([d for d in fn.args.kw_defaults if d is not None]):
                got = p.params  # only parameters with defaults were added
        if got != p.params:
            problems.append(f"vllm/{p.file}: {p.cls}.{p.method}{got} != expected {p.params} (needed: {p.why})")
        if isinstance(fn, ast.AsyncFunctionDef) != p.is_async:
            problems.append(f"vllm/{p.file}: {p.cls}.{p.method} is {'' if not p.is_async else 'not '}async, "
                            f"the plugin expects {'async' if p.is_async else 'sync'}")
    # every path of a linear LoRA layer passes a hooked method
    t = tree("lora/layers/base_linear.py")
    if t is not None and "BaseLinearLayerWithLoRA" in _classes(t):
        meths = _methods(_classes(t)["BaseLinearLayerWithLoRA"])
        for m, callees in ROUTES.items():
            if m not in meths:
                problems.append(f"vllm/lora/layers/base_linear.py: BaseLinearLayerWithLoRA.{m} is gone")
                continue
            called = _called_names(meths[m])
            missing = [c for c in callees if c not in called]
            if missing:
                problems.append(f"vllm/lora/layers/base_linear.py: BaseLinearLayerWithLoRA.{m} no longer calls "
                                f"{missing}: a path may bypass the hooked methods")
        fns = {n.name: n for n in t.body if isinstance(n, ast.FunctionDef)}
        if "_apply_async_impl" not in _called_names(t):
            problems.append("vllm/lora/layers/base_linear.py: lora_linear_async no longer calls _apply_async_impl")
        elif "lora_linear_async" not in fns and not any(
                isinstance(n, ast.FunctionDef) and n.name == "lora_linear_async" for n in ast.walk(t)):
            problems.append("vllm/lora/layers/base_linear.py: lora_linear_async is gone")
    layers_dir = os.path.join(root, "lora", "layers")
    try:
        files = sorted(f for f in os.listdir(layers_dir) if f.endswith(".py"))
    except OSError as e:
        files = []
        problems.append(f"vllm/lora/layers: cannot list ({e})")
    for f in files:
        t = tree(f"lora/layers/{f}")
        if t is None:
            continue
        for name in _punica_callers(t):
            if (f, name) not in PUNICA_CALLERS and (f, "*") not in PUNICA_CALLERS:
                problems.append(f"vllm/lora/layers/{f}: {name} calls the punica wrapper, a path the plugin does "
                                f"not hook (MoS tenants would get the base model's output there)")
        if f in LINEAR_FILES:  # linear subclasses: apply/forward must route through self.apply or a hooked method
            for cname, cls in _classes(t).items():
                for m in ("_apply_sync", "_apply_lora_to_output", "_apply_async_impl"):
                    if m in _methods(cls) and cname != "BaseLinearLayerWithLoRA":
                        problems.append(f"vllm/lora/layers/{f}: {cname} overrides {m}: the plugin's hook on "
                                        f"BaseLinearLayerWithLoRA.{m} would not run for it")
    for cname, (f, _) in SERVED_CLASSES.items():
        t = tree(f"lora/layers/{f}")
        if t is None:
            continue
        cls = _classes(t).get(cname)
        if cls is None:
            problems.append(f"vllm/lora/layers/{f}: served class {cname} is gone")
            continue
        meths = _methods(cls)
        if "apply" in meths:  # an override must route to the base class's routes only
            called = _called_names(meths["apply"])
            if not called & {"apply", "_apply_sync", "_apply_base_forward"} or called & {"_mcp_apply"}:
                problems.append(f"vllm/lora/layers/{f}: {cname}.apply no longer routes through "
                                f"BaseLinearLayerWithLoRA.apply / _apply_sync / _apply_base_forward")
        if "forward" in meths and not {"apply", "_apply_base_forward"} & _called_names(meths["forward"]):
            problems.append(f"vllm/lora/layers/{f}: {cname}.forward no longer calls self.apply")
    if version is not None and not supported(version):
        problems.append(f"vLLM {version} is not in the plugin's supported versions {SUPPORTED}")
    return problems
