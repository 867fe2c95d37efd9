"""Prune in the views: `fxsurgery inspect --groups` lists the dependency groups; the diff shows pruned widths."""

import json

import torch
import torchvision
from conftest import cli

import fxsurgery as fxs
from fxsurgery import Prune
from fxsurgery.views._diff import sides

RESNET = "torchvision.models:resnet18"


def test_inspect_groups_table():
    code, stdout, _ = cli("inspect", RESNET, "--input", "1x3x64x64", "--groups")
    lines = stdout.splitlines()
    assert code == 0 and lines[0] == "13 dependency groups, 12 prunable"
    # the stem and layer1's residual stream: 3 layers write it, 19 tensors are sliced, 4 layers read it
    assert lines[3].split()[:8] == ["1", "conv1,", "layer1.0.conv2,", "layer1.1.conv2", "64", "19", "layer1.0.conv1,", "layer1.1.conv1,"]
    assert lines[4].split() == ["2", "layer1.0.conv1", "64", "6", "layer1.0.conv2"]
    assert lines[-1].split(None, 4) == ["13", "fc", "-", "-", "refused: node 'fc': its channels reach the model output, whose shape must stay"]


def test_inspect_groups_json():
    code, stdout, _ = cli("inspect", RESNET, "--input", "1x3x64x64", "--groups", "--json")
    rows = json.loads(stdout)
    assert code == 0 and len(rows) == 13
    assert rows[4] == {"layers": ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"], "channels": 128, "tensors": 18,
                       "readers": ["layer2.1.conv1", "layer3.0.conv1", "layer3.0.downsample.0"], "refused": None}


def test_diff_marks_pruned_modules_with_their_widths():
    model = torchvision.models.resnet18().eval()
    result = fxs.apply(model, [Prune("layer1.0.conv1", channels=[0, 1, 2, 3])], example_inputs=(torch.randn(1, 3, 64, 64),))
    before, after = sides(result)
    changed = [[(i.name, i.status, i.shape, i.rule) for i in side.items if i.status != "kept"] for side in (before, after)]
    assert changed == [
        [("layer1_0_conv1", "replaced", "[1, 64, 16, 16]", 1), ("layer1_0_bn1", "replaced", "[1, 64, 16, 16]", 1),
         ("layer1_0_conv2", "replaced", "[1, 64, 16, 16]", 1)],
        [("layer1_0_conv1", "replaced", "[1, 60, 16, 16]", 1), ("layer1_0_bn1", "replaced", "[1, 60, 16, 16]", 1),
         ("layer1_0_conv2", "replaced", "[1, 64, 16, 16]", 1)],
    ]
