"""Bad input raises a clear Python error naming the argument, and changes nothing."""
import pytest
import torch

import mos_ext
from mos_ext import ops
from problems import make_problem


@pytest.fixture
def p():
    return make_problem(T=3, N=20, h=32, o=24, r=4, l_a=4, l_b=2, S=4, seed=0)


def call_all(p, **over):
    """Run every op with some arguments replaced; returns nothing (raises on bad input)."""
    a = dict(x=p.x, y=p.y.clone(), pool_a=p.pool_a, pool_b=p.pool_b, idx_a=p.idx_a, idx_b=p.idx_b, scale=p.scale,
             seg_indptr=p.seg_indptr, seg_tenant=p.seg_tenant)
    a.update(over)
    return a


def set_entry(t, pos, value):
    t = t.clone()
    t[pos] = value
    return t


SGMV = lambda a: ops.sgmv(a["y"], a["x"], a["pool_a"], a["pool_b"], a["idx_a"], a["idx_b"], a["scale"],
                          a["seg_indptr"], a["seg_tenant"])
SHRINK = lambda a: ops.sgmv_shrink(a["x"], a["pool_a"], a["idx_a"], a["seg_indptr"], a["seg_tenant"])
EXPAND = lambda a: ops.sgmv_expand(a["y"], torch.zeros(a["y"].shape[0], a["idx_b"].shape[1]), a["pool_b"],
                                   a["idx_b"], a["scale"], a["seg_indptr"], a["seg_tenant"])

BAD = [
    # (name, replacement builder, ops it applies to, exception, message fragment)
    ("x int", lambda p: dict(x=p.x.to(torch.int32)), [SGMV, SHRINK], TypeError, "x must be float32"),
    ("x 3-D", lambda p: dict(x=p.x.unsqueeze(0)), [SGMV, SHRINK], ValueError, "x must be 2-D"),
    ("x transposed", lambda p: dict(x=p.x.t().contiguous().t()), [SGMV, SHRINK], ValueError, "unit stride"),
    ("y dtype", lambda p: dict(y=p.y.double()), [SGMV], TypeError, "y must have the dtype of x"),
    ("y rows", lambda p: dict(y=p.y[:5].clone()), [SGMV], ValueError, "same number of tokens"),
    ("pool_a fp16", lambda p: dict(pool_a=p.pool_a.half()), [SGMV, SHRINK], TypeError, "pool_a must be"),
    ("pool_b int", lambda p: dict(pool_b=p.pool_b.int()), [SGMV, EXPAND], TypeError, "pool_b must be"),
    ("pool_a 1-D", lambda p: dict(pool_a=p.pool_a.reshape(-1)), [SGMV, SHRINK], ValueError, "pool_a must be 2-D"),
    ("pool_a strided", lambda p: dict(pool_a=p.pool_a.t().contiguous().t()), [SGMV, SHRINK], ValueError,
     "pool_a must be contiguous"),
    ("idx_a int64", lambda p: dict(idx_a=p.idx_a.long()), [SGMV, SHRINK], TypeError, "idx_a must be int32"),
    ("idx_b 2-D", lambda p: dict(idx_b=p.idx_b[0]), [SGMV, EXPAND], ValueError, "idx_b must be 3-D"),
    ("idx_a big", lambda p: dict(idx_a=set_entry(p.idx_a, (1, 2, 3), 10_000)), [SGMV, SHRINK],
     IndexError, "idx_a[1, 2, 3] = 10000 is out of range"),
    ("idx_b -2", lambda p: dict(idx_b=torch.full_like(p.idx_b, -2)), [SGMV, EXPAND], IndexError, "idx_b[0, 0, 0] = -2"),
    ("shard mismatch", lambda p: dict(idx_a=p.idx_a[:, :, :2].contiguous()), [SGMV, SHRINK], ValueError,
     "x.size(1) (h) = 32 must equal idx_a.size(2) * pool_a.size(1)"),
    ("tables disagree", lambda p: dict(idx_b=p.idx_b[:2].contiguous()), [SGMV], ValueError,
     "idx_a and idx_b must agree"),
    ("scale fp64", lambda p: dict(scale=p.scale.double()), [SGMV, EXPAND], TypeError, "scale must be float32"),
    ("scale length", lambda p: dict(scale=p.scale[:2]), [SGMV, EXPAND], ValueError, "scale must be 1-D with one entry"),
    ("seg_indptr int64", lambda p: dict(seg_indptr=p.seg_indptr.long()), [SGMV, SHRINK, EXPAND], TypeError,
     "seg_indptr must be int32"),
    ("seg lengths", lambda p: dict(seg_tenant=p.seg_tenant[:-1].contiguous()), [SGMV, SHRINK, EXPAND], ValueError,
     "one more entry"),
    ("seg decreasing", lambda p: dict(seg_indptr=torch.tensor([0, 9, 4, 12, 20], dtype=torch.int32)),
     [SGMV, SHRINK, EXPAND], IndexError, "non-decreasing"),
    ("seg past N", lambda p: dict(seg_indptr=torch.tensor([0, 5, 10, 15, 21], dtype=torch.int32)),
     [SGMV, SHRINK, EXPAND], IndexError, "exceeds the number of tokens"),
    ("seg negative", lambda p: dict(seg_indptr=torch.tensor([-1, 5, 10, 15, 20], dtype=torch.int32)),
     [SGMV, SHRINK, EXPAND], IndexError, "seg_indptr[0]"),
    ("tenant big", lambda p: dict(seg_tenant=torch.tensor([0, 3, 1, 2], dtype=torch.int32)), [SGMV, SHRINK, EXPAND],
     IndexError, "seg_tenant[1] = 3 is out of range"),
    ("tenant -2", lambda p: dict(seg_tenant=torch.tensor([0, 1, -2, 2], dtype=torch.int32)), [SGMV, SHRINK, EXPAND],
     IndexError, "seg_tenant[2] = -2"),
]


