"""One pool-gradient accumulator per pool per backward pass (mos_ext.pool_grad_tap), and
deterministic pool gradients selected from the training API (mos_ext.set_deterministic_grads).

L layers read one shared pool pair through a tap; their gradients must equal the untapped ones
(and the reference), reach the pool as one ordinary gradient (one hook call, .grad stolen, not
L zero tensors), and survive retain_graph, other consumers, casts and activation checkpointing.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

import mos_ext
from mos_ext import ops
from mos_ext import reference as R
from problems import make_table

L, N, h, o, r, l_a, l_b = 6, 24, 32, 24, 4, 4, 2


def setup(dtype=torch.float32, pool_dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    P_a, P_b = 2 * r * l_a + 3, 2 * r * l_b + 1
    pool_a = (torch.randn(P_a, h // l_a, generator=gen) / h ** 0.5).to(pool_dtype)
    pool_b = (torch.randn(P_b, o // l_b, generator=gen) / r ** 0.5).to(pool_dtype)
    tabs = [(make_table(1, r, l_a, P_a, gen), make_table(1, r, l_b, P_b, gen)) for _ in range(L)]
    tabs[1][0][0, 2:] = -1  # a layer with a padded rank row
    tabs[1][1][0, 2:] = -1
    xs = [torch.randn(N, h, generator=gen).to(dtype) for _ in range(L)]
    ws = [torch.randn(N, o, generator=gen).to(dtype) for _ in range(L)]
    return pool_a, pool_b, tabs, xs, ws


SEG = (torch.tensor([0, N], dtype=torch.int32), torch.zeros(1, dtype=torch.int32))
SCALE = torch.tensor([0.75])


def loss_of(pa, pb, tabs, xs, ws, tap=None, ckpt=False, fn=ops.sharded_lora):
    taps = mos_ext.PoolGradTaps() if tap else None
    total = 0
    for (ia, ib), x, w in zip(tabs, xs, ws):
        a, b = (taps(pa), taps(pb)) if taps is not None else (pa, pb)
        if ckpt:
            d = checkpoint(fn, x, a, b, ia, ib, SCALE, *SEG, use_reentrant=False)
        else:
            d = fn(x, a, b, ia, ib, SCALE, *SEG)
        total = total + (d.float() * w.float()).sum()
    if taps is not None:
        assert len(taps) == 2
    return total


def grads(pool_dtype=torch.float32, dtype=torch.float32, **kw):
    pa, pb, tabs, xs, ws = setup(dtype, pool_dtype)
    pa.requires_grad_()
    pb.requires_grad_()
    xs = [x.requires_grad_() for x in xs]
    loss_of(pa, pb, tabs, xs, ws, **kw).backward()
    return pa.grad, pb.grad, [x.grad for x in xs]


@pytest.mark.parametrize("ckpt", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("dtype,pool_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16), (torch.float64, torch.float64)])
def test_tapped_grads_match_untapped_and_reference(dtype, pool_dtype, ckpt):
    want = grads(pool_dtype, dtype)
    got = grads(pool_dtype, dtype, tap=True, ckpt=ckpt)
    ref = grads(pool_dtype, dtype, fn=R.sharded_lora)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else (
        dict(rtol=1e-5, atol=1e-5) if pool_dtype == torch.float32 and dtype == torch.float32 else
        dict(rtol=2e-2, atol=2e-2))
    for name, a, b, c in zip(("pool_a", "pool_b"), got[:2], want[:2], ref[:2]):
        assert a.dtype == pool_dtype and a.shape == b.shape
        # bf16 pools: the untapped path rounds every layer's gradient to bf16 before autograd adds
        # them; the tap sums in fp32 and rounds once. Compare on the scale of the gradient.
        t = dict(rtol=tol["rtol"], atol=tol["atol"] * max(1.0, c.double().abs().max().item()))
        torch.testing.assert_close(a.double(), b.double(), **t, msg=lambda m: f"{name} tapped vs untapped: {m}")
        torch.testing.assert_close(a.double(), c.double(), **t, msg=lambda m: f"{name} vs reference: {m}")
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a.double(), b.double(), **tol)


class PoolSized(TorchDispatchMode):
    """Counts ops that produce a tensor of one of the pool shapes (zeros, adds, casts)."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes = {tuple(s) for s in shapes}
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and tuple(out.shape) in self.shapes and out.dtype.is_floating_point:
            self.ops.append(func.overloadpacket.__name__)
        return out


