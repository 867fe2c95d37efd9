"""The same channels removed by fxsurgery and by Torch-Pruning (DepGraph): same parameter count, same outputs.

Where one of the two refuses a group, the test says which and why.
"""

import copy

import pytest
import torch
import torchvision
from test_prune import tv

import fxsurgery as fxs
from fxsurgery import Prune
from fxsurgery.errors import RewriteError

tp = pytest.importorskip("torch_pruning", reason="Torch-Pruning is in the test extra (pip install -e '.[test]')")


def both(model, x, path, channels, linear=False):
    """(fxsurgery's result, Torch-Pruning's pruned copy), in float64."""
    model, x = model.double(), x.double()
    ours = fxs.apply(model, [Prune(path, channels=channels)], example_inputs=(x,)).module
    theirs = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(theirs, example_inputs=x)
    how = tp.prune_linear_out_channels if linear else tp.prune_conv_out_channels
    graph.get_pruning_group(theirs.get_submodule(path), how, idxs=list(channels)).prune()
    return ours, theirs


def count(module):
    return sum(p.numel() for p in module.parameters())


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize("name, path, channels, linear", [
    ("resnet50", "layer3.2.conv3", [3, 100, 1023], False),                       # a residual stream: 7 writers, 7 readers
    ("mobilenet_v2", "features.2.conv.0.0", [0, 10, 95], False),                 # through a depthwise convolution
    pytest.param("densenet121", "features.denseblock1.denselayer2.conv2", [0, 31], False,   # concat offsets in 5 readers
                 marks=pytest.mark.slow),
    pytest.param("convnext_tiny", "features.1.0.block.3", [0, 7, 100], True,                # MLP neurons, GELU between the Linears
                 marks=pytest.mark.slow),
])
def test_same_parameters_and_outputs(name, path, channels, linear):
    model, x = tv(name), torch.randn(1, 3, 32, 32)
    before = count(model)
    ours, theirs = both(model, x, path, channels, linear)
    assert count(ours) == count(theirs) < before
    with torch.no_grad():
        torch.testing.assert_close(ours(x.double()), theirs(x.double()), rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_vit_mlp_neurons_agree():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=32).eval()
    torch.nn.init.uniform_(model.heads.head.weight, -0.2, 0.2)
    x = torch.randn(1, 3, 32, 32)
    ours, theirs = both(model, x, "encoder.layers.encoder_layer_3.mlp.0", [1, 2, 3000], linear=True)
    assert count(ours) == count(theirs) == count(model) - 3 * (768 + 1) - 3 * 768
    with torch.no_grad():
        torch.testing.assert_close(ours(x.double()), theirs(x.double()), rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore")
def test_layer_norm_over_the_channels_fxsurgery_refuses_torch_pruning_prunes_inexactly():
    """ConvNeXt's stem channels pass through a LayerNorm over the channels: removing one changes the
    statistics of the others. fxsurgery refuses; Torch-Pruning slices the LayerNorm, and its result
    differs from the original with those channels zeroed."""
    model, x = tv("convnext_tiny").double(), torch.randn(1, 3, 32, 32).double()
    with pytest.raises(RewriteError) as err:
        fxs.apply(model, [Prune("features.0.0", channels=[0, 1])], example_inputs=(x,))
    assert "node 'layer_norm': LayerNorm normalises over these channels, so removing one changes the others" in err.value.full
    theirs = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(theirs, example_inputs=x)
    graph.get_pruning_group(theirs.features[0][0], tp.prune_conv_out_channels, idxs=[0, 1]).prune()
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        zeroed.features[0][0].weight[[0, 1]] = 0
        zeroed.features[0][0].bias[[0, 1]] = 0
        assert (theirs(x) - zeroed(x)).abs().max() > 1e-3


@pytest.mark.filterwarnings("ignore")
def test_classifier_output_fxsurgery_refuses_torch_pruning_changes_the_output_shape():
    model, x = tv("resnet50"), torch.randn(1, 3, 32, 32)
    with pytest.raises(RewriteError, match=r"node 'fc': its channels reach the model output, whose shape must stay"):
        fxs.apply(model, [Prune("fc", channels=[0])], example_inputs=(x,))
    theirs = copy.deepcopy(model)
    graph = tp.DependencyGraph().build_dependency(theirs, example_inputs=x)
    graph.get_pruning_group(theirs.fc, tp.prune_linear_out_channels, idxs=[0]).prune()
    with torch.no_grad():
        assert theirs(x).shape == (1, 999)
