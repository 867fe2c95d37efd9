"""Module-qualified node names: `layer2.0.add`, `relu_1`, as torchvision's feature extraction names nodes.

The reference is torchvision's own naming (pytorch/vision,
torchvision/models/feature_extraction.py, NodePathTracer; its cases in
test/test_backbone_utils.py select nodes by these names): the same names for
the same graph, and `Output` of a name gives the value create_feature_extractor
gives for it, bit for bit. torch.fx's flat names (`add_2`) stay accepted.
"""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fxsurgery as fxs
from fxsurgery import Delete, MatchError, Output, Replace
from fxsurgery.capture import capture, qualified_names


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


@pytest.mark.parametrize("name", ["resnet18", "squeezenet1_1", "mnasnet0_5"])
def test_names_are_torchvisions(name):
    model = torchvision.models.get_model(name, weights=None).eval()
    graph = capture(model, (torch.randn(1, 3, 64, 64),)).regions[0].graph
    _, eval_names = get_graph_node_names(model)
    assert list(qualified_names(graph).values()) == eval_names


def test_output_of_a_qualified_name_equals_create_feature_extractor(resnet):
    x = torch.randn(2, 3, 64, 64)
    nodes = {"layer2.0.add": "a", "layer1.0.relu": "r0", "layer1.0.relu_1": "r1", "layer4.1.add": "b", "flatten": "f"}
    result = fxs.apply(resnet, [Output(nodes)], example_inputs=(x[:1],))
    reference = create_feature_extractor(resnet, return_nodes=nodes)
    with torch.no_grad():
        got, want = result.module(x), reference(x)
        # each node alone: together, torchvision returns layer2.0.add after the ReLU(inplace=True) that follows it
        want = {key: create_feature_extractor(resnet, return_nodes={node: key})(x)[key] for node, key in nodes.items()}
    # torchvision orders the dict by graph order; fxsurgery keeps the order the user gave (deliberately: a
    # rule's order is the user's)
    assert list(got) == list(nodes.values()) and sorted(got) == sorted(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert not torch.equal(got["r0"], got["r1"])   # the block's two calls of one ReLU are two values
    # the plan shows the names the user wrote
    assert result.plan.table().splitlines()[2].endswith("layer2.0.add, layer1.0.relu, layer1.0.relu_1, layer4.1.add, ... (+1)")


def test_flat_names_still_select_the_same_node(resnet):
    x = torch.randn(1, 3, 64, 64)
    flat = fxs.apply(resnet, [Output("add_2")], example_inputs=(x,))
    qualified = fxs.apply(resnet, [Output("layer2.0.add")], example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(flat.module(x), qualified.module(x))
    assert [s.nodes for s in flat.plan.matches[0].sites] == [("add_2",)] == [s.nodes for s in qualified.plan.matches[0].sites]
    # the JSON plan (surgery.json, --json) shows the qualified name beside torch.fx's
    assert {k: flat.plan.to_dict()[0][k] for k in ("sites", "names")} == {"sites": ["add_2"], "names": ["layer2.0.add"]}


def test_a_misspelt_qualified_name_gets_the_nearest(resnet):
    with pytest.raises(MatchError) as err:
        fxs.apply(resnet, [Output("layer2.0.ad")], example_inputs=(torch.randn(1, 3, 64, 64),))
    assert "no module path or node name matches 'layer2.0.ad'; closest: layer2.0.add" in str(err.value)


class Child(nn.Module):
    def forward(self, x):
        return x * 2 + x


class Toy(nn.Module):
    """Its own `add` after its child's: torch.fx names the child's `add` and its own `add_1`."""

    def __init__(self):
        super().__init__()
        self.child = Child()
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.relu(self.child(x) + 1) - 3)


def test_a_name_of_two_nodes_is_an_error_listing_both():
    with pytest.raises(MatchError) as err:
        fxs.apply(Toy(), [Output("add")], example_inputs=(torch.randn(4),))
    assert str(err.value).endswith("): 'add' names 2 nodes: child.add (node 'add'), "
                                   "add (node 'add_1'); fix: write child.add or add_1")


def test_each_add_by_its_unambiguous_name():
    x = torch.tensor([-2.0, 0.5, 3.0])
    child = fxs.apply(Toy(), [Output("child.add")], example_inputs=(x,))
    own = fxs.apply(Toy(), [Output("add_1")], example_inputs=(x,))
    assert torch.equal(child.module(x), x * 2 + x)
    assert torch.equal(own.module(x), x * 2 + x + 1)


def test_the_nth_call_of_a_module():
    x = torch.tensor([-2.0, 0.5, 3.0])
    first = torch.relu(x * 2 + x + 1)
    second = torch.relu(first - 3)
    outs = fxs.apply(Toy(), [Output({"relu": "a", "relu_1": "b"})], example_inputs=(x,))
    got = outs.module(x)
    assert torch.equal(got["a"], first) and torch.equal(got["b"], second)
    # Delete of the second call leaves the first; the module path still names both calls
    only_second = fxs.apply(Toy(), [Delete("relu_1")], example_inputs=(x,))
    assert torch.equal(only_second.module(x), first - 3)
    both = fxs.apply(Toy(), [Replace("relu", nn.Identity())], example_inputs=(x,))
    assert torch.equal(both.module(x), x * 2 + x + 1 - 3)
    assert [s.shown for s in both.plan.matches[0].sites] == ["relu", "relu_1"]


def test_must_not_match_twin_a_qualified_name_of_nothing():
    x = torch.randn(4)
    result = fxs.apply(Toy(), [Output("child.sub", optional=True), Output("child.add")], example_inputs=(x,))
    assert result.plan.matches[0].count == 0
    assert torch.equal(result.module(x), x * 2 + x)


class Permute(nn.Module):
    """torchvision.ops.misc.Permute: traced through, its call is torch.fx's `permute` where it comes first."""

    def __init__(self, dims):
        super().__init__()
        self.dims = dims

    def forward(self, x):
        return torch.permute(x, self.dims)


class Swin(nn.Module):
    """swin_t's layout: a Permute in the stem, then the model's own `permute` module at the end."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 1), Permute([0, 2, 3, 1]))
        self.norm = nn.LayerNorm(4)
        self.permute = Permute([0, 3, 1, 2])

    def forward(self, x):
        return self.permute(self.norm(self.stem(x))).flatten(1)


def test_a_module_path_is_that_module_not_a_call_torch_fx_named_the_same():
    torch.manual_seed(0)
    model, x = Swin().eval(), torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        want = model.permute(model.norm(model.stem(x)))
        got = fxs.apply(model, [Output("permute")], example_inputs=(x,)).module(x)
        assert torch.equal(got, want)
        assert torch.equal(got, create_feature_extractor(model, return_nodes=["permute"])(x)["permute"])
        replaced = fxs.apply(model, [Replace("permute", nn.Identity())], example_inputs=(x,))
        assert [s.module for s in replaced.plan.matches[0].sites] == ["permute"]
        assert torch.equal(replaced.module(x), model.norm(model.stem(x)).flatten(1))