@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_one_accumulator_per_pool_per_step(pool_dtype):
    counts = {}
    for tap in (False, True):
        pa, pb, tabs, xs, ws = setup(pool_dtype, pool_dtype)
        pa.requires_grad_()
        pb.requires_grad_()
        loss = loss_of(pa, pb, tabs, xs, ws, tap=tap)
        mode = PoolSized([pa.shape, pb.shape])
        with mode:
            loss.backward()
        counts[tap] = mode.ops
    made = lambda ops_: sum(op in ("zeros", "new_zeros", "empty", "zero_", "fill_") for op in ops_)
    # untapped: a pool-sized zero gradient per layer per side, then L-1 adds (and casts) per pool
    assert made(counts[False]) >= 2 * L, counts[False]
    # tapped: one accumulator per pool, no adds; one cast per pool when the pool is not fp32
    assert made(counts[True]) == 2, counts[True]
    assert sum(op in ("add", "add_") for op in counts[True]) == 0, counts[True]
    casts = sum(op in ("_to_copy", "to", "copy_") for op in counts[True])
    assert casts == (0 if pool_dtype == torch.float32 else 2), counts[True]


def test_one_ordinary_gradient_reaches_the_pool():
    pa, pb, tabs, xs, ws = setup()
    pa.requires_grad_()
    pb.requires_grad_()
    calls = {"hook": 0, "post": 0}
    pa.register_hook(lambda g: calls.__setitem__("hook", calls["hook"] + 1))
    pa.register_post_accumulate_grad_hook(lambda p: calls.__setitem__("post", calls["post"] + 1))
    loss_of(pa, pb, tabs, xs, ws, tap=True).backward()
    assert calls == {"hook": 1, "post": 1}
    assert pa.grad.dtype == torch.float32 and pa.grad.is_contiguous()
    g1 = pa.grad.clone()
    loss_of(pa, pb, tabs, xs, ws, tap=True).backward()  # a second step accumulates into .grad
    torch.testing.assert_close(pa.grad, 2 * g1)


def test_retain_graph_and_other_consumers():
    pa, pb, tabs, xs, ws = setup()
    pa.requires_grad_()
    pb.requires_grad_()
    taps = mos_ext.PoolGradTaps()
    a, b = taps(pa), taps(pb)
    total = sum(((ops.sharded_lora(x, a, b, ia, ib, SCALE, *SEG) * w).sum() for (ia, ib), x, w in zip(tabs, xs, ws)))
    total = total + (a ** 2).sum() + b.sum()  # non-mos consumers of the tapped tensors
    total.backward(retain_graph=True)
    g_a, g_b = pa.grad.clone(), pb.grad.clone()
    total.backward()
    torch.testing.assert_close(pa.grad, 2 * g_a)
    torch.testing.assert_close(pb.grad, 2 * g_b)
    pa2, pb2 = pa.detach().clone().requires_grad_(), pb.detach().clone().requires_grad_()
    ref = sum(((ops.sharded_lora(x, pa2, pb2, ia, ib, SCALE, *SEG) * w).sum() for (ia, ib), x, w in zip(tabs, xs, ws)))
    (ref + (pa2 ** 2).sum() + pb2.sum()).backward()
    torch.testing.assert_close(g_a, pa2.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_b, pb2.grad, rtol=1e-5, atol=1e-6)


def test_taps_cache_and_passthrough():
    pa = torch.randn(8, 4, requires_grad=True)
    taps = mos_ext.PoolGradTaps()
    t1 = taps(pa)
    assert taps(pa) is t1 and t1 is not pa and torch.equal(t1, pa)
    taps.reset()
    assert taps(pa) is not t1
    with torch.no_grad():
        assert taps(pa) is pa and mos_ext.pool_grad_tap(pa) is pa
    frozen = torch.randn(8, 4)
    assert taps(frozen) is frozen and mos_ext.pool_grad_tap(frozen) is frozen


