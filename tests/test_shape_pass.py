"""One shape pass per surgery: later passes re-run only what the rules changed (capture/_incremental.py).

Every test compares the shapes the kept pass gives with a full pass over the
same edited graph (no state: every node runs), and counts the nodes that ran.
"""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from hf_models import bert, ids, llama, transformers
from torch import fx, nn

import fxsurgery as fxs
from fxsurgery import Delete, Detach, Insert, Prune, Replace, new
from fxsurgery.capture import capture, propagate
from fxsurgery.errors import ValidateError
from fxsurgery.match import match
from fxsurgery.rewrite import rewrite
from fxsurgery.validate import validate


def _stages(model, rules, inputs, **kwargs):
    captured = capture(model, inputs, **kwargs)
    return captured, validate(rewrite(captured, match(captured, rules)))


def _assert_exact(rewritten):
    """Each edited graph's shapes are those of a full pass over it; returns the nodes the last pass ran."""
    ran = {}
    for path, edited in rewritten.graphs.items():
        full = propagate(edited.table(), edited.graph, edited.example_inputs())
        assert edited.shapes == full and len(full) == len(edited.graph.nodes)
        ran[path] = edited.shape_state.ran
    return ran


class TwoUsers(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.lin2 = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        h = F.relu(self.lin(x))
        return h + self.lin2(h)


def _resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval(), (torch.randn(2, 3, 64, 64),)


def _vit():
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16,
                                                 mlp_dim=32)
    return model.eval(), (torch.randn(3, 3, 32, 32),)


def _mobilenet():
    torch.manual_seed(0)
    return torchvision.models.mobilenet_v3_small().eval(), (torch.randn(2, 3, 64, 64),)


def _chain():
    torch.manual_seed(0)
    return nn.Sequential(*[TwoUsers() for _ in range(20)]).eval(), (torch.randn(1, 8),)


