"""MoSLinear over bitsandbytes 4-bit (NF4) bases: QLoRA, the paper's own setup.

bitsandbytes quantizes and runs 4-bit layers on the CPU; the tests skip where it cannot be
imported."""
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")

from mos_ext import MoSConfig  # noqa: E402
from mos_ext.layers import MoSLinear  # noqa: E402
from mos_ext.pools import ShardPools, sample_tables  # noqa: E402


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


@pytest.fixture
def qlayer():
    torch.manual_seed(0)
    cfg = MoSConfig(r=4, equivalent_rank=2, shards_per_vector=4, private_rank=1)
    pools = ShardPools(cfg, 64, 32, 3, gen=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pools.B.normal_(0, 0.05)
    ia, ib = sample_tables(cfg, 64, 32, 3, torch.Generator().manual_seed(1))
    q = nf4_linear(torch.nn.Linear(64, 32))
    return MoSLinear(q, pools, ia[0], ib[0], cfg.scale), pools


def test_forward_backward_on_nf4_base(qlayer):
    layer, pools = qlayer
    x = torch.randn(6, 64)
    out = layer(x)
    w = dequant(layer.base)
    expect = x @ (w + layer.delta_weight()).T + layer.base.bias
    torch.testing.assert_close(out, expect, rtol=1e-4, atol=1e-4)
    out.pow(2).sum().backward()
    assert pools.A.grad is not None and pools.A.grad.abs().sum() > 0
    assert pools.B.grad is not None and pools.B.grad.abs().sum() > 0
    assert all(p.grad is None for p in layer.base.parameters())


def test_merge_unmerge_requantizes(qlayer):
    layer, _ = qlayer
    w0 = dequant(layer.base)
    dw = layer.delta_weight()
    layer.merge()
    assert isinstance(layer.base.weight, bnb.nn.Params4bit)
    merged = dequant(layer.base)
    # NF4 keeps ~3.5 bits per block: the merged weight is the requantized W + dW
    step = (w0 + dw).abs().max() / 7
    assert (merged - (w0 + dw)).abs().max() <= step
    x = torch.randn(6, 64)
    torch.testing.assert_close(layer(x), x @ merged.T + layer.base.bias)
    layer.unmerge()
    # two requantizations (merge, unmerge): at most two NF4 steps away
    assert (dequant(layer.base) - w0).abs().max() <= 2 * step