def test_autograd_grad_only_inputs():
    """torch.autograd.grad for x only: the tap is not run and nothing is left behind."""
    pa, pb, tabs, xs, ws = setup()
    pa.requires_grad_()
    pb.requires_grad_()
    x = xs[0].requires_grad_()
    taps = mos_ext.PoolGradTaps()
    d = ops.sharded_lora(x, taps(pa), taps(pb), *tabs[0], SCALE, *SEG)
    (gx,) = torch.autograd.grad((d * ws[0]).sum(), [x])
    d2 = ops.sharded_lora(x, pa, pb, *tabs[0], SCALE, *SEG)
    (gx2,) = torch.autograd.grad((d2 * ws[0]).sum(), [x])
    torch.testing.assert_close(gx, gx2)
    assert pa.grad is None and pb.grad is None


def _shrink_grads(tap, pool_dtype=torch.float32, mixed=False):
    """L layers read pool_a through sgmv_shrink (and, mixed, every other layer through
    sharded_lora too), all from one tap when `tap`. Returns (pa.grad, x grads, pool-sized ops)."""
    pa, pb, tabs, xs, ws = setup(pool_dtype, pool_dtype, seed=7)
    pa.requires_grad_()
    xs = [x.requires_grad_() for x in xs]
    taps = mos_ext.PoolGradTaps() if tap else None
    a = taps(pa) if tap else pa
    total = 0
    for k, ((ia, ib), x, w) in enumerate(zip(tabs, xs, ws)):
        v = ops.sgmv_shrink(x, a, ia, *SEG)
        total = total + (v * w[:, :r].float()).sum()
        if mixed and k % 2:
            total = total + (ops.sharded_lora(x, a, pb, ia, ib, SCALE, *SEG).float() * w.float()).sum()
    mode = PoolSized([pa.shape])
    with mode:
        total.backward()
    return pa.grad, [x.grad for x in xs], mode.ops


@pytest.mark.parametrize("mixed", [False, True], ids=["shrink", "shrink+sharded_lora"])
@pytest.mark.parametrize("pool_dtype", [torch.float32, torch.bfloat16])
def test_sgmv_shrink_accumulates_into_the_tap(pool_dtype, mixed):
    """sgmv_shrink consumers of a tapped pool add their pool gradients into the tap's one
    accumulator, like sharded_lora's: one pool-sized buffer, no adds, one cast; the gradients
    equal the untapped ones (x's bitwise: they do not go through the tap)."""
    want_pa, want_x, untapped_ops = _shrink_grads(False, pool_dtype, mixed)
    got_pa, got_x, tapped_ops = _shrink_grads(True, pool_dtype, mixed)
    assert got_pa.dtype == pool_dtype and got_pa.shape == want_pa.shape
    tol = dict(rtol=1e-5, atol=1e-5) if pool_dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    t = dict(rtol=tol["rtol"], atol=tol["atol"] * max(1.0, want_pa.double().abs().max().item()))
    torch.testing.assert_close(got_pa.double(), want_pa.double(), **t)
    for a, b in zip(got_x, want_x):
        assert torch.equal(a, b)
    made = lambda ops_: sum(op in ("zeros", "new_zeros", "empty", "zero_", "fill_") for op in ops_)
    assert made(untapped_ops) >= L, untapped_ops
    assert made(tapped_ops) == 1, tapped_ops
    assert sum(op in ("add", "add_") for op in tapped_ops) == 0, tapped_ops
    casts = sum(op in ("_to_copy", "to", "copy_") for op in tapped_ops)
    assert casts == (0 if pool_dtype == torch.float32 else 1), tapped_ops


# ----------------------------------------------------------------------------
# deterministic pool gradients


def _pool_b_grad(det_setting, torch_det=False, flip_before_backward=False):
    pa, pb, tabs, xs, ws = setup(seed=5)
    pb.requires_grad_()
    ia, ib = tabs[0]
    mos_ext.set_deterministic_grads(det_setting)
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(torch_det, warn_only=True)
    try:
        d = ops.sharded_lora(xs[0], pa, pb, ia, ib, SCALE, *SEG)
        if flip_before_backward:
            mos_ext.set_deterministic_grads(False)
        d.backward(ws[0])
    finally:
        torch.use_deterministic_algorithms(prev)
        mos_ext.set_deterministic_grads(False)
    v = ops.sgmv_shrink(xs[0], pa, ia, *SEG)
    want = {det: ops.shard_grad(torch.zeros(pb.shape), v, ws[0], ib, SCALE, *SEG, deterministic=det)
            for det in (False, True)}
    return pb.grad, want


