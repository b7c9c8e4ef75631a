"""The README's many-tenants Trainer example runs as written."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("peft")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_joint_training_example_runs(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    ex = next(b for b in blocks if "JointTrainer(model=model" in b)
    script = tmp_path / "example.py"
    script.write_text(ex + "\nassert {n: t.steps for n, t in trainer.joint.tenants.items()} == "
                           "{'acme': 8, 'globex': 4, 'initech': 4, 'umbrella': 4}\n"
                           "import os\nassert os.path.exists('acme_adapter/adapter_model.safetensors')\n"
                           "assert os.path.isdir('joint_run/checkpoint-4/tenants/umbrella')\nprint('README OK')\n")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "README OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
