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
    """Every test starts with index checks on and leaves them as it found them."""
    prev = mos_ext.set_index_checks(True)
    yield
    mos_ext.set_index_checks(prev)


@pytest.fixture
def isa_restore():
    prev = mos_ext.cpu_isa()
    yield
    mos_ext.set_cpu_isa(prev)
