"""Prune: each coupling kind on real models and small modules, checked by the zeroing equivalence.

A structural prune is correct when the pruned model's outputs equal the
original's with the removed channels zeroed where they are produced (conv
rows and biases, the BatchNorm's weight and bias, a layer scale): atol 1e-5.
"""

import copy

import pytest
import torch
import torchvision
from conftest import assert_state_equal, state_copy
from torch import nn

import fxsurgery as fxs
from fxsurgery import Prune
from fxsurgery.capture import capture
from fxsurgery.errors import RewriteError
from fxsurgery.match import group_of, zeroed


def tv(name, **kwargs):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    for m in model.modules():  # statistics of real activations (ReLU6 saturates on the initial ones)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = 1.0
    with torch.no_grad():
        model.train()(torch.randn(4, 3, 32, 32))
    for m in model.modules():  # affine parameters that are not the identity
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.8, 1.2)
            nn.init.uniform_(m.bias, -0.1, 0.1)
        if isinstance(m, nn.Linear):  # heads start at zero (ViT) or near it: outputs would hide a difference
            nn.init.uniform_(m.weight, -0.2, 0.2)
    for name, p in model.named_parameters():
        if name.endswith("layer_scale"):  # 1e-6 at init would hide what a block computes
            nn.init.uniform_(p, 0.5, 1.5)
    return model.eval()


def group(model, x, path):
    reg = capture(model, (x,)).regions[0]
    node = next(n for n in reg.graph.nodes if n.op == "call_module" and n.target == path)
    return group_of(reg.graph, node.name, dict(reg.gm.named_modules()), reg.shapes)


def params(module):
    return sum(p.numel() for p in module.parameters())


def exact(model, x, path, channels, **kwargs):
    """Prune `channels` of `path`; the result equals the zeroed original (and not the original itself).

    In float64, so that 1e-5 measures the prune and not float32 summation order over fifty layers.
    """
    model, x = model.double(), x.double()
    saved = state_copy(model)
    result = fxs.apply(model, [Prune(path, channels=channels, **kwargs)], example_inputs=(x,))
    reference = zeroed(copy.deepcopy(model), group(model, x, path), channels)
    with torch.no_grad():
        got, want, before = result.module(x), reference(x), model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(got, before, atol=1e-5)  # the channels mattered: the check has teeth
    assert_state_equal(model, saved)  # the user's model is never modified
    return result


class Chain(nn.Module):
    def __init__(self, bn=False):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.conv2(torch.relu(self.bn(self.conv1(x))))
        return self.head(torch.relu(x).mean((2, 3)))


def test_plain_conv_chain_exact_with_hand_counted_parameters():
    torch.manual_seed(0)
    model, x = Chain().eval(), torch.randn(2, 3, 8, 8)
    result = exact(model, x, "conv1", [1, 4])
    # conv1 loses 2 filters of 3*3*3 + 1 bias, conv2 loses 2 input channels of 3*3 for each of its 6 filters
    assert params(model) - params(result.module) == 2 * (27 + 1) + 6 * 2 * 9
    assert (result.module.conv1.out_channels, result.module.conv2.in_channels) == (6, 6)
    assert result.report.adapted == ["conv1.weight", "conv1.bias", "conv2.weight"]
    assert result.report.entry("conv1.weight").op.startswith("dim 0 keeps 6 of 8: [0, 2-3, 5-7] by rule 1")
    assert result.report.entry("conv2.weight").op.startswith("dim 1 keeps 6 of 8: [0, 2-3, 5-7] by rule 1")
    assert result.report.entry("conv2.bias").status == "transferred" and not result.report.dropped


def test_must_not_match_twin_leaves_everything_transferred():
    torch.manual_seed(0)
    model, x = Chain().eval(), torch.randn(2, 3, 8, 8)
    result = fxs.apply(model, [Prune("conv9", channels=[1], optional=True)], example_inputs=(x,))
    assert result.plan.matches[0].count == 0 and result.report.adapted == []
    assert torch.equal(result.module(x), model(x))


def test_conv_bn_zeroes_through_the_batchnorm():
    torch.manual_seed(0)
    model, x = Chain(bn=True).eval(), torch.randn(2, 3, 8, 8)
    model.bn.running_mean.uniform_(-1, 1)
    model.bn.bias.data.uniform_(-1, 1)
    result = exact(model, x, "conv1", [0, 7])
    assert result.module.bn.num_features == 6
    assert set(result.report.adapted) == {"conv1.weight", "conv1.bias", "bn.weight", "bn.bias", "bn.running_mean",
                                          "bn.running_var", "conv2.weight"}
    assert result.report.entry("bn.num_batches_tracked").status == "transferred"