CASES = {
    "resnet18-head": (_resnet, [Replace("fc", new(nn.Linear, out_features=10))]),
    "resnet18-delete-insert-detach": (_resnet, [Delete("layer2.1"), Insert(nn.Dropout(0.1), before="fc"),
                                                Detach(after="layer3")]),
    "resnet18-prune-twice": (_resnet, [Prune("layer1.0.conv1", channels=[0, 5, 9]),
                                       Prune("layer3.1.conv1", channels=[3]), Replace("fc", new(nn.Linear, out_features=7))]),
    "resnet18-wider-stem": (_resnet, [Replace("conv1", new(nn.Conv2d, in_channels=3, out_channels=64, kernel_size=3,
                                                           stride=1, padding=1, bias=False))]),
    "vit-head-gelu": (_vit, [Replace("heads.head", new(nn.Linear, out_features=4)), Replace(nn.GELU, nn.SiLU())]),
    "vit-prune-mlp": (_vit, [Prune("encoder.layers.encoder_layer_0.mlp.0", neurons=[1, 2])]),
    "mobilenet-head-delete": (_mobilenet, [Replace("classifier.3", new(nn.Linear, out_features=5)),
                                           Delete("features.5")]),
    "chain-function": (_chain, [Replace(F.relu, F.gelu)]),
    "chain-insert": (_chain, [Insert(nn.LayerNorm(8), after="5.lin"), Replace("7.lin2", nn.Linear(8, 8))]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_kept_pass_gives_the_shapes_of_a_full_pass(case):
    build, rules = CASES[case]
    model, inputs = build()
    _captured, rewritten = _stages(model, rules, inputs)
    ran = _assert_exact(rewritten)
    nodes = len(rewritten.root.graph.nodes)
    assert 0 < ran[""] < nodes  # something ran again, and not everything


def test_a_head_swap_runs_two_nodes_again():
    """The new Linear and the output it feeds: nothing upstream of the head runs again."""
    model, inputs = _resnet()
    _captured, rewritten = _stages(model, [Replace("fc", new(nn.Linear, out_features=10))], inputs)
    assert _assert_exact(rewritten) == {"": 2}
    assert rewritten.root.shapes["fc"].shape == (2, 10)


def test_a_function_swap_runs_the_swapped_nodes_only():
    """relu -> gelu keeps each value's shape: the readers of the new nodes keep theirs."""
    model, inputs = _chain()
    _captured, rewritten = _stages(model, [Replace(F.relu, F.gelu)], inputs)
    assert _assert_exact(rewritten) == {"": 20}


def test_a_new_input_shape_runs_what_it_reaches():
    """The stem takes another channel count: the input and the stem run again, and what follows keeps its shapes."""
    model, inputs = _resnet()
    rules = [Replace("conv1", new(nn.Conv2d, in_channels=1, out_channels=64, kernel_size=7, stride=2, padding=3, bias=False))]
    _captured, rewritten = _stages(model, rules, inputs)
    assert rewritten.example_inputs()[0].shape == (2, 1, 64, 64)
    assert _assert_exact(rewritten) == {"": 2}  # the placeholder and conv1: bn1 reads the same shape as before


@pytest.mark.skipif(transformers is None, reason="needs transformers")
@pytest.mark.parametrize("build, rules", [
    (bert, [Replace("classifier", new(nn.Linear, out_features=5)), Delete("bert.encoder.layer.2")]),
    (llama, [Replace("lm_head", new(nn.Linear, out_features=50)), Prune("model.layers.0.mlp.gate_proj", neurons=[0, 1])]),
], ids=["bert", "llama"])
def test_transformers_graphs_keep_their_pass(build, rules):
    model = build()
    _captured, rewritten = _stages(model, rules, (ids(2, 9),))
    ran = _assert_exact(rewritten)
    nodes = {path: len(edited.graph.nodes) for path, edited in rewritten.graphs.items()}
    assert 0 < sum(ran.values()) < sum(nodes.values()) // 2


class ReshapesInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        h = self.lin(x)
        h.unsqueeze_(0)  # the kept value of h would say [1, 2, 4] to a reader placed before this line
        return h.sum(0)


def test_in_place_reshapes_take_a_full_pass():
    model = ReshapesInPlace().eval()
    _captured, rewritten = _stages(model, [Replace("lin", nn.Linear(4, 4))], (torch.randn(2, 4),))
    assert _assert_exact(rewritten) == {"": len(rewritten.root.graph.nodes)}


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        return torch.nonzero(self.lin(x) > 0)


def test_data_dependent_graphs_keep_no_values():
    """Real values decide their shapes: the state keeps nothing and every pass is a full one."""
    _captured, rewritten = _stages(DataDependent().eval(), [Replace("lin", nn.Linear(4, 4))], (torch.randn(3, 4),))
    edited = rewritten.root
    assert edited.shape_state.kind == "real" and edited.shape_state.values == {}
    assert _assert_exact(rewritten) == {"": len(edited.graph.nodes)}


def test_a_shape_error_reads_as_a_full_pass_reports_it():
    """A rule that breaks shapes fails in the kept pass; the full pass then reports it, word for word."""
    model, inputs = _resnet()
    rules = [Replace("layer4.1.conv2", nn.Conv2d(512, 256, 3, padding=1, bias=False))]
    with pytest.raises(ValidateError) as kept:
        fxs.apply(model, rules, inputs)
    captured = capture(model, inputs)
    captured.regions[0].shape_state = None  # every later pass a full one
    with pytest.raises(ValidateError) as full:
        validate(rewrite(captured, match(captured, rules)))
    assert str(kept.value) == str(full.value)
    assert str(kept.value).startswith("rule 1 'replace layer4.1.conv2 with Conv2d(512, 256")


def test_graph_without_example_inputs_has_no_pass():
    gm_model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    captured, rewritten = _stages(gm_model, [Replace(nn.ReLU, nn.GELU())], None)
    assert captured.regions[0].shape_state is None and rewritten.root.shapes == {}
    assert isinstance(rewritten.root.graph, fx.Graph)


@pytest.mark.skipif(transformers is None, reason="needs transformers")
def test_the_check_and_the_gradient_flow_share_one_forward(monkeypatch):
    """Where opaque code runs the graphs (a kept class), the check's fake forward records autograd's graph
    too: one forward pass, and the flow a separate pass gives."""
    from fxsurgery import Freeze
    from fxsurgery.validate import _gradflow, gradient_flow
    forwards, real = [], _gradflow._forward
    monkeypatch.setattr(_gradflow, "_forward", lambda *a, **k: forwards.append(k.get("fake")) or real(*a, **k))
    result = fxs.apply(bert(), [Freeze("bert.embeddings"), Detach(after="bert.encoder.layer.1.output")], (ids(2, 9),))
    assert forwards == [True]
    again = gradient_flow(result.module, result.example_inputs, one_graph=False, kwargs=result.example_kwargs)
    assert forwards == [True, True]
    assert result.gradient_flow.to_dict() == again.to_dict()
    counts = result.gradient_flow.counts()
    assert counts["frozen"] == 5 and counts["cut"] > 0 and counts["trainable"] > 0
