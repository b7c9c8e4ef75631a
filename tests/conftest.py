import os

import pytest
import torch

import mos_ext  # noqa: F401  (loads the ops)


def pytest_collection_modifyitems(config, items):
    """Long grids carry @pytest.mark.slow; they run with MOS_EXT_SLOW=1 or `-m slow`."""
    if os.environ.get("MOS_EXT_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow grid: set MOS_EXT_SLOW=1 (or -m slow) to run")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _index_checks_on():
    """Every test starts with index checks on (per-call device checks at their default, off)
    and deterministic pool gradients off, and leaves all three as it found them."""
    prev = mos_ext.set_index_checks(True)
    prev_dev = mos_ext.set_device_index_checks(False)
    prev_det = mos_ext.set_deterministic_grads(False)
    yield
    mos_ext.set_index_checks(prev)
    mos_ext.set_device_index_checks(prev_dev)
    mos_ext.set_deterministic_grads(prev_det)


@pytest.fixture
def isa_restore():
    prev = mos_ext.cpu_isa()
    yield
    mos_ext.set_cpu_isa(prev)


@pytest.fixture(autouse=True)
def _cpu_dense_restored():
    """Every test leaves the CPU per-shape dispatch threshold as it found it."""
    prev = mos_ext.cpu_dense_min_tokens()
    yield
    mos_ext.set_cpu_dense_min_tokens(prev)


@pytest.fixture(params=[0, 1], ids=["fused", "blas"])
def cpu_path(request):
    """Run on the fused CPU kernels only (threshold 0), then with every fp32/fp64 segment on
    the BLAS path (threshold 1). Tests without it run at the default threshold, which mixes both."""
    mos_ext.set_cpu_dense_min_tokens(request.param)
    return request.param
