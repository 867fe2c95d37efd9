"""torch.fx's conv-bn fusion cases and timm's adapt_input_conv, against fxsurgery's FoldBatchNorm and AdaptInputChannels.

Fusion cases ported from pytorch/pytorch, test/test_fx_experimental.py
(TestFXExperimental.test_conv_bn_fusion, test_conv_bn_fusion_not_running_state,
test_conv_bn_fusion_mixed_dtype), compared with
`torch.fx.experimental.optimization.fuse` on the same module. The input-channel
cases compare with timm's own `adapt_input_conv`
(huggingface/pytorch-image-models, timm/models/_manipulate.py), which timm's
model tests exercise through `in_chans=`.
"""

import pytest
import torch
import torchvision
from torch import nn
from torch.fx.experimental import optimization

import fxsurgery as fxs
from fxsurgery import Rewrite

timm = pytest.importorskip("timm")


def _fold(model, x):
    return fxs.apply(model, [Rewrite(fxs.FoldBatchNorm(), optional=True)], example_inputs=(x,))


def test_conv_bn_fusion():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    result, fused = _fold(model, x), optimization.fuse(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.module.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert result.plan.matches[0].count == 20
    with torch.no_grad():
        want, ours, theirs = model(x), result.module(x), fused(x)
    torch.testing.assert_close(ours, want)
    torch.testing.assert_close(ours, theirs)


class ConvBN(nn.Module):
    def __init__(self, track=True, conv_dtype=torch.float32):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, bias=False, dtype=conv_dtype)
        self.bn = nn.BatchNorm2d(16, eps=1e-3, track_running_stats=track)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_conv_bn_fusion_not_running_state():
    torch.manual_seed(0)
    model, x = ConvBN(track=False).eval(), torch.randn(1, 3, 20, 20)
    result, fused = _fold(model, x), optimization.fuse(model)
    # neither folds a BatchNorm without running statistics; fxsurgery says why
    assert any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in result.module.modules())
    assert result.plan.matches[0].count == 0
    assert result.plan.matches[0].skipped == [
        "conv (Conv2d) + bn (BatchNorm2d): BatchNorm2d keeps no running statistics (track_running_stats=False), so it is not an affine map"]
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))


def test_conv_bn_fusion_mixed_dtype():
    torch.manual_seed(0)
    model, x = ConvBN(conv_dtype=torch.bfloat16).eval(), torch.randn(1, 3, 20, 20, dtype=torch.bfloat16)
    result, fused = _fold(model, x), optimization.fuse(model)
    with torch.no_grad():
        want, ours, theirs = model(x), result.module(x), fused(x)
    assert ours.dtype == theirs.dtype == want.dtype
    torch.testing.assert_close(ours, want, atol=0.05, rtol=0.02)
    torch.testing.assert_close(ours, theirs, atol=0.05, rtol=0.02)


class SharedConv(nn.Module):
    """One convolution called at two places, each followed by its own BatchNorm (pytorch#104593)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn1, self.bn2 = nn.BatchNorm2d(3), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn2(self.conv(self.bn1(self.conv(x))))


def test_a_conv_used_twice_is_left_alone_where_fuse_corrupts_it():
    # Deliberate difference: fuse folds both BatchNorms into the one shared convolution and the output is wrong;
    # fxsurgery leaves a match alone when rewriting it would change the module's other call
    torch.manual_seed(0)
    model = SharedConv().eval()
    for bn in (model.bn1, model.bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 8, 8)
    result, fused = _fold(model, x), optimization.fuse(model)
    with torch.no_grad():
        want = model(x)
        assert (fused(x) - want).abs().max() > 0.1
        assert torch.equal(result.module(x), want)
    assert result.plan.matches[0].count == 0
    assert "conv is called at 2 places" in result.plan.matches[0].skipped[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("in_chans", [1, 2, 4, 9])
def test_adapt_input_conv_equals_timm(in_chans, dtype):
    torch.manual_seed(0)
    model = timm.create_model("resnet18", pretrained=False, num_classes=4).to(dtype).eval()
    x = torch.randn(1, 3, 32, 32, dtype=dtype)
    result = fxs.apply(model, [Rewrite(fxs.AdaptInputChannels(in_chans))], example_inputs=(x,))
    want = timm.models.adapt_input_conv(in_chans, model.conv1.weight.detach())
    got = result.module.get_submodule("conv1").weight
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got.detach(), want)
    # the model's input changed with it, and the report says so
    assert result.example_inputs[0].shape == (1, in_chans, 32, 32)