@pytest.mark.parametrize("name, path, channels, adapted", [
    # the stem's 64 channels run through layer1's residual adds: stem conv + bn (4 tensors), 2 x (conv2, bn2),
    # 2 conv1 inputs, layer2's conv1 and downsample inputs
    ("resnet18", "conv1", [1, 2, 63], 5 + 2 * 5 + 2 + 2),
    ("resnet18", "layer2.0.conv1", [0, 5], 6),
    # layer3 of resnet50: 6 bottlenecks' conv3+bn3 and the downsample conv+bn (5 tensors each), the conv1 inputs of
    # blocks 1-5 (block 0 reads layer2), layer4's conv1 and downsample inputs
    ("resnet50", "layer3.2.conv3", [3, 100, 1023], 7 * 5 + 5 + 2),
])
def test_residual_add(name, path, channels, adapted):
    model, x = tv(name), torch.randn(2, 3, 32, 32)
    result = exact(model, x, path, channels)
    assert len(result.report.adapted) == adapted
    assert params(model) > params(result.module)


def test_densenet_concat_offsets():
    model, x = tv("densenet121"), torch.randn(1, 3, 32, 32)
    path = "features.denseblock1.denselayer2.conv2"   # 32 channels concatenated after 64 + 32 others
    result = exact(model, x, path, [0, 31])
    g = group(model, x.double(), path)  # exact() made the model float64: it takes float64 inputs
    # every later layer of the block and the transition read them at offset 96: norm1 and conv1 of layers 3-6, the transition's norm and conv
    readers = sorted(t for (t, p, a), s in g.slices.items() if p == "weight" and not s.source)
    assert readers == [f"features.denseblock1.denselayer{i}.conv1" for i in range(3, 7)] + ["features.transition1.conv"]
    assert g.slices[("features.transition1.conv", "weight", 1)].index[0] == (96,)
    assert result.module.features.transition1.conv.in_channels == 254


def test_mobilenet_v2_depthwise():
    model, x = tv("mobilenet_v2"), torch.randn(2, 3, 32, 32)
    result = exact(model, x, "features.2.conv.0.0", [0, 10, 95])   # the expansion of block 2: 96 channels
    dw = result.module.get_submodule("features.2.conv.1.0")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (93, 93, 93)
    assert result.module.get_submodule("features.2.conv.2").in_channels == 93


class Flat(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 10)

    def forward(self, x):
        return self.fc(torch.flatten(torch.relu(self.conv(x)), 1))


def test_flatten_into_linear_takes_each_channels_block():
    torch.manual_seed(0)
    model, x = Flat().eval(), torch.randn(2, 3, 5, 5)
    result = exact(model, x, "conv", [2])
    assert result.module.fc.in_features == 75
    assert result.report.entry("fc.weight").op.startswith("dim 1 keeps 75 of 100: [0-49, 75-99]")


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 1)
        self.layer_scale = nn.Parameter(torch.rand(6, 1, 1) + 0.5)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(self.layer_scale * self.conv(x))


def test_layer_scale_is_sliced_with_its_channels(tmp_path):
    torch.manual_seed(0)
    model, x = Scaled().eval(), torch.randn(2, 3, 4, 4)
    result = exact(model, x, "conv", [1, 5])
    assert result.module.layer_scale.shape == (4, 1, 1)
    entry = result.report.entry("layer_scale")
    assert (entry.status, entry.source) == ("adapted", "layer_scale")
    assert entry.op.startswith("dim 0 keeps 4 of 6: [0, 2-4] by rule 1")
    assert torch.equal(result.module.layer_scale, model.layer_scale[[0, 2, 3, 4]].double())
    assert not result.report.dropped
    result.save(tmp_path / "o")  # map-weights slices another checkpoint's layer scale the same way
    later = Scaled().eval().double()  # exact() ran in float64
    assert torch.equal(fxs.map_weights(later.state_dict(), tmp_path / "o")["layer_scale"], later.layer_scale[[0, 2, 3, 4]])


