"""keras-surgeon's delete / insert / replace scenarios, rebuilt in torch and run through fxsurgery.

Ported from BenWhetton/keras-surgeon, tests/test_surgeon.py (each test names
its case there). keras-surgeon compares the edited model with one built by
hand (config and weights); here the reference is the hand-built torch module
with the same weights, and outputs are compared bit for bit.
"""

import pytest
import torch
from torch import nn

import fxsurgery as fxs
from fxsurgery import Delete, Insert, Replace


def dense(n_in=3, n_out=3):
    return nn.Linear(n_in, n_out)


class Chain(nn.Module):
    """Layers called in the order given by `calls` (names may repeat: a layer reused)."""

    def __init__(self, layers: dict, calls: list):
        super().__init__()
        self.layers = nn.ModuleDict(layers)
        self.calls = calls

    def forward(self, x):
        for name in self.calls:
            x = self.layers[name](x)
        return x


def _same(a, b, x):
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def test_delete_layer():
    torch.manual_seed(0)
    layers = {"conv2d_1": nn.Conv2d(1, 3, 3), "conv2d_2": nn.Conv2d(3, 3, 3), "flatten_1": nn.Flatten(),
              "dense_1": dense(27), "dense_2": dense(), "dense_3": dense(), "dense_4": dense(3, 1)}
    model = Chain(layers, list(layers))
    expected = Chain(layers, [n for n in layers if n != "dense_2"])
    x = torch.randn(2, 1, 7, 7)
    result = fxs.apply(model, [Delete("layers.dense_2")], example_inputs=(x,))
    assert _same(result.module, expected, x)
    assert result.report.dropped == ["layers.dense_2.weight", "layers.dense_2.bias"]


def test_delete_layer_reuse():
    # dense_2 is called twice; deleting the layer deletes both calls
    torch.manual_seed(0)
    layers = {"dense_1": dense(), "dense_2": dense(), "dense_3": dense(), "dense_4": dense()}
    model = Chain(layers, ["dense_1", "dense_2", "dense_3", "dense_2", "dense_4"])
    expected = Chain(layers, ["dense_1", "dense_3", "dense_4"])
    x = torch.randn(2, 3)
    result = fxs.apply(model, [Delete("layers.dense_2")], example_inputs=(x,))
    assert _same(result.module, expected, x)
    assert result.plan.matches[0].count == 2


def test_replace_layer():
    torch.manual_seed(0)
    layers = {"dense_1": dense(1), "dense_2": dense(), "dense_4": dense(3, 1)}
    dense_3 = dense()
    model = Chain(layers, list(layers))
    expected = Chain({**layers, "dense_2": dense_3}, list(layers))
    x = torch.randn(2, 7, 7, 1)
    result = fxs.apply(model, [Replace("layers.dense_2", dense_3)], example_inputs=(x,))
    assert _same(result.module, expected, x)
    assert result.report.dropped == ["layers.dense_2.weight", "layers.dense_2.bias"]
    # the replacement is a copy: the rule's own module is never the one the new model trains
    assert result.module.get_submodule("layers.dense_2") is not dense_3


def test_insert_layer():
    torch.manual_seed(0)
    layers = {"dense_1": dense(1), "dense_2": dense(), "dense_4": dense(3, 1)}
    dense_3 = dense()
    model = Chain(layers, list(layers))
    expected = Chain({**layers, "dense_3": dense_3}, ["dense_1", "dense_2", "dense_3", "dense_4"])
    x = torch.randn(2, 7, 7, 1)
    result = fxs.apply(model, [Insert(dense_3, before="layers.dense_4")], example_inputs=(x,))
    assert _same(result.module, expected, x)
    assert len(result.report.new) == 2   # the inserted layer's weight and bias, declared new by the rule


class TwoOutputs(nn.Module):
    """dense_4 applied to two branches; the model returns both."""

    def __init__(self, with_dense_3=True):
        super().__init__()
        self.dense_1, self.dense_2, self.dense_4 = dense(10), dense(), dense(3, 1)
        self.dense_3 = dense() if with_dense_3 else None

    def forward(self, x):
        x = self.dense_1(x)
        y = self.dense_2(x)
        if self.dense_3 is not None:
            x = self.dense_3(x)
        return self.dense_4(x), self.dense_4(y)


def test_delete_layer_same_layer_outputs():
    torch.manual_seed(0)
    model = TwoOutputs()
    expected = TwoOutputs(with_dense_3=False)
    expected.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("dense_3")})
    x = torch.randn(2, 10)
    result = fxs.apply(model, [Delete("dense_3")], example_inputs=(x,))
    with torch.no_grad():
        got, want = result.module(x), expected(x)
    assert isinstance(got, tuple) and all(torch.equal(g, w) for g, w in zip(got, want))


def test_delete_layer_that_changes_the_width_is_refused_at_plan_time():
    # Deliberate difference: keras-surgeon rebuilds the model and fails inside Keras when the next layer no longer
    # fits; fxsurgery refuses before anything is built, naming the layer, the shape and the fix
    torch.manual_seed(0)
    layers = {"flatten_1": nn.Flatten(), "dense_1": dense(27), "dense_2": dense()}
    model = Chain(layers, list(layers))
    with pytest.raises(fxs.ValidateError) as err:
        fxs.apply(model, [Delete("layers.dense_1")], example_inputs=(torch.randn(2, 3, 3, 3),))
    assert str(err.value).endswith("at node 'layers_dense_2' [call_module]: Linear(in_features=3, out_features=3, bias=True) does not "
                                   "fit the incoming shape [2, 27]; fix: replace this layer too (fxs.new infers its input size), "
                                   "or insert a layer that maps the shape")
