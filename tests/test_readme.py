"""The README's training example runs as written (train with Trainer, save, reload, serve)."""
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("peft")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_training_example_runs(tmp_path):
    text = open(os.path.join(ROOT, "README.md")).read()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    ex = next(b for b in blocks if "Trainer(model=model" in b)
    script = tmp_path / "example.py"
    script.write_text(ex + "\nassert torch.equal(again.base_model.pools()['mos_B_q_proj'], model.base_model.pools()"
                           "['mos_B_q_proj'])\nassert out.shape == (2, 12)\nprint('README OK')\n")
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "README OK" in r.stdout, r.stdout[-2000:] + r.stderr[-4000:]
