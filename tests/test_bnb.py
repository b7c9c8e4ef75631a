"""MoSLinear over bitsandbytes bases: 4-bit NF4 (QLoRA, the paper's own setup) and LLM.int8.

bitsandbytes quantizes and runs both kinds on the CPU; the tests skip where it cannot be
imported."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

pytest.importorskip("peft")
from mos_ext import MoSConfig  # noqa: E402
from mos_ext.layers import MoSLinear, MoSPoolBank  # noqa: E402
from mos_ext.pools import init_pools, sample_tables  # noqa: E402


def nf4_linear(lin):
    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None, quant_type="nf4",
                          compute_dtype=torch.float32)
    q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type="nf4")
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")


def dequant(layer):
    w = layer.weight
    return bnb.functional.dequantize_4bit(w.data, w.quant_state).float()


class Pools:
    """The (A, B) pools of one type, as the tuner's pool bank holds them."""

    def __init__(self, bank, t="t"):
        self.A, self.B = bank.get("default", t)


def mos_over(quantize):
    """A MoSLinear (64 -> 32, nonzero B, adapter "default") over quantize(nn.Linear), and its pools."""
    torch.manual_seed(0)
    cfg = MoSConfig(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1)
    bank = MoSPoolBank()
    a, b = init_pools(cfg, 64, 32, 3, gen=torch.Generator().manual_seed(0))
    bank.add("default", "t", a, b, a_frozen=False)
    pools = Pools(bank)
    with torch.no_grad():
        pools.B.normal_(0, 0.05)
    ia, ib = sample_tables(cfg, 64, 32, 3, torch.Generator().manual_seed(1))
    layer = MoSLinear(quantize(torch.nn.Linear(64, 32)))
    layer.update_layer("default", bank, "t", ia[0], ib[0], cfg.scale, 0.0)
    return layer, pools


@pytest.fixture
def qlayer():
    return mos_over(nf4_linear)


def test_forward_backward_on_nf4_base(qlayer):
    layer, pools = qlayer
    x = torch.randn(6, 64)
    out = layer(x)
    w = dequant(layer.base_layer)
    expect = x @ (w + layer.get_delta_weight("default")).T + layer.base_layer.bias
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
    out.pow(2).sum().backward()
    assert pools.A.grad is not None and pools.A.grad.abs().sum() > 0
    assert pools.B.grad is not None and pools.B.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.base_layer.parameters())


def test_merge_unmerge_requantizes(qlayer):
    layer, _ = qlayer
    w0 = dequant(layer.base_layer)
    dw = layer.get_delta_weight("default")
    layer.merge()
    assert isinstance(layer.base_layer.weight, bnb.nn.Params4bit)
    merged = dequant(layer.base_layer)
    # NF4 keeps ~3.5 bits per block: the merged weight is the requantized W + dW
    step = (w0 + dw).abs().max() / 7
    assert (merged - (w0 + dw)).abs().max() <= step
    x = torch.randn(6, 64)
    torch.testing.assert_close(layer(x), x @ merged.T + layer.base_layer.bias)
    layer.unmerge()
    # two requantizations (merge, unmerge): at most two NF4 steps away
    assert (dequant(layer.base_layer) - w0).abs().max() <= 2 * step


def int8_linear(lin):
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False,
                            threshold=0.0)
    q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to("cpu")  # quantizes


def dequant8(layer):
    scb = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
    return bnb.functional.int8_vectorwise_dequant(layer.weight.data, scb).float()


@pytest.fixture
def int8_layer():
    layer, pools = mos_over(int8_linear)
    assert layer.base_layer.weight.dtype == torch.int8
    return layer, pools


def int8_step(w):
    """A bound on the rounding of absmax int8 rows: half a step of the row scale, plus the fp16 cast
    bitsandbytes quantizes through (taken generously as another half step)."""
    return w.abs().amax(dim=1, keepdim=True) / 127


def test_forward_backward_on_int8_base(int8_layer):
    layer, pools = int8_layer
    x = torch.randn(6, 64)
    out = layer(x)
    base = layer.base_layer(x)
    torch.testing.assert_close(out - base, x @ layer.get_delta_weight("default").T, rtol=1e-4,
                               atol=1e-5)
    # LLM.int8 quantizes the activations too: compare to the dequantized weight within int8 error
    assert (base - (x @ dequant8(layer.base_layer).T + layer.base_layer.bias)).abs().max() < 0.05
    out.pow(2).sum().backward()
    assert pools.A.grad is not None and pools.A.grad.abs().sum() > 0
    assert pools.B.grad is not None and pools.B.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.base_layer.parameters())


@pytest.mark.parametrize("forward_first", [False, True], ids=["fresh", "after_forward"])
def test_merge_unmerge_int8_requantizes(int8_layer, forward_first):
    layer, _ = int8_layer
    if forward_first:  # bnb moves CB/SCB from the weight into layer.state on the first forward
        layer(torch.randn(2, 64))
    w0 = dequant8(layer.base_layer)
    dw = layer.get_delta_weight("default")
    # the merge must move the weight by far more than the rounding, or the checks below could not fail
    assert (dw.abs().amax(dim=1, keepdim=True) > 10 * int8_step(w0)).all()
    layer.merge()
    assert isinstance(layer.base_layer.weight, bnb.nn.Int8Params) and layer.base_layer.weight.dtype == torch.int8
    merged = dequant8(layer.base_layer)
    assert ((merged - (w0 + dw)).abs() <= int8_step(w0 + dw)).all()
    x = torch.randn(6, 64)
    y = layer(x)  # merged: the adapter path is off, the base carries W + dW
    ref = x @ (w0 + dw).T + layer.base_layer.bias
    assert (y - ref).abs().max() < 0.05
    layer.unmerge()
    back = dequant8(layer.base_layer)
    assert ((back - w0).abs() <= int8_step(w0 + dw) + int8_step(w0)).all()
    torch.testing.assert_close(layer(x), x @ (back + dw).T + layer.base_layer.bias, rtol=0, atol=0.05)
