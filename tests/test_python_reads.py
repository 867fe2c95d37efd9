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
