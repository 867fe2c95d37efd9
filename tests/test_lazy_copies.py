"""Copies made ahead (transfer/_prefetch.py): the result holds the original's values, bit for bit, in its
own memory, whatever happened to an original tensor between its copy and the transfer."""

import threading

import pytest
import torch
from torch import nn
from torchvision.models import resnet18

import fxsurgery as fxs
from fxsurgery.capture import capture
from fxsurgery.match import match
from fxsurgery.rewrite import rewrite
from fxsurgery.spec import Freeze, Layers, Replace
from fxsurgery.transfer import Prefetch, transfer
from fxsurgery.validate import validate


def _rewritten(model, rules, inputs):
    captured = capture(model, inputs)
    return validate(rewrite(captured, match(captured, rules)))


def test_resnet_result_has_copies_equal_to_the_original_bit_for_bit():
    torch.manual_seed(0)
    model = resnet18().eval()
    x = torch.randn(3, 3, 64, 64)
    result = fxs.apply(model, [Freeze("layer1")], example_inputs=(torch.randn(1, 3, 64, 64),))
    original = model.state_dict()
    got = result.module.state_dict()
    assert list(got) == list(original)
    for name, t in got.items():
        assert torch.equal(t, original[name]), name
        assert t.data_ptr() != original[name].data_ptr(), name  # its own memory
        assert t.stride() == original[name].stride(), name
    params = dict(result.module.named_parameters())
    assert all(p.grad_fn is None and p.is_leaf for p in params.values())
    assert [n for n, p in params.items() if not p.requires_grad] == [n for n in params if n.startswith("layer1.")]
    assert torch.equal(result.module(x), model(x))
    assert [t.name for t in threading.enumerate() if t.name == "fxsurgery-prefetch"] == []


@pytest.mark.parametrize("change", ["in place", "data swapped"])
def test_an_original_changed_after_its_copy_is_copied_again(change):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
    rewritten = _rewritten(model, [], (torch.randn(1, 4),))
    ahead = Prefetch.start(model)
    ahead._thread.join()  # every copy made: the changes below come after it
    with torch.no_grad():
        if change == "in place":
            model[0].weight.add_(1.0)
        else:
            model[2].bias.data = torch.full((2,), 7.0)
    module, _ = transfer(rewritten, ahead=ahead)
    for name, t in module.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name
    assert torch.equal(module.get_submodule("2").bias, torch.full((2,), 7.0)) == (change == "data swapped")


class _Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_layer_used_twice_gets_two_copies_of_its_own():
    torch.manual_seed(0)
    model = _Stack().eval()
    result = fxs.apply(model, [Layers("layers", order=[0, 1, 1, 2])], example_inputs=(torch.randn(1, 4),), keep_class=True)
    one, two = result.module.layers[1], result.module.layers[2]
    assert torch.equal(one.weight, model.layers[1].weight) and torch.equal(two.weight, model.layers[1].weight)
    assert len({one.weight.data_ptr(), two.weight.data_ptr(), model.layers[1].weight.data_ptr()}) == 3
    with torch.no_grad():
        one.weight.zero_()
    assert torch.equal(two.weight, model.layers[1].weight)  # the second use was not tied to the first


def test_a_failed_surgery_stops_the_copying_thread():
    model = resnet18().eval()
    with pytest.raises(fxs.errors.FxsError):
        fxs.apply(model, [Replace("no_such_module", nn.Identity())], example_inputs=(torch.randn(1, 3, 64, 64),))
    assert [t.name for t in threading.enumerate() if t.name == "fxsurgery-prefetch"] == []
