"""Every shipped rule file as a table row: matches, module types before/after, outputs."""

import os
from collections import Counter

import pytest
import torch
import torchvision

import fxsurgery as fxs
from conftest import RULES, assert_state_equal, state_copy

TYPES = ("Linear", "ReLU", "GELU", "Dropout")


def histogram(module):
    counts = Counter(type(m).__name__ for m in module.modules())
    return {t: counts[t] for t in TYPES}


def model(name, **kwargs):
    torch.manual_seed(0)
    return getattr(torchvision.models, name)(weights=None, **kwargs).eval()


# file, params, model, input size, matches per rule, histogram before -> after, outputs equal
ROWS = [
    # resnet18: 9 nn.ReLU modules (the stem's + one shared per block) called at 1 + 2 x 8 = 17 sites
    ("resnet-finetune.yaml", {}, ("resnet18", {}), 64, [1, 30, 1, 1],
     {"Linear": 1, "ReLU": 9, "GELU": 0, "Dropout": 0}, {"Linear": 1, "ReLU": 9, "GELU": 0, "Dropout": 1}, False),
    ("classifier-head.yaml", {"num_classes": 37}, ("resnet18", {}), 64, [1],
     {"Linear": 1, "ReLU": 9, "GELU": 0, "Dropout": 0}, {"Linear": 1, "ReLU": 9, "GELU": 0, "Dropout": 0}, False),
    ("classifier-head.yaml", {"head": "classifier.1", "num_classes": 5}, ("mobilenet_v2", {}), 64, [1],
     {"Linear": 1, "ReLU": 0, "GELU": 0, "Dropout": 1}, {"Linear": 1, "ReLU": 0, "GELU": 0, "Dropout": 1}, False),
    # resnet18 modules with parameters: conv1, bn1, 4 per block x 8, 2 per downsample x 3 = 40, fc excluded
    ("freeze-backbone.yaml", {}, ("resnet18", {}), 64, [40],
     {"Linear": 1, "ReLU": 9, "GELU": 0, "Dropout": 0}, {"Linear": 1, "ReLU": 9, "GELU": 0, "Dropout": 0}, True),
    ("relu-to-gelu.yaml", {}, ("resnet18", {}), 64, [17, 0, 0],
     {"Linear": 1, "ReLU": 9, "GELU": 0, "Dropout": 0}, {"Linear": 1, "ReLU": 0, "GELU": 9, "Dropout": 0}, False),
    # densenet121: relu0 + 2 per dense layer (6+12+24+16 = 58) + 1 per transition (3) = 120
    # nn.ReLU modules, and one F.relu call after the features
    ("relu-to-gelu.yaml", {}, ("densenet121", {}), 64, [120, 1, 0],
     {"Linear": 1, "ReLU": 120, "GELU": 0, "Dropout": 0}, {"Linear": 1, "ReLU": 0, "GELU": 120, "Dropout": 0}, False),
    ("detach-features.yaml", {}, ("resnet18", {}), 64, [1],
     {"Linear": 1, "ReLU": 9, "GELU": 0, "Dropout": 0}, {"Linear": 1, "ReLU": 9, "GELU": 0, "Dropout": 0}, True),
    ("drop-dropout.yaml", {}, ("mobilenet_v2", {}), 64, [1, 0],
     {"Linear": 1, "ReLU": 0, "GELU": 0, "Dropout": 1}, {"Linear": 1, "ReLU": 0, "GELU": 0, "Dropout": 0}, True),
    ("drop-dropout.yaml", {}, ("densenet121", {"drop_rate": 0.1}), 64, [0, 58],
     {"Linear": 1, "ReLU": 120, "GELU": 0, "Dropout": 0}, {"Linear": 1, "ReLU": 120, "GELU": 0, "Dropout": 0}, True),
]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r[0]}-{r[2][0]}" for r in ROWS])
def test_rule_file(row):
    path, params, (name, kwargs), size, matches, before, after, same_output = row
    original = model(name, **kwargs)
    saved = state_copy(original)
    x = torch.randn(2, 3, size, size)
    result = fxs.apply(original, [fxs.load_rules(os.path.join(RULES, path), params=params)], example_inputs=(x,))
    assert [m.count for m in result.plan.matches] == matches
    assert histogram(original) == before
    assert histogram(result.module) == after
    result.module.eval()
    with torch.no_grad():
        got, want = result.module(x), original(x)
    if same_output:
        assert torch.equal(got, want)
    else:
        assert not torch.equal(got, want) or got.shape != want.shape
    assert_state_equal(original, saved)


def test_every_rule_file_is_in_the_table():
    shipped = {f for f in os.listdir(RULES) if f.endswith(".yaml")}
    assert shipped == {row[0] for row in ROWS}


def test_classifier_head_infers_in_features_and_takes_params():
    result = fxs.apply(model("resnet18"), [os.path.join(RULES, "classifier-head.yaml")],
                       example_inputs=(torch.randn(1, 3, 64, 64),), params={"num_classes": 37})
    assert (result.module.fc.in_features, result.module.fc.out_features) == (512, 37)


def test_relu_to_gelu_swaps_a_shared_module_once_for_both_call_sites():
    result = fxs.apply(model("resnet18"), [os.path.join(RULES, "relu-to-gelu.yaml")],
                       example_inputs=(torch.randn(1, 3, 64, 64),))
    block = result.module.get_submodule("layer1.0")
    calls = [n for n in result.module.graph.nodes if n.op == "call_module" and n.target == "layer1.0.relu"]
    assert len(calls) == 2 and isinstance(block.relu, torch.nn.GELU)
