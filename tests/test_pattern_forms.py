"""DAG patterns with several outputs, inputs bound to constants of the code, and attribute reads.

Each positive case has a hand-written reference and a must-not-match twin.
"""

import pytest
import torch
from torch import nn

import fxsurgery as fxs
from fxsurgery import Rewrite, RuleError


class Adds(nn.Module):
    def forward(self, x):
        b = torch.add(torch.add(x, 2), 3)
        return torch.sigmoid(b) * torch.relu(b)


class AddTwo(fxs.Pattern):
    """`torch.add(x, n)` where n is a constant equal to 2 becomes a subtraction."""

    constants = {"n": lambda v: v == 2}

    def pattern(self, x, n):
        return torch.add(x, n)

    def rewrite(self, *matched):
        return lambda x, n: torch.sub(x, n)


def test_an_input_binds_a_constant_that_passes_its_test():
    x = torch.randn(6)
    result = fxs.apply(Adds(), [Rewrite(AddTwo())], example_inputs=(x,))
    b = x - 2 + 3
    assert torch.equal(result.module(x), torch.sigmoid(b) * torch.relu(b))
    assert result.plan.matches[0].count == 1
    assert result.plan.matches[0].near == ["at add_1 (add): n = 3 fails the pattern's test"]


class TwoInputs(nn.Module):
    def forward(self, x, y):
        return torch.relu(torch.add(x, y))


def test_example_inputs_never_make_a_model_input_a_constant():
    x, y = torch.randn(4), torch.randn(4)
    # twin: an input that must be a constant does not bind the model's second input
    result = fxs.apply(TwoInputs(), [Rewrite(AddTwo(), optional=True)], example_inputs=(x, y))
    assert result.plan.matches[0].count == 0
    assert result.plan.matches[0].near == ["at add (add): n is bound to y (y), not to a constant"]

    class AnyAdd(AddTwo):
        constants = None
    result = fxs.apply(TwoInputs(), [Rewrite(AnyAdd())], example_inputs=(x, y))
    assert torch.equal(result.module(x, y), torch.relu(x - y))   # y reached the replacement as an input, not as its example value
    other = torch.randn(4)
    assert torch.equal(result.module(x, other), torch.relu(x - other))


class SigmoidAndRelu(fxs.Pattern):
    pattern = staticmethod(lambda a: (torch.sigmoid(a), torch.relu(a)))

    def rewrite(self, *matched):
        return lambda a: (torch.tanh(a), torch.abs(a))


def test_a_pattern_with_two_outputs():
    x = torch.randn(6)
    result = fxs.apply(Adds(), [Rewrite(SigmoidAndRelu())], example_inputs=(x,))
    b = x + 2 + 3
    assert torch.equal(result.module(x), torch.tanh(b) * torch.abs(b))
    assert [s.nodes for s in result.plan.matches[0].sites] == [("sigmoid", "relu")]


class Apart(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x) * torch.relu(x + 1)


def test_must_not_match_twin_two_outputs_of_different_values():
    x = torch.randn(6)
    result = fxs.apply(Apart(), [Rewrite(SigmoidAndRelu(), optional=True)], example_inputs=(x,))
    assert result.plan.matches[0].count == 0
    assert torch.equal(result.module(x), Apart()(x))


class Shifted(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.randn(5))

    def forward(self, x):
        return torch.relu(x + self.a) + 1


class MinusAttribute(fxs.Pattern):
    """`x + <a tensor attribute>` becomes `x - attribute`; the attribute stays in the model."""

    def __init__(self):
        self.t = torch.zeros(1)

    def pattern(self, x):
        return x + self.t

    def rewrite(self, *matched):
        return lambda x, a: x - a


def test_a_pattern_that_reads_a_tensor_attribute():
    model, x = Shifted(), torch.randn(5)
    result = fxs.apply(model, [Rewrite(MinusAttribute())], example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(result.module(x), torch.relu(x - model.a) + 1)
    assert result.report.transferred == ["a"]
    # twin: `+ 1` reads a number, not an attribute: only the first add matches
    assert [s.nodes for s in result.plan.matches[0].sites] == [("add",)]
    assert "add_1 (add): 1 is not a tensor attribute of the model" in " ".join(result.plan.matches[0].near)


def test_constants_must_name_an_input():
    class Wrong(AddTwo):
        constants = {"m": None}
    with pytest.raises(RuleError) as err:
        Rewrite(Wrong())
    assert str(err.value).endswith("pattern Wrong: constants names 'm', which is not an input of the pattern; fix: name one of x, n")



class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(self.lin(x))


class Scaled(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) * 2


class WrapBlock(fxs.Pattern):
    pattern = (Block,)

    def rewrite(self, block):
        return Scaled(block)


def test_a_pattern_wrapping_a_module_with_children_leaves_the_original_whole():
    """A wrapped leaf with children (here by leaf_types) had its children swapped for the result's copies inside the
    user's own model."""
    torch.manual_seed(0)
    model, x = nn.Sequential(Block(), nn.ReLU()), torch.randn(2, 8)
    lin = model[0].lin
    result = fxs.apply(model, [fxs.Rewrite(WrapBlock())], example_inputs=(x,), leaf_types=(Block,))
    assert model[0].lin is lin and model[0].lin.weight is lin.weight
    assert result.module.get_submodule("0.lin").weight is not lin.weight  # Scaled is inlined: its Block sits at 0
    assert torch.equal(result.module(x), torch.relu(model[0](x) * 2))
    assert {e.status for e in result.report.entries} == {"transferred"}
