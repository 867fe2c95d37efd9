"""Output rules: one value, or a dict of named feature maps as torchvision's create_feature_extractor returns.

The reference is torchvision's own feature extraction
(pytorch/vision, torchvision/models/feature_extraction.py; its cases in
test/test_backbone_utils.py pick `return_nodes` the same way): for the same
nodes, the same dict with bitwise-equal tensors, except where torchvision returns
a value a later in-place layer overwrote: there, the value as made (each node
extracted alone).
"""

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import fxsurgery as fxs
from fxsurgery import MatchError, Output, RuleError

# One model per torchvision classification family, with an input size it accepts.
LIGHT = {"resnet18": 64, "mobilenet_v2": 64, "mobilenet_v3_small": 64, "efficientnet_b0": 64, "regnet_y_400mf": 64,
         "shufflenet_v2_x0_5": 64, "mnasnet0_5": 64, "squeezenet1_1": 64, "densenet121": 64, "googlenet": 64,
         "convnext_tiny": 64}
HEAVY = {"alexnet": 64, "vgg11": 64, "inception_v3": 96, "swin_t": 64, "vit_b_16": 224, "maxvit_t": 224}


def _return_nodes(model: nn.Module) -> dict[str, str]:
    """Three module outputs spread over the network, named as torchvision's node names name them."""
    _, nodes = get_graph_node_names(model)
    paths = dict(model.named_modules())
    names = [n for n in nodes if n in paths and n.count(".") <= 1 and not isinstance(paths[n], (nn.Linear, nn.Dropout))]
    chosen = [names[len(names) // 4], names[len(names) // 2], names[3 * len(names) // 4]]
    return {n: f"feat{i}" for i, n in enumerate(dict.fromkeys(chosen))}


def _same_as_torchvision(name: str, size: int) -> None:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(2, 3, size, size)
    nodes = _return_nodes(model)
    result = fxs.apply(model, [Output(nodes)], example_inputs=(x[:1],))
    reference = create_feature_extractor(model, return_nodes=nodes)
    with torch.no_grad():
        got, want = result.module(x), reference(x)
        # each node alone too: together, torchvision returns a value a later ReLU(inplace=True) overwrote
        alone = {key: create_feature_extractor(model, return_nodes={node: key})(x)[key] for node, key in nodes.items()}
    assert list(got) == list(want) == list(nodes.values())
    for key in want:
        assert torch.equal(got[key], alone[key]), (name, key)
        assert torch.equal(want[key], alone[key]) or (want[key] - alone[key]).abs().max() > 0 == want[key].min(), (name, key)


@pytest.mark.parametrize("name", sorted(LIGHT))
def test_feature_maps_equal_create_feature_extractor(name):
    _same_as_torchvision(name, LIGHT[name])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(HEAVY))
def test_feature_maps_equal_create_feature_extractor_large(name):
    _same_as_torchvision(name, HEAVY[name])


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18().eval()


def _trunk(model, upto):
    names = [n for n, _ in model.named_children()]
    return nn.Sequential(*[getattr(model, n) for n in names[:names.index(upto) + 1]])


def test_one_selector_returns_the_value_itself(resnet):
    x = torch.randn(1, 3, 64, 64)
    result = fxs.apply(resnet, [Output("layer2")], example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(result.module(x), _trunk(resnet, "layer2")(x))


def test_several_selectors_and_several_rules_return_one_dict_in_order(resnet):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = {"layer1": _trunk(resnet, "layer1")(x), "layer3": _trunk(resnet, "layer3")(x)}
    for rules in ([Output("layer1", "layer3")], [Output(["layer1", "layer3"])], [Output("layer1"), Output("layer3")]):
        result = fxs.apply(resnet, rules, example_inputs=(x[:1],))
        with torch.no_grad():
            got = result.module(x)
        assert list(got) == ["layer1", "layer3"]
        assert all(torch.equal(got[k], want[k]) for k in want)
        # what fed only layer4 and fc is gone, and said so
        assert sorted({n.split(".")[0] for n in result.report.dropped}) == ["fc", "layer4"]
    assert [m.count for m in result.plan.matches] == [1, 1]


def test_an_output_a_later_layer_writes_into_in_place_is_the_value_as_made(resnet):
    """bn1 feeds ReLU(inplace=True): returned beside layer4 (which keeps that ReLU), bn1's output was relu's values,
    as create_feature_extractor's still is (max |diff| 1.35). A copy is returned where, and only where, a later node
    writes into the value."""
    x = torch.randn(2, 3, 64, 64)
    nodes = {"bn1": "stem", "layer1.0.bn1": "l1", "layer4": "c5"}
    result = fxs.apply(resnet, [Output(nodes)], example_inputs=(x[:1],))
    with torch.no_grad():
        got = result.module(x)
        stem = resnet.bn1(resnet.conv1(x))
        trunk = resnet.maxpool(resnet.relu(stem.clone()))
        block = resnet.layer1[0]
        want = {"stem": stem, "l1": block.bn1(block.conv1(trunk)), "c5": _trunk(resnet, "layer4")(x)}
        theirs = create_feature_extractor(resnet, return_nodes=nodes)(x)
    assert list(got) == ["stem", "l1", "c5"] and all(torch.equal(got[k], want[k]) for k in want)
    assert (theirs["stem"] - want["stem"]).abs().max() > 0.5 and theirs["stem"].min() == 0  # torchvision's: after relu
    assert [n.target for n in result.module.graph.nodes if n.op == "call_method"] == ["clone", "clone"]


class Writes(nn.Module):
    """bn's output written into through a view, by item assignment and by a keyword inplace=True."""

    def __init__(self, how):
        super().__init__()
        self.conv, self.bn, self.pool, self.how = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), how

    def forward(self, x):
        y = self.bn(self.conv(x))
        if self.how == "view":
            y.flatten(1).relu_()
        elif self.how == "item":
            y[:, 0] = 0
        else:
            torch.nn.functional.relu(y, inplace=True)
        return self.pool(y)


class Statement(nn.Module):
    """A call made for its write alone, its result dropped: dead code to torch.fx, which removed it."""

    def __init__(self, how):
        super().__init__()
        self.conv, self.act, self.how = nn.Conv2d(3, 4, 3), nn.ReLU(inplace=True), how

    def forward(self, x):
        y = self.conv(x)
        if self.how == "keyword":
            torch.nn.functional.relu(y, inplace=True)
        elif self.how == "positional":
            torch.nn.functional.hardtanh(y, -0.1, 0.1, True)
        elif self.how == "dropout":
            torch.nn.functional.dropout(y, 0.5, True, True)
        else:
            self.act(y)
        return y.mean((2, 3))


@pytest.mark.parametrize("how", ["keyword", "positional", "dropout", "module"])
def test_a_call_made_for_its_in_place_write_alone_is_kept(how):
    """F.relu(y, inplace=True) as a statement was dead code to the graph: the result returned y without it
    (max |diff| 0.41), with no rule at all."""
    model, x = Statement(how).eval(), torch.randn(2, 3, 8, 8)
    result = fxs.apply(model, [], example_inputs=(x,))
    torch.manual_seed(0)
    want = model(x)
    torch.manual_seed(0)
    assert torch.equal(result.module(x), want)


@pytest.mark.parametrize("how", ["view", "item", "keyword"])
def test_an_output_written_into_through_a_view_or_an_item_is_the_value_as_made(how):
    torch.manual_seed(0)
    model, x = Writes(how).eval(), torch.randn(2, 3, 8, 8)
    result = fxs.apply(model, [Output({"bn": "bn", "pool": "out"})], example_inputs=(x,))
    with torch.no_grad():
        got = result.module(x)
        want = model.bn(model.conv(x))
    assert torch.equal(got["bn"], want) and torch.equal(got["out"], model(x))
    assert (want < 0).any()  # the write would have changed it


def test_one_selector_matching_several_places_keys_them_by_path(resnet):
    x = torch.randn(1, 3, 64, 64)
    result = fxs.apply(resnet, [Output("re:layer[23]\\.1")], example_inputs=(x,))
    with torch.no_grad():
        got = result.module(x)
        layer3_1 = resnet.layer3(_trunk(resnet, "layer2")(x))
    assert list(got) == ["layer2.1", "layer3.1"]
    assert torch.equal(got["layer3.1"], layer3_1)
    assert str(result.plan.matches[0].rule) == "output re:layer[23]\\.1"


def test_rule_files_name_outputs(tmp_path, resnet):
    path = tmp_path / "features.yaml"
    path.write_text("fxsurgery: 1\nrules:\n  - output: {layer1: low, layer4: high}\n")
    x = torch.randn(1, 3, 64, 64)
    result = fxs.apply(resnet, [str(path)], example_inputs=(x,))
    with torch.no_grad():
        got = result.module(x)
    assert list(got) == ["low", "high"]
    assert torch.equal(got["high"], _trunk(resnet, "layer4")(x))
    assert str(result.plan.matches[0].rule) == "output layer1 as low, layer4 as high"
    listed = tmp_path / "list.yaml"
    listed.write_text("fxsurgery: 1\nrules:\n  - output: [layer2, avgpool]\n")
    assert list(fxs.apply(resnet, [str(listed)], example_inputs=(x,)).module(x)) == ["layer2", "avgpool"]


def test_saved_feature_extractor_returns_the_dict(tmp_path, resnet):
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(resnet, [Output({"layer1": "c2", "layer2": "c3"})], example_inputs=(x[:1],))
    loaded = fxs.load(result.save(tmp_path / "out"))
    with torch.no_grad():
        got, want = loaded(x), result.module(x)
    assert list(got) == ["c2", "c3"] and all(torch.equal(got[k], want[k]) for k in want)


def test_output_errors_name_the_rule_and_the_fix(resnet):
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(MatchError) as err:
        fxs.apply(resnet, [Output("layer1", "layer9")], example_inputs=(x,))
    assert str(err.value).endswith("matched nothing: no module path or node name matches 'layer9'; closest: layer4, layer3, layer2; "
                                   "fix: correct the selector or add 'optional: true'")
    with pytest.raises(MatchError) as err:
        fxs.apply(resnet, [Output("layer1", "layer*")], example_inputs=(x,))
    assert str(err.value).endswith("'layer*' selects layer1, which is already returned as 'layer1'; fix: select each place once")
    with pytest.raises(RuleError) as err:
        Output({"layer1": "f", "layer2": "f"})
    assert str(err.value).endswith("output name 'f' is given twice; fix: give each output its own name")
    with pytest.raises(RuleError) as err:
        Output()
    assert str(err.value).endswith("output needs at least one selector; fix: e.g. Output('layer3') or Output('layer1', 'layer2')")


def test_optional_selector_that_matches_nothing_is_left_out(resnet):
    x = torch.randn(1, 3, 64, 64)
    result = fxs.apply(resnet, [Output("layer1", "layer9", optional=True)], example_inputs=(x,))
    assert list(result.module(x)) == ["layer1"]
    assert result.plan.matches[0].skipped == ["layer9: no module path or node name matches 'layer9'"]


def test_an_optional_output_that_matches_nothing_says_why_and_the_cli_writes_nothing(resnet, tmp_path):
    from conftest import cli
    x = torch.randn(1, 3, 64, 64)
    result = fxs.apply(resnet, [Output("zz", "yy", optional=True)], example_inputs=(x,))
    assert result.plan.matches[0].reason == ("zz: no module path or node name matches 'zz'; "
                                             "yy: no module path or node name matches 'yy'")
    rules = tmp_path / "none.yaml"
    rules.write_text("fxsurgery: 1\nrules:\n  - output: [zz, yy]\n    optional: true\n")
    code, _, stderr = cli("apply", "torchvision.models:resnet18", rules, "--input", "1x3x64x64", "-o", tmp_path / "o")
    assert code == 2 and not (tmp_path / "o").exists()
    assert "nothing to change: no rule matched: rule 1 'output zz, yy'" in stderr and stderr.count("\n") == 1


def test_a_type_given_as_an_output_name_points_to_selecting_by_type():
    with pytest.raises(RuleError) as err:
        Output({"type": nn.ReLU})
    assert str(err.value).endswith("output name <class 'torch.nn.modules.activation.ReLU'> is not a non-empty string; fix: name each "
                                   "output with a string, e.g. {'layer1': 'feat1'}; to select by ReLU, pass it itself, e.g. Output(ReLU)")
