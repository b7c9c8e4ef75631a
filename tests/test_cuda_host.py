"""Host-side behaviour of the CUDA ops (issue 11, item 5): no host sync per call by default,
per-call value checks opt-in and skipped under CUDA-graph capture, one-off validation and
overlap checks on the GPU. Skipped without a GPU and a CUDA build."""
import pytest
import torch

import mos_ext
from mos_ext import ops
from problems import capture_graph, make_problem

pytestmark = pytest.mark.skipif(not (torch.cuda.is_available() and mos_ext.cuda_built()),
                                reason="needs a CUDA device and mos_ext built with MOS_EXT_CUDA=1")


@pytest.fixture
def d():
    return make_problem(T=4, N=64, h=64, o=48, r=8, l_a=4, l_b=2, S=6, dtype=torch.bfloat16, seed=1).to("cuda")


def run_training_and_serving_ops(p):
    seg = (p.seg_indptr, p.seg_tenant)
    y = p.y.clone()
    ops.sgmv(y, p.x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, *seg)
    v = ops.sgmv_shrink(p.x, p.pool_a, p.idx_a, *seg)
    ops.sgmv_expand(y, v, p.pool_b, p.idx_b, p.scale, *seg)
    g = torch.zeros(p.pool_a.shape, device="cuda")
    ops.shard_grad(g, v, p.x, p.idx_a, p.scale, *seg)
    pa, pb = p.pool_a.float().requires_grad_(), p.pool_b.float().requires_grad_()
    taps = mos_ext.PoolGradTaps()
    out = ops.sharded_lora(p.x, taps(pa), taps(pb), p.idx_a, p.idx_b, p.scale, *seg)
    out.float().sum().backward()


def test_no_host_sync_per_call_by_default(d):
    run_training_and_serving_ops(d)  # warm up (allocator, lazy init)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_training_and_serving_ops(d)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


def test_device_checks_opt_in_sync_and_raise(d):
    bad = d.idx_a.clone()
    bad[1, 2, 3] = d.pool_a.shape[0]
    y = d.y.clone()
    ops.sgmv(y, d.x, d.pool_a, d.pool_b, bad, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)  # unchecked: skipped
    with mos_ext.index_checks(True, device=True):
        with pytest.raises(IndexError, match=r"idx_a\[1, 2, 3\]"):
            ops.sgmv(y, d.x, d.pool_a, d.pool_b, bad, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pytest.raises(RuntimeError, match="synchroniz"):
                ops.sgmv(y, d.x, d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr, d.seg_tenant)
        finally:
            torch.cuda.set_sync_debug_mode(0)


def test_device_checks_skipped_while_capturing(d):
    with mos_ext.index_checks(True, device=True):
        y = d.y.clone()
        # capturing would fail if the checks synced
        graph = capture_graph(lambda: ops.sgmv(y, d.x, d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr,
                                               d.seg_tenant))
        graph.replay()
        torch.cuda.synchronize()


def test_validate_and_overlap_on_gpu(d):
    mos_ext.validate_tables(d.idx_a, d.pool_a, name="idx_a")
    bad = d.idx_b.clone()
    bad[3, 0, 1] = -2
    with pytest.raises(ValueError, match=r"tenant idx_b\[3, 0, 1\] = -2"):
        mos_ext.validate_tables(bad, d.pool_b, name="tenant idx_b")
    with pytest.raises(ValueError, match="non-decreasing"):
        mos_ext.validate_segments(torch.tensor([0, 9, 4], dtype=torch.int32, device="cuda"),
                                  torch.zeros(2, dtype=torch.int32, device="cuda"), 64, 4)
    buf = torch.zeros(64, 64 + 48, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="y shares memory with x"):
        ops.sgmv(buf[:, 16:64], buf[:, :64], d.pool_a, d.pool_b, d.idx_a, d.idx_b, d.scale, d.seg_indptr,
                 d.seg_tenant)
