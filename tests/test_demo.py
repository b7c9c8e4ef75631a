"""The demo (python -m mos_ext.demo) runs end to end and its isolation check passes."""
import pytest

pytest.importorskip("transformers")


def test_demo_runs(capsys, tmp_path):
    from mos_ext import demo

    assert demo.main(["--steps", "3", "--device", "cpu", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "isolation:" in out and "-> OK" in out
    assert "per 80 GB" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(t[0] for t in demo.TENANTS)
    for name, _, _ in demo.TENANTS:  # each tenant saved by save_pretrained (format 2)
        assert (tmp_path / name / "adapter_model.safetensors").is_file()
        assert (tmp_path / name / "adapter_config.json").is_file()
