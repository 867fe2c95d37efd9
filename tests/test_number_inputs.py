"""A float the model takes (a scale, a temperature) stays an input of the result, whatever the example gave it.

The rewritten module, its saved graph and its model.py take the number at call time and give the
original's outputs at every value; a pattern written with an input for it matches. Where the code needs
a Python number from it (a branch), or where the argument is an int or a flag, the graph holds the
example's value and a call with another one is refused in one line naming the argument.
"""

import importlib.util
import inspect
import json
import math
import uuid

import pytest
import torch
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze, Rewrite


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale: float = 1.0):
        return self.lin(x) * scale


class Tempered(nn.Module):
    """The float reaches a wrapped function (`math.sqrt`), a fill value, a keyword and an exponent."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, temperature: float = 1.0, eps: float = 1e-5):
        y = self.lin(x) / math.sqrt(temperature) + torch.full((4,), eps)
        return torch.nn.functional.leaky_relu(y, eps) + x.clamp(min=eps).pow(temperature)


def _import_model_py(directory):
    spec = importlib.util.spec_from_file_location(f"saved_{uuid.uuid4().hex}", directory / "model.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    return code.Model.load(str(directory))


X = torch.randn(3, 4)


@pytest.mark.parametrize("example", [dict(example_inputs=(X, 0.5)), dict(example_inputs=(X,), example_kwargs={"scale": 0.5}),
                                     dict(example_inputs=(X,))], ids=["positional", "keyword", "default"])
def test_a_float_input_stays_an_input(example, tmp_path):
    model = Scaled().eval()
    result = fxs.apply(model, [Freeze("lin")], keep_class=False, **example)
    placeholders = [n for n in result.module.graph.nodes if n.op == "placeholder"]
    assert [(n.target, n.args) for n in placeholders] == [("x", ()), ("scale", (1.0,))]   # the default kept
    result.save(tmp_path / "o")
    loaded, imported = fxs.load(tmp_path / "o"), _import_model_py(tmp_path / "o")
    with torch.no_grad():
        for scale in (0.5, 2.0, -1.25, 0.0):
            expected = model(X, scale)
            for module in (result.module, loaded, imported):
                assert torch.equal(module(X, scale), expected)
                assert torch.equal(module(X, scale=scale), expected)
        for module in (result.module, loaded, imported):
            assert torch.equal(module(X), model(X))   # the default, 1.0, not the example's 0.5


def test_floats_through_functions_keywords_and_fills(tmp_path):
    model = Tempered().eval()
    result = fxs.apply(model, [Freeze("lin")], example_inputs=(X,), example_kwargs={"temperature": 2.0, "eps": 0.1},
                       keep_class=False)
    result.save(tmp_path / "o")
    imported = _import_model_py(tmp_path / "o")
    with torch.no_grad():
        for temperature, eps in [(2.0, 0.1), (4.0, 0.3), (0.5, 1e-5)]:
            expected = model(X, temperature, eps)
            assert torch.equal(result.module(X, temperature, eps), expected)
            assert torch.equal(imported(X, temperature=temperature, eps=eps), expected)


class Double(fxs.Pattern):
    """`y * s` for any s (a graph input included) becomes `y * (2 * s)`."""

    def pattern(self, y, s):
        return y * s

    def rewrite(self, *matched):
        return lambda y, s: y * (2 * s)


def test_a_pattern_with_an_input_for_the_float_matches():
    model = Scaled().eval()
    result = fxs.apply(model, [Rewrite(Double())], example_inputs=(X, 0.5), keep_class=False)
    assert result.plan.matches[0].count == 1
    with torch.no_grad():
        for scale in (0.5, 3.0):
            assert torch.equal(result.module(X, scale), model(X, 2 * scale))


class Branching(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale: float = 1.0, rows: int = 2):
        y = self.lin(x)[:rows]
        if scale != 1.0:   # Python decides on the float: the graph holds this branch
            y = y * scale
        return y


def test_a_decision_on_the_float_or_an_int_is_guarded_by_name():
    model = Branching().eval()
    result = fxs.apply(model, [Freeze("lin")], example_inputs=(X, 0.5), keep_class=False)
    with torch.no_grad():
        for scale in (0.5, 2.0, -3.0):   # every value on the branch the example took
            assert torch.equal(result.module(X, scale), model(X, scale))
        with pytest.raises(AssertionError) as err:
            result.module(X, 1.0)
        line = inspect.getsourcelines(Branching.forward)[1] + 2
        assert str(err.value).startswith(f"'the model' was captured where `scale != 1.0` is True at tests/test_number_inputs.py:{line} "
                                         "(if scale != 1.0:")
        with pytest.raises(AssertionError) as err:
            result.module(X, 0.5, rows=3)
    assert str(err.value) == ("the model was captured with rows=2 and this call gives another rows; fix: capture with rows set "
                              "as you will call it, e.g. example_kwargs={'rows': ...}")


def test_exports_that_hold_numbers_as_constants_say_so(tmp_path):
    model = Scaled().eval()
    result = fxs.apply(model, [Freeze("lin")], example_inputs=(X, 0.5), keep_class=False)
    result.save(tmp_path / "o", formats=("pt2", "torchscript"))
    # torch.export takes a float only as a constant: the record names it and its value
    formats = json.loads((tmp_path / "o" / "surgery.json").read_text())["formats"]
    assert formats["pt2"]["fixed"] == {"scale": 0.5} and "fixed" not in formats["torchscript"]
    program = torch.export.load(str(tmp_path / "o" / "model.pt2")).module()
    script = torch.jit.load(str(tmp_path / "o" / "model.torchscript.pt"))
    with torch.no_grad():
        assert torch.equal(program(X, 0.5), model(X, 0.5))
        for scale in (0.5, 2.0):   # TorchScript takes the float at call time
            assert torch.equal(script(X, scale), model(X, scale))


class DataDependent(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x   # no graph holds this: the module stays opaque


class PartlyTraced(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.sign = DataDependent()

    def forward(self, x, scale: float = 1.0):
        return self.sign(self.lin(x)) * scale


@pytest.mark.parametrize("example", [dict(example_inputs=(X, 0.5)), dict(example_inputs=(X,), example_kwargs={"scale": 0.5})],
                         ids=["positional", "keyword"])
def test_a_float_stays_an_input_of_a_model_with_opaque_parts(example):
    model = PartlyTraced().eval()
    result = fxs.apply(model, [Freeze("lin")], keep_class=False, **example)
    assert result.capture.opaque == {"sign": "TraceError: control flow depends on tensor values (data-dependent), which no graph "
                                             "can hold (at tests/test_number_inputs.py:"
                                             f"{inspect.getsourcelines(DataDependent.forward)[1] + 1})"}
    with torch.no_grad():
        for scale in (0.5, 2.0):
            assert torch.equal(result.module(X, scale), model(X, scale))
            assert torch.equal(result.module(X, scale=scale), model(X, scale=scale))