@pytest.mark.parametrize("how", ["flag", "torch", "flag at forward only"])
def test_deterministic_grads_selectable(how):
    mos_ext.set_cpu_dense_min_tokens(1)  # the non-deterministic CPU path is the BLAS one
    kw = dict(flag=dict(det_setting=True), torch=dict(det_setting=False, torch_det=True))
    kw["flag at forward only"] = dict(det_setting=True, flip_before_backward=True)
    got, want = _pool_b_grad(**kw[how])
    assert torch.equal(got, want[True])
    got, want = _pool_b_grad(False)
    assert torch.equal(got, want[False])


def _shrink_pool_grad(det_setting, flip_before_backward=False):
    pa, pb, tabs, xs, ws = setup(seed=5)
    pa.requires_grad_()
    ia, _ = tabs[0]
    u = ws[0][:, :r].float()
    mos_ext.set_deterministic_grads(det_setting)
    try:
        v = ops.sgmv_shrink(xs[0], pa, ia, *SEG)
        if flip_before_backward:
            mos_ext.set_deterministic_grads(False)
        v.backward(u)
    finally:
        mos_ext.set_deterministic_grads(False)
    ones = torch.ones(1)
    want = {det: ops.shard_grad(torch.zeros(pa.shape), u, xs[0], ia, ones, *SEG, deterministic=det)
            for det in (False, True)}
    return pa.grad, want


@pytest.mark.parametrize("how", ["flag", "flag at forward only"])
def test_sgmv_shrink_deterministic_grads(how):
    """sgmv_shrink's backward follows the setting, the one in effect at forward time included
    (as sharded_lora's does)."""
    mos_ext.set_cpu_dense_min_tokens(1)  # the non-deterministic CPU path is the BLAS one
    got, want = _shrink_pool_grad(True, flip_before_backward=how != "flag")
    assert torch.equal(got, want[True])
    got, want = _shrink_pool_grad(False)
    assert torch.equal(got, want[False])


def test_deterministic_grads_api():
    assert not mos_ext.deterministic_grads_enabled()
    with mos_ext.deterministic_grads():
        assert mos_ext.deterministic_grads_enabled()
    assert not mos_ext.deterministic_grads_enabled()
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        assert mos_ext.deterministic_grads_enabled()
    finally:
        torch.use_deterministic_algorithms(prev)


def test_take_resets_by_itself_across_forward_passes():
    """Layers take their taps with an owner key: a second forward pass before backward (gradient
    accumulation) starts new taps on its own, and the gradients are the sum of both passes."""
    pa, pb, tabs, xs, ws = setup()
    pa.requires_grad_()
    pb.requires_grad_()
    taps = mos_ext.PoolGradTaps()

    def forward(scale_w):
        total = 0
        for k, ((ia, ib), x, w) in enumerate(zip(tabs, xs, ws)):
            a, b = taps.take(("layer", k), pa, pb)
            total = total + (ops.sharded_lora(x, a, b, ia, ib, SCALE, *SEG) * w * scale_w).sum()
        return total

    l1 = forward(1.0)
    first = taps._taps[id(pa)][1]
    l2 = forward(2.0)
    assert taps._taps[id(pa)][1] is not first  # a new pass, new taps
    (l1 + l2).backward()
    pa2, pb2 = pa.detach().clone().requires_grad_(), pb.detach().clone().requires_grad_()
    ref = sum(((ops.sharded_lora(x, pa2, pb2, ia, ib, SCALE, *SEG) * w).sum() * 3.0
               for (ia, ib), x, w in zip(tabs, xs, ws)))
    ref.backward()
    torch.testing.assert_close(pa.grad, pa2.grad, rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(pb.grad, pb2.grad, rtol=1e-5, atol=2e-5)
    with torch.no_grad():
        assert taps.take(("layer", 0), pa, pb) == (pa, pb)


def test_taps_copy_and_pickle_empty():
    import copy
    import pickle

    pa = torch.randn(8, 4, requires_grad=True)
    taps = mos_ext.PoolGradTaps()
    taps.take("layer", pa)
    assert len(taps) == 1
    assert len(copy.deepcopy(taps)) == 0 and len(pickle.loads(pickle.dumps(taps))) == 0
