"""Rules that overlap where the intent is plain: a module deleted after edits inside it takes them with it."""

import copy

import pytest
import torch
import torchvision
from torch import nn

import fxsurgery as fxs
from fxsurgery import Delete, MatchError, Replace


@pytest.fixture(scope="module")
def resnet50():
    torch.manual_seed(0)
    return torchvision.models.resnet50().eval()


def _by_hand(model):
    """layer4.2 removed and every ReLU a GELU, written the way one would without fxsurgery."""
    h = copy.deepcopy(model)
    h.layer4 = nn.Sequential(*list(h.layer4)[:2])
    for module in list(h.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.GELU())
    return h


def test_type_swap_then_block_delete_equals_the_reverse_and_the_hand_edit(resnet50):
    x = torch.randn(2, 3, 64, 64)
    swap_first = fxs.apply(resnet50, [Replace(nn.ReLU, nn.GELU()), Delete("layer4.2")], example_inputs=(x[:1],))
    delete_first = fxs.apply(resnet50, [Delete("layer4.2"), Replace(nn.ReLU, nn.GELU())], example_inputs=(x[:1],))
    with torch.no_grad():
        want = _by_hand(resnet50)(x)
        assert torch.equal(swap_first.module(x), want)
        assert torch.equal(delete_first.module(x), want)
    # 17 ReLU modules called 49 times; the 3 calls inside layer4.2 go with the block, in either order
    assert [m.count for m in swap_first.plan.matches] == [46, 1]
    assert [m.count for m in delete_first.plan.matches] == [1, 46]
    assert swap_first.report.dropped == delete_first.report.dropped
    # 3 conv weights, 3 BatchNorms' weight, bias, running mean, running var and batch count
    assert len(swap_first.report.dropped) == 3 + 3 * 5 and all(n.startswith("layer4.2.") for n in swap_first.report.dropped)
    assert swap_first.plan.matches[0].skipped[0].startswith("layer4.2.relu (inside layer4.2, which rule 2 'delete layer4.2' (")


def test_must_not_match_twin_the_same_module_twice_still_conflicts(resnet50):
    # not inside: the same call, deleted after it was replaced, has no one obvious meaning
    with pytest.raises(MatchError) as err:
        fxs.apply(resnet50, [Replace(nn.ReLU, nn.GELU()), Delete("layer4.2.relu")], example_inputs=(torch.randn(1, 3, 64, 64),))
    text = str(err.value)
    assert text.startswith("rule 2 'delete layer4.2.relu' (") and "conflicts with rule 1 'replace torch.nn.ReLU with GELU" in text
    assert text.endswith("): node 'layer4_2_relu' was already replaced; fix: drop one of the two rules")