@pytest.mark.parametrize("case", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_changes_nothing(p, case):
    name, build, fns, exc, frag = case
    for fn in fns:
        a = call_all(p, **build(p))
        y_before = a["y"].clone()
        with pytest.raises(exc) as err:
            fn(a)
        assert frag in str(err.value), f"{name}: message {str(err.value)!r} lacks {frag!r}"
        if a["y"].dtype == y_before.dtype and a["y"].shape == y_before.shape:
            assert torch.equal(a["y"], y_before), f"{name}: y changed by a failed call"


def test_expand_v_checks(p):
    y = p.y.clone()
    with pytest.raises(TypeError, match="v must be float32"):
        ops.sgmv_expand(y, torch.zeros(20, 4, dtype=torch.float64), p.pool_b, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
    with pytest.raises(ValueError, match=r"v must be \[N, r\]"):
        ops.sgmv_expand(y, torch.zeros(20, 3), p.pool_b, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
    assert torch.equal(y, p.y)


def test_shard_grad_checks(p):
    g = torch.zeros(p.pool_a.shape)
    u = torch.zeros(20, 4)
    seg = (p.seg_indptr, p.seg_tenant)
    with pytest.raises(TypeError, match="grad_pool must be float32"):
        ops.shard_grad(g.double(), u, p.x, p.idx_a, p.scale, *seg)
    with pytest.raises(TypeError, match="u must be float32"):
        ops.shard_grad(g, u.double(), p.x, p.idx_a, p.scale, *seg)
    with pytest.raises(ValueError, match=r"u must be \[N, r\]"):
        ops.shard_grad(g, u[:, :3], p.x, p.idx_a, p.scale, *seg)
    with pytest.raises(ValueError, match="grad_pool must be contiguous"):
        ops.shard_grad(g.t().contiguous().t(), u, p.x, p.idx_a, p.scale, *seg)
    with pytest.raises(IndexError, match="idx"):
        ops.shard_grad(g, u, p.x, torch.full_like(p.idx_a, p.pool_a.shape[0]), p.scale, *seg)
    assert torch.all(g == 0)


def test_gather_checks(p):
    with pytest.raises(TypeError, match="idx must be int32"):
        ops.gather_shards(p.pool_a, p.idx_a.long())
    with pytest.raises(IndexError, match="out of range"):
        ops.gather_shards(p.pool_a, p.idx_a + 1000)
    with pytest.raises(ValueError, match="at least 2-D"):
        ops.gather_shards(p.pool_a, p.idx_a.reshape(-1))
    with pytest.raises(TypeError, match="pool must be"):
        ops.gather_shards(p.pool_a.int(), p.idx_a)


def test_sharded_lora_tables_disagree(p):
    with pytest.raises(ValueError, match="idx_a and idx_b"):
        ops.sharded_lora(p.x, p.pool_a, p.pool_b, p.idx_a, p.idx_b[:, :2].contiguous(), p.scale, p.seg_indptr,
                         p.seg_tenant)


def test_checks_off_never_reads_out_of_bounds(p, cpu_path):
    """With value checks off, out-of-range entries are skipped like -1 and bounds clamped."""
    bad_a = p.idx_a.clone()
    bad_a[0, 1, 2] = 2**30
    bad_a[1, 0, 0] = -7
    as_minus1 = bad_a.clone()
    as_minus1[0, 1, 2] = -1
    as_minus1[1, 0, 0] = -1
    ip = torch.tensor([0, 5, 3, 12, 2**30], dtype=torch.int32)  # decreasing and past N
    tn = torch.tensor([0, 2**20, 1, -5], dtype=torch.int32)
    with mos_ext.index_checks(False):
        assert not mos_ext.index_checks_enabled()
        y = p.y.clone()
        ops.sgmv(y, p.x, p.pool_a, p.pool_b, bad_a, p.idx_b, p.scale, ip, tn)
        y_ok = p.y.clone()
        ops.sgmv(y_ok, p.x, p.pool_a, p.pool_b, as_minus1, p.idx_b, p.scale,
                 torch.tensor([0, 5, 5, 12, 20], dtype=torch.int32), torch.tensor([0, -1, 1, -1], dtype=torch.int32))
        assert torch.equal(y, y_ok)
        g = torch.zeros(p.pool_a.shape)
        ops.shard_grad(g, torch.ones(20, 4), p.x, bad_a, p.scale, ip, tn)
        assert torch.isfinite(g).all()
        out = ops.gather_shards(p.pool_a, bad_a)
        assert torch.all(out[0, 1, 2 * 8:3 * 8] == 0)
    assert mos_ext.index_checks_enabled()


def test_negative_dense_threshold_rejected():
    before = mos_ext.cpu_dense_min_tokens()
    with pytest.raises(ValueError, match="dense_min_tokens must be >= 0"):
        mos_ext.set_cpu_dense_min_tokens(-1)
    assert mos_ext.cpu_dense_min_tokens() == before


# ----------------------------------------------------------------------------
# Memory overlap (every device, host-side), one-off validation, check settings


def test_output_overlapping_itself_rejected(p):
    base = torch.zeros(p.x.shape[0] + 1, p.y.shape[1])
    y = base.as_strided(p.y.shape, (1, 1))  # rows share all but one element
    for fn, frag in ((lambda: ops.sgmv(y, p.x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr,
                                       p.seg_tenant), "y overlaps itself"),
                     (lambda: ops.sgmv_expand(y, torch.zeros(20, 4), p.pool_b, p.idx_b, p.scale, p.seg_indptr,
                                              p.seg_tenant), "y overlaps itself")):
        with pytest.raises(ValueError, match=frag):
            fn()
    assert torch.all(base == 0)
    y0 = p.y.new_zeros(1, p.y.shape[1]).expand(p.y.shape[0], -1)  # stride 0 rows
    with pytest.raises(ValueError, match="y overlaps itself"):
        ops.sgmv(y0, p.x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)


def test_output_aliasing_an_input_rejected(p):
    """y sharing memory with x / v / a pool, grad_pool with u / x: ValueError naming both, nothing written."""
    o, h = p.y.shape[1], p.x.shape[1]
    buf = torch.randn(p.x.shape[0], h + o)
    x, y = buf[:, :h], buf[:, h - 8:h - 8 + o]  # y's first 8 columns are x's last 8
    before = buf.clone()
    with pytest.raises(ValueError, match="y shares memory with x"):
        ops.sgmv(y, x, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
    assert torch.equal(buf, before)
    # side by side in one buffer without overlap is fine
    x2, y2 = buf[:, :h], buf[:, h:]
    ops.sgmv(y2, x2, p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
    with pytest.raises(ValueError, match="y shares memory with pool_b"):
        pb = torch.randn(p.pool_b.numel() + p.y.numel())
        ops.sgmv_expand(pb[: p.y.numel()].view_as(p.y), torch.zeros(20, 4), pb[: p.pool_b.numel()].view_as(p.pool_b),
                        p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
    with pytest.raises(ValueError, match="y shares memory with v"):
        vy = torch.zeros(20 * 4 + 20 * o)
        ops.sgmv_expand(vy[: 20 * o].view(20, o), vy[20 * o - 4:20 * o - 4 + 80].view(20, 4), p.pool_b, p.idx_b,
                        p.scale, p.seg_indptr, p.seg_tenant)
    with pytest.raises(ValueError, match="y shares memory with x"):  # y the first columns of x
        ops.sgmv(buf[:, :o], buf[:, :h], p.pool_a, p.pool_b, p.idx_a, p.idx_b, p.scale, p.seg_indptr, p.seg_tenant)
    g = torch.zeros(p.pool_a.shape[0] * p.pool_a.shape[1] + 80)
    with pytest.raises(ValueError, match="grad_pool shares memory with u"):
        ops.shard_grad(g[: p.pool_a.numel()].view_as(p.pool_a), g[-80 - 4:-4].view(20, 4), p.x, p.idx_a, p.scale,
                       p.seg_indptr, p.seg_tenant)


def test_validate_tables_and_segments(p):
    P = p.pool_a.shape[0]
    assert mos_ext.validate_tables(p.idx_a, p.pool_a, name="idx_a") is p.idx_a
    mos_ext.validate_tables(p.idx_b, p.pool_b.shape[0], name="idx_b")
    bad = set_entry(p.idx_a, (2, 1, 0), P)
    with pytest.raises(ValueError, match=rf"layers.0.q_proj idx_a\[2, 1, 0\] = {P} is out of range"):
        mos_ext.validate_tables(bad, P, name="layers.0.q_proj idx_a")
    with pytest.raises(ValueError, match=r"idx\[0, 0, 0\] = -3"):
        mos_ext.validate_tables(torch.full_like(p.idx_a, -3), P)
    with pytest.raises(TypeError, match="idx must be int32"):
        mos_ext.validate_tables(p.idx_a.long(), P)
    # validation ignores the per-call settings
    with mos_ext.index_checks(False):
        with pytest.raises(ValueError, match="out of range"):
            mos_ext.validate_tables(bad, P)
    mos_ext.validate_segments(p.seg_indptr, p.seg_tenant, p.x.shape[0], p.idx_a.shape[0])
    with pytest.raises(ValueError, match="non-decreasing"):
        mos_ext.validate_segments(torch.tensor([0, 9, 4, 12, 20], dtype=torch.int32), p.seg_tenant, 20, 3)
    with pytest.raises(ValueError, match=r"seg_tenant\[1\] = 3"):
        mos_ext.validate_segments(p.seg_indptr, torch.tensor([0, 3, 1, 2], dtype=torch.int32), 20, 3)
    with pytest.raises(ValueError, match="exceeds the number of tokens"):
        mos_ext.validate_segments(p.seg_indptr, p.seg_tenant, 19, 3)


def test_check_settings():
    """Per-call checks: on for CPU tensors, opt-in for GPU tensors; the context manager restores both."""
    assert mos_ext.index_checks_enabled() and not mos_ext.device_index_checks_enabled()
    with mos_ext.index_checks(True, device=True):
        assert mos_ext.device_index_checks_enabled()
        with mos_ext.index_checks(False):
            assert not mos_ext.index_checks_enabled() and mos_ext.device_index_checks_enabled()
    assert mos_ext.index_checks_enabled() and not mos_ext.device_index_checks_enabled()
    assert mos_ext.set_device_index_checks(True) is False
    assert mos_ext.set_device_index_checks(False) is True


def test_env_defaults_in_a_fresh_process():
    import os
    import subprocess
    import sys

    code = ("import mos_ext; print(mos_ext.index_checks_enabled(), mos_ext.device_index_checks_enabled(), "
            "mos_ext.deterministic_grads_enabled())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOS_EXT_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False", "False"]
    env.update(MOS_EXT_CHECK_INDICES_DEVICE="1", MOS_EXT_DETERMINISTIC_GRADS="1", MOS_EXT_CHECK_INDICES="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True", "True"]
