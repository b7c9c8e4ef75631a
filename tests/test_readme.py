"""The README's Python examples run as written: training (train with Trainer, save, reload, serve)
and many tenants trained in one batch (JointTrainer)."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("peft")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(marker, checks, tmp_path):
    """Runs the README's python block containing ``marker`` in ``tmp_path``, followed by ``checks``."""
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    ex = next(b for b in blocks if marker in b)
    script = tmp_path / "example.py"
    script.write_text(ex + "\n" + checks + "\nprint('README OK')\n")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "README OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]


def test_readme_training_example_runs(tmp_path):
    run_example("Trainer(model=model",
                "assert torch.equal(again.base_model.pools()['mos_B_q_proj'], model.base_model.pools()"
                "['mos_B_q_proj'])\nassert out.shape == (2, 12)", tmp_path)


def test_readme_joint_training_example_runs(tmp_path):
    run_example("JointTrainer(model=model",
                "assert {n: t.steps for n, t in trainer.joint.tenants.items()} == "
                "{'acme': 8, 'globex': 4, 'initech': 4, 'umbrella': 4}\n"
                "import os\nassert os.path.exists('acme_adapter/adapter_model.safetensors')\n"
                "assert os.path.isdir('joint_run/checkpoint-4/tenants/umbrella')", tmp_path)
