"""Every shipped rule file as a table row: matches, module types before/after, outputs."""

import os
from collections import Counter

import pytest
import torch
import torchvision
from conftest import RULES, assert_state_equal, state_copy

import fxsurgery as fxs


def histogram(module, types):
    counts = Counter(type(m).__name__ for m in module.modules())
    return {t: counts[t] for t in types}


def model(name, **kwargs):
    torch.manual_seed(0)
    original = getattr(torchvision.models, name)(weights=None, **kwargs).eval()
    for m in original.modules():  # statistics that are not the identity, so a fold has work to do
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return original


def bert():
    from corpus import CORPUS
    case = next(c for c in CORPUS if c.name == "hf/bert")
    return case.build().eval(), case.inputs()


# how outputs compare: equal (bitwise), close (1e-4), differs, or a check of its own
def grey(original, result, x):
    g = x[:, :1]
    assert result.example_inputs[0].shape[1] == 1
    torch.testing.assert_close(result.module(g), original(g.expand(-1, 3, -1, -1)), rtol=1e-4, atol=1e-4)


def rgbd(original, result, x):
    assert result.module(torch.cat([x, x[:, :1]], 1)).shape == original(x).shape


def features(original, result, x):
    trunk = torch.nn.Sequential(*list(original.children())[:-2])
    assert torch.equal(result.module(x), trunk(x))


def norm_eps(original, result, x):  # a fresh BatchNorm1d in eval divides by sqrt(1 + eps)
    head = original.fc
    feats = torch.flatten(original.avgpool(torch.nn.Sequential(*list(original.children())[:-2])(x)), 1)
    torch.testing.assert_close(result.module(x), head(feats / (1 + 1e-5) ** 0.5))


