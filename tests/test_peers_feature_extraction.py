"""torchvision's feature-extraction cases, run through fxsurgery's Output and compared with create_feature_extractor.

Ported from pytorch/vision, test/test_backbone_utils.py (class
TestFxFeatureExtraction; each test names its case there). torchvision's
own leaf policy (its torchvision.ops modules are leaves) is passed as
`leaf_types`, so both name the same nodes the same way.
"""

import inspect
import random

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fxsurgery as fxs
from fxsurgery import Output
from fxsurgery.capture import capture, qualified_names

TV_LEAVES = tuple(c for _, c in inspect.getmembers(torchvision.ops) if inspect.isclass(c) and issubclass(c, nn.Module))


class SubModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.relu = nn.ReLU()

    def forward(self, x):
        x = x + 1
        x = x + 1
        return self.relu(self.relu(x))


class NamedModule(nn.Module):
    """test_backbone_utils.py's TestModule: repeated names inside a child and in the root."""

    def __init__(self):
        super().__init__()
        self.submodule = SubModule()
        self.relu = nn.ReLU()

    def forward(self, x):
        x = self.submodule(x)
        x = x + 1
        x = x + 1
        return self.relu(self.relu(x))


def test_node_name_conventions():
    # test_node_name_conventions: the names torchvision's test lists, in order
    expected = ["x", "submodule.add", "submodule.add_1", "submodule.relu", "submodule.relu_1", "add", "add_1", "relu", "relu_1"]
    graph = capture(NamedModule(), (torch.randn(2, 3),)).regions[0].graph
    assert list(qualified_names(graph).values()) == expected
    x = torch.randn(2, 3) - 2.5
    nodes = expected[1:]
    want = create_feature_extractor(NamedModule(), return_nodes=nodes)(x)
    # Deliberate difference: torch.fx named the child's adds `add` and `add_1`, and fxsurgery still accepts those
    # names, so the root's `add` is ambiguous and refused rather than guessed; the root's adds are selected by
    # their unique node names instead (the error says which).
    with pytest.raises(fxs.MatchError) as err:
        fxs.apply(NamedModule(), [Output(nodes)], example_inputs=(x,))
    assert str(err.value).endswith("'add' names 2 nodes: submodule.add (node 'add'), add (node 'add_2'); fix: write submodule.add or add_2")
    chosen = {{"add": "add_2", "add_1": "add_3"}.get(n, n): n for n in nodes}
    result = fxs.apply(NamedModule(), [Output(chosen)], example_inputs=(x,))
    got = result.module(x)
    assert list(got) == nodes and all(torch.equal(got[k], want[k]) for k in nodes)


def test_feature_extraction_methods_equivalence():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=1).eval()
    return_layers = {"layer1": "layer1", "layer2": "layer2", "layer3": "layer3", "layer4": "layer4"}
    ilg = IntermediateLayerGetter(model, return_layers).eval()
    x = torch.rand(1, 3, 224, 224)
    result = fxs.apply(model, [Output(return_layers)], example_inputs=(x,))
    with torch.no_grad():
        want, got = ilg(x), result.module(x)
    assert list(got) == list(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the same parameters, under the same names, for what the outputs still need
    assert [n for n, _ in result.module.named_parameters()] == [n for n, _ in ilg.named_parameters()]


EXCLUDE = ["getitem", "floordiv", "size", "chunk", "_assert", "eq", "dim", "getattr"]   # the test's own filter


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf", "convnext_tiny"])
def test_build_fx_feature_extractor(name):
    # test_build_fx_feature_extractor: ten random eval nodes of each model
    torch.manual_seed(0)
    random.seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=1).eval()
    _, eval_nodes = get_graph_node_names(model, suppress_diff_warning=True)
    nodes = random.sample([n for n in eval_nodes if not any(x in n for x in EXCLUDE) and n != "x"], 10)
    x = torch.rand(1, 3, 64, 64)
    result = fxs.apply(model, [Output(nodes)], example_inputs=(x,), leaf_types=TV_LEAVES)
    reference = create_feature_extractor(model, return_nodes=nodes, suppress_diff_warning=True)
    with torch.no_grad():
        got, want = result.module(x), reference(x)
        # each node alone too: together, torchvision returns a value a later ReLU(inplace=True) overwrote
        alone = {k: create_feature_extractor(model, return_nodes=[k], suppress_diff_warning=True)(x)[k] for k in nodes}
    assert list(got) == nodes and sorted(want) == sorted(nodes)
    assert all(torch.equal(got[k], alone[k]) for k in nodes), name
    assert all(torch.equal(want[k], alone[k]) or want[k].min() == 0 for k in nodes), name  # theirs: after a relu


def leaf_function(x):
    return int(x)


def test_leaf_module_and_function():
    class LeafModule(nn.Module):
        def forward(self, x):
            int(x.shape[0])   # not traceable: a leaf
            return torch.nn.functional.relu(x + 4)

    class TestModule(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 1, 3)
            self.leaf_module = LeafModule()

        def forward(self, x):
            leaf_function(x.shape[0])
            return self.leaf_module(self.conv(x))

    torch.manual_seed(0)
    model, x = TestModule(), torch.rand(1, 3, 32, 32)
    reference = create_feature_extractor(model, return_nodes=["leaf_module"],
                                         tracer_kwargs={"leaf_modules": [LeafModule], "autowrap_functions": [leaf_function]})
    # fxsurgery specialises `leaf_function(x.shape[0])` to the example's batch instead of wrapping it
    result = fxs.apply(model, [Output(["leaf_module"])], example_inputs=(x,), leaf_types=(LeafModule,))
    assert [n.op for n in result.module.graph.nodes if n.name == "leaf_module"] == ["call_module"]
    assert torch.equal(result.module(x)["leaf_module"], reference(x)["leaf_module"])
