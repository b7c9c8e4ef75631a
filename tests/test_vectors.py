"""The independent test vectors of shared/design/vectors (a copy lives in tests/data)."""
import pathlib

import pytest
import torch
from safetensors.torch import load_file

from mos_ext import ops
from mos_ext import reference as R

DATA = pathlib.Path(__file__).parent / "data" / "sgmv_vectors.safetensors"
ARGS = ("x", "pool_a", "pool_b", "idx_a", "idx_b", "scale", "seg_indptr", "seg_tenant")


def cases():
    d = load_file(str(DATA))
    names = sorted({k.split(".", 1)[0] for k in d})
    return [(n, {k.split(".", 1)[1]: v for k, v in d.items() if k.startswith(n + ".")}) for n in names]


@pytest.mark.parametrize("name,case", cases(), ids=lambda c: c if isinstance(c, str) else "")
def test_vectors(name, case):
    args = [case[k] for k in ARGS]
    y = case["y"].clone()
    ops.sgmv(y, *args)
    torch.testing.assert_close(y, case["y_expected"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(R.sgmv(case["y"], *args), case["y_expected"], rtol=1e-12, atol=1e-12)
    g = ops.gather_shards(case["pool_a"], case["idx_a"])
    assert torch.equal(g, case["gather_a_expected"])
    assert torch.equal(R.gather_shards(case["pool_a"], case["idx_a"]), case["gather_a_expected"])
    # The two halves agree with the fused op.
    y2 = case["y"].clone()
    v = ops.sgmv_shrink(case["x"], case["pool_a"], case["idx_a"], case["seg_indptr"], case["seg_tenant"])
    ops.sgmv_expand(y2, v, case["pool_b"], case["idx_b"], case["scale"], case["seg_indptr"], case["seg_tenant"])
    torch.testing.assert_close(y2, case["y_expected"], rtol=1e-12, atol=1e-12)