class Split(nn.Module):
    def __init__(self, chunk):
        super().__init__()
        self.chunk = chunk
        self.conv = nn.Conv2d(3, 8, 1)
        self.a, self.b, self.out = nn.Conv2d(4, 3, 1), nn.Conv2d(4, 3, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        a, b = y.chunk(2, dim=1) if self.chunk else torch.split(y, [4, 4], dim=1)
        return self.out(torch.cat([self.a(a), torch.relu(self.b(b))], dim=1))


@pytest.mark.parametrize("chunk", [True, False])
def test_split_and_chunk_get_their_new_piece_sizes(chunk):
    torch.manual_seed(0)
    model, x = Split(chunk).eval(), torch.randn(2, 3, 4, 4)
    result = exact(model, x, "conv", [0, 1, 6])   # uneven: the pieces become 2 and 3 channels
    assert (result.module.a.in_channels, result.module.b.in_channels) == (2, 3)
    concat = exact(model, x, "a", [2])             # a's output sits at offset 0 of the concat: out loses input 2
    assert concat.module.out.in_channels == 5


def test_convnext_mlp_neurons_and_layer_norm_refused():
    model, x = tv("convnext_tiny"), torch.randn(1, 3, 32, 32)
    result = exact(model, x, "features.1.0.block.3", [0, 7, 100])   # Linear(96, 384) -> GELU -> Linear(384, 96)
    assert result.module.get_submodule("features.1.0.block.5").in_features == 381
    with pytest.raises(RewriteError) as err:
        fxs.apply(model, [Prune("features.0.0", channels=[0])], example_inputs=(x.double(),))
    assert err.value.full == (
        "rule 1 'prune features.0.0 channels=[0]' (tests/test_prune.py:224) at 'features.0.0': the output channels of "
        "'features.0.0' cannot be removed: node 'layer_norm': LayerNorm normalises over these channels, so removing one "
        "changes the others; fix: select another layer, or add optional=True to leave such groups alone")


def test_vit_mlp_neurons():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32,
                                                 mlp_dim=64, num_classes=5).eval()
    nn.init.uniform_(model.heads.head.weight, -0.2, 0.2)
    result = exact(model, torch.randn(2, 3, 32, 32), "encoder.layers.encoder_layer_1.mlp.0", [3, 4, 63], )
    mlp = result.module.get_submodule("encoder.layers.encoder_layer_1.mlp")
    assert (mlp.get_submodule("0").out_features, mlp.get_submodule("3").in_features) == (61, 61)


@pytest.mark.parametrize("name, block, channels", [
    ("mobilenet_v3_small", "features.4.block", [1, 50, 95]),   # expand -> depthwise -> SE (Hardsigmoid gate) -> project
    pytest.param("efficientnet_b0", "features.2.0.block", [3, 7], marks=pytest.mark.slow),   # SiLU inside, Sigmoid gate
])
def test_squeeze_excitation_gate_loses_the_gated_channels(name, block, channels):
    """The gate only multiplies removed (zero) channels: its layer loses those rows without being zeroed."""
    model, x = tv(name), torch.randn(2, 3, 32, 32)
    result = exact(model, x, f"{block}.0.0", channels)
    se = next(p for p, m in model.named_modules() if p.startswith(block) and type(m).__name__ == "SqueezeExcitation")
    width = model.get_submodule(f"{block}.0.0").out_channels
    fc1, fc2 = result.module.get_submodule(f"{se}.fc1"), result.module.get_submodule(f"{se}.fc2")
    assert (fc1.in_channels, fc2.out_channels) == (width - len(channels), width - len(channels))
    kept = [c for c in range(width) if c not in channels]
    assert torch.equal(fc2.bias, model.get_submodule(f"{se}.fc2").bias.double()[kept])
    assert result.report.entry(f"{se}.fc2.weight").op.startswith(f"dim 0 keeps {len(kept)} of {width}")


def test_timm_squeeze_excite_through_batch_norm_act():
    """timm's BatchNormAct2d traces into F.batch_norm over the tensors the graph reads: each is cut."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=5)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                nn.init.uniform_(m.bias, -0.1, 0.1)
    result = exact(model.eval(), torch.randn(2, 3, 32, 32), "blocks.2.0.conv_pw", [3, 7])   # 64 channels, SE with a Hardsigmoid gate
    assert result.module.get_submodule("blocks.2.0.se.conv_expand").out_channels == 62
    assert result.module.get_submodule("blocks.2.0.se.conv_reduce").in_channels == 62
    assert result.module.get_submodule("blocks.2.0.bn1").running_mean.shape == (62,)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.fc, self.out = nn.Conv2d(3, 6, 1), nn.Conv2d(6, 6, 1), nn.Conv2d(6, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        gate = torch.sigmoid(self.fc(y.mean((2, 3), keepdim=True)))
        return self.out(y * gate) + gate.mean()


def test_a_gate_read_elsewhere_is_refused():
    with pytest.raises(RewriteError, match=r"node 'sigmoid': the gate's values are read by more than 'mul', the product they gate"):
        fxs.apply(Gated().eval(), [Prune("conv", channels=[0])], example_inputs=(torch.randn(1, 3, 4, 4),))
