"""A child whose other methods the Python code around it calls stays a module of its class.

RetinaNet's and FCOS's forward stay Python and, in train mode, call
`self.head.compute_loss(...)`; the head, traced, was a GraphModule of its
forward alone, and training after any surgery failed on "'RetinaNetHead'
object has no attribute 'compute_loss'" (eval, which never calls it, ran).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torchvision.models import detection

import fxsurgery as fxs
from fxsurgery import Freeze

IMAGES = [torch.rand(3, 60, 64, generator=torch.Generator().manual_seed(0)),
          torch.rand(3, 48, 40, generator=torch.Generator().manual_seed(1))]
TARGETS = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 40.0]]), "labels": torch.tensor([1])},
           {"boxes": torch.tensor([[4.0, 6.0, 30.0, 44.0], [0.0, 0.0, 20.0, 20.0]]), "labels": torch.tensor([2, 1])}]


@pytest.mark.parametrize("build", [detection.retinanet_resnet50_fpn, detection.fcos_resnet50_fpn], ids=["retinanet", "fcos"])
def test_a_detector_trains_after_surgery_where_its_python_calls_the_heads_loss(build):
    torch.manual_seed(0)
    model = build(weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64).eval()
    result = fxs.apply(model, [Freeze("backbone", bn="eval")], example_inputs=(IMAGES,))
    assert result.coverage()["opaque"]["head"] == ("the Python code around it reads its 'compute_loss', which a graph "
                                                   "of its forward does not hold")
    assert type(result.module.head) is type(model.head)
    hand = copy.deepcopy(model).train()  # the same surgery by hand: the backbone frozen, its BatchNorms in eval mode
    for sub in hand.backbone.modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm):
            sub.eval()
    hand.backbone.requires_grad_(False)
    got = result.module.train()
    torch.manual_seed(1)
    want = hand(IMAGES, TARGETS)
    torch.manual_seed(1)
    losses = got(IMAGES, TARGETS)
    assert list(losses) == list(want) and all(torch.equal(losses[k], want[k]) for k in want)
    sum(losses.values()).backward()
    sum(want.values()).backward()
    ours, theirs = dict(got.named_parameters()), dict(hand.named_parameters())
    assert all(ours[n].grad is None for n in ours if n.startswith("backbone."))
    assert all(torch.equal(ours[n].grad, theirs[n].grad) for n in ours if n.startswith("head."))


class Head(nn.Module):
    scale_c = 2.0  # read as a class constant

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)

    def forward(self, x):
        return self.fc(x)

    def loss(self, y):
        return y.pow(2).mean() * self.scale_c

    @property
    def scale(self):
        return 3.0


class Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.head, self.heads = Head(), nn.ModuleDict({"a": nn.Linear(4, 4)})

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: this code stays Python
            x = x * 2
        for _, layer in self.heads.items():  # a container's own method: no reason to keep it Python
            x = layer(x)
        return self.head.loss(self.head(x))


class Reads(Base):
    def __init__(self, how):
        super().__init__()
        self.how = how

    def forward(self, x):
        if self.how == "super":
            return super().forward(x)
        y = self.head(x * 2 if x.sum() > 0 else x)
        if self.how == "getattr":
            return getattr(self.head, "loss")(y)  # noqa: B009 - the form under test
        if self.how == "property":
            return y.sum() * self.head.scale
        return y.sum() * self.head.scale_c


@pytest.mark.parametrize("how", ["super", "getattr", "property", "constant"])
def test_what_the_python_reads_of_a_child_by_other_ways_keeps_it_a_module(how):
    """getattr(self.head, "loss"), a base forward run by super(), a property and a class constant of the child:
    each failed at apply ("'GraphModule' object has no attribute 'loss'"); a ModuleDict's items() keeps nothing."""
    torch.manual_seed(0)
    model, x = Reads(how), torch.randn(3, 4).abs()
    result = fxs.apply(model, [Freeze("heads")], example_inputs=(x,))
    assert torch.equal(result.module(x), model(x)) and type(result.module.head) is Head
    assert sorted(result.coverage()["opaque"]) == ["", "head"] and isinstance(result.module.heads, nn.ModuleDict)
