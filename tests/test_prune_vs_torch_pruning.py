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
    pytest.param("mobilenet_v3_small", "features.4.block.0.0", [1, 50, 95], False,  # through a squeeze-excitation gate
                 marks=pytest.mark.slow),
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


class LowFirstHalf(tp.importance.Importance):
    """Torch-Pruning ranks a head by the mean score of its channels: head 0 scores lowest, so it goes."""

    def __call__(self, group):
        scores = torch.ones(len(group[0][1]))
        scores[: len(scores) // 2] = 0
        return scores


@pytest.mark.filterwarnings("ignore")
def test_bert_heads_agree():
    """The same head of a BERT layer removed by both: same parameter count, equal outputs.

    Torch-Pruning removes heads only inside a channel-pruning step (its ratio
    must be positive), choosing them by importance: an importance that ranks
    head 0 lowest makes it remove the head `heads=[0]` names."""
    import hf_models as H

    model, x = H.bert().double(), H.ids(2, 7)
    path = "bert.encoder.layer.1.attention"
    ours = fxs.apply(model, [Prune(path, heads=[0])], example_inputs=(x,)).module
    theirs = copy.deepcopy(model)
    attention = theirs.get_submodule(path).self
    others = [m for n, m in theirs.named_modules() if isinstance(m, torch.nn.Linear) and not n.startswith(path)]
    pruner = tp.pruner.MetaPruner(theirs, x, importance=LowFirstHalf(), pruning_ratio=0.5, head_pruning_ratio=0.5,
                                  num_heads={attention.query: 2, attention.key: 2, attention.value: 2},
                                  prune_num_heads=True, prune_head_dims=False, ignored_layers=others,
                                  output_transform=lambda out: out.logits.sum())
    pruner.step()
    assert count(ours) == count(theirs) == count(model) - 3 * 16 * (32 + 1) - 32 * 16
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_vit_b_16_heads_fxsurgery_prunes_torch_pruning_leaves_multihead_attention_alone():
    """torchvision's ViT attention is torch.nn.MultiheadAttention. Torch-Pruning's head pruning handles
    separate q/k/v Linear layers; for MultiheadAttention it can only narrow embed_dim (the residual
    stream, coupled to every block), so with the other layers held it removes no head and no parameter.
    fxsurgery removes the heads, exactly."""
    from fxsurgery.match import zero_heads

    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None, image_size=32).eval().double()
    torch.nn.init.uniform_(model.heads.head.weight, -0.2, 0.2)
    x = torch.randn(1, 3, 32, 32).double()
    path = "encoder.layers.encoder_layer_3.self_attention"
    ours = fxs.apply(model, [Prune(path, heads=[0, 5, 11])], example_inputs=(x,)).module
    # 3 heads of 64 over 768: q, k, v lose 3 x 64 rows of 768 and a bias each; out_proj 192 columns of 768
    assert count(ours) == count(model) - 3 * 192 * (768 + 1) - 768 * 192
    reference = zero_heads(copy.deepcopy(model), path, [0, 5, 11])
    theirs = copy.deepcopy(model)
    attention = [m for m in theirs.modules() if isinstance(m, torch.nn.MultiheadAttention)]
    held = [m for m in theirs.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            and not any(m is a.out_proj for a in attention)]
    pruner = tp.pruner.MetaPruner(theirs, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.25,
                                  num_heads={a: a.num_heads for a in attention}, prune_num_heads=True, prune_head_dims=False,
                                  head_pruning_ratio=0.5, ignored_layers=held)
    pruner.step()
    assert count(theirs) == count(model) and {(a.num_heads, a.embed_dim) for a in attention} == {(12, 768)}
    with torch.no_grad():
        torch.testing.assert_close(ours(x), reference(x), rtol=0, atol=1e-5)