# file, params, model, input size, matches per rule, histogram before, after, outputs
ROWS = [
    # resnet18: 9 nn.ReLU modules (the stem's + one shared per block) called at 1 + 2 x 8 = 17 sites
    ("resnet-finetune.yaml", {}, "resnet18", 64, [1, 30, 1, 1],
     {"Linear": 1, "ReLU": 9, "Dropout": 0}, {"Linear": 1, "ReLU": 9, "Dropout": 1}, "differs"),
    ("classifier-head.yaml", {"num_classes": 37}, "resnet18", 64, [1],
     {"Linear": 1, "ReLU": 9}, {"Linear": 1, "ReLU": 9}, "differs"),
    ("classifier-head.yaml", {"head": "classifier.1", "num_classes": 5}, "mobilenet_v2", 64, [1],
     {"Linear": 1, "Dropout": 1}, {"Linear": 1, "Dropout": 1}, "differs"),
    # resnet18 modules with parameters: conv1, bn1, 4 per block x 8, 2 per downsample x 3 = 40, fc excluded
    ("freeze-backbone.yaml", {}, "resnet18", 64, [40],
     {"Linear": 1, "BatchNorm2d": 20}, {"Linear": 1, "BatchNorm2d": 20}, "equal"),
    ("linear-probe.yaml", {"num_classes": 3}, "resnet18", 64, [1, 40],
     {"Linear": 1, "BatchNorm2d": 20}, {"Linear": 1, "BatchNorm2d": 20}, "differs"),
    ("relu-to-gelu.yaml", {}, "resnet18", 64, [17, 0, 0],
     {"ReLU": 9, "GELU": 0}, {"ReLU": 0, "GELU": 9}, "differs"),
    # densenet121: relu0 + 2 per dense layer (6+12+24+16 = 58) + 1 per transition (3) = 120
    # nn.ReLU modules, and one F.relu call after the features
    ("relu-to-gelu.yaml", {}, "densenet121", 64, [120, 1, 0],
     {"ReLU": 120, "GELU": 0}, {"ReLU": 0, "GELU": 120}, "differs"),
    ("detach-features.yaml", {}, "resnet18", 64, [1], {"Linear": 1}, {"Linear": 1}, "equal"),
    ("drop-dropout.yaml", {}, "mobilenet_v2", 64, [1], {"Dropout": 1}, {"Dropout": 0}, "equal"),
    # densenet121 with drop_rate: one F.dropout call per dense layer, 58
    ("drop-dropout.yaml", {}, ("densenet121", {"drop_rate": 0.1}), 64, [58], {"Dropout": 0}, {"Dropout": 0}, "equal"),
    # resnet50: 53 conv+bn pairs (49 in the blocks' main paths + 4 downsample); 53 BatchNorm2d, none left
    ("fold-bn.yaml", {}, "resnet50", 64, [53, 0],
     {"Conv2d": 53, "BatchNorm2d": 53}, {"Conv2d": 53, "BatchNorm2d": 0}, "close"),
    # mobilenet_v3_small: 52 convs, each followed by its BatchNorm except the 4 squeeze-excitation convs x 2
    ("fold-bn.yaml", {}, "mobilenet_v3_small", 64, [34, 0],
     {"Conv2d": 52, "BatchNorm2d": 34}, {"Conv2d": 52, "BatchNorm2d": 0}, "close"),
    ("input-channels.yaml", {}, "resnet18", 64, [1], {"Conv2d": 20}, {"Conv2d": 20}, grey),
    ("input-channels.yaml", {"channels": 4}, "resnet18", 64, [1], {"Conv2d": 20}, {"Conv2d": 20}, rgbd),
    # resnet18 after layer4: avgpool and fc are gone
    ("feature-extractor.yaml", {}, "resnet18", 64, [1],
     {"Linear": 1, "AdaptiveAvgPool2d": 1}, {"Linear": 0, "AdaptiveAvgPool2d": 0}, features),
    ("insert-norm.yaml", {}, "resnet18", 64, [1], {"BatchNorm1d": 0}, {"BatchNorm1d": 1}, norm_eps),
    ("mlp-head.yaml", {"num_classes": 7}, "resnet18", 64, [1],
     {"Linear": 1, "ReLU": 9, "Dropout": 0}, {"Linear": 2, "ReLU": 10, "Dropout": 2}, "differs"),
    # resnet18: 8 blocks, each conv1 loses half its filters (bn1 and conv2 follow); 20 convolutions before and after
    ("prune-half.yaml", {}, "resnet18", 64, [8], {"Conv2d": 20}, {"Conv2d": 20}, "differs"),
    ("prune-half.yaml", {"amount": 0.25, "importance": "l2"}, "resnet50", 64, [16], {"Conv2d": 53}, {"Conv2d": 53}, "differs"),
    # bert (2 layers, 13 Linear with the pooler): query and value of each layer get A and B; outputs unchanged at insertion (B = 0)
    ("lora.yaml", {"rank": 4}, "bert", None, [21, 4], {"Linear": 13}, {"Linear": 21}, "equal"),
]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r[0]}-{r[2] if isinstance(r[2], str) else r[2][0]}-{r[1]}" for r in ROWS])
def test_rule_file(row):
    path, params, which, size, matches, before, after, outputs = row
    if which == "bert":
        original, inputs = bert()
    else:
        name, kwargs = (which, {}) if isinstance(which, str) else which
        original, inputs = model(name, **kwargs), (torch.randn(2, 3, size, size),)
    saved = state_copy(original)
    result = fxs.apply(original, [fxs.load_rules(os.path.join(RULES, path), params=params)], example_inputs=inputs,
                       keep_class=False)
    assert [m.count for m in result.plan.matches] == matches
    assert histogram(original, before) == before
    assert histogram(result.module, after) == after
    result.module.eval()
    with torch.no_grad():
        if callable(outputs):
            outputs(original, result, inputs[0])
        else:
            got, want = result.module(*inputs), original(*inputs)
            got, want = (getattr(v, "last_hidden_state", v) for v in (got, want))
            if outputs == "equal":
                assert torch.equal(got, want)
            elif outputs == "close":
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            else:
                assert not torch.equal(got, want) or got.shape != want.shape
    assert_state_equal(original, saved)


def test_every_rule_file_is_in_the_table():
    shipped = {f for f in os.listdir(RULES) if f.endswith(".yaml")}
    assert shipped == {row[0] for row in ROWS} and len(shipped) >= 12


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
