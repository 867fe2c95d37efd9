"""Papercuts of the third round: call-form models that return a NamedTuple save and load, TorchScript takes
unannotated defaults, messages that say what differs and keep their fix."""

import os
import typing

import pytest
import torch
from torch import nn

import fxsurgery as fxs
from fxsurgery import Replace, SaveError


class Scores(typing.NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor


class TwoInputs(nn.Module):
    """Takes `y` after a parameter left at its default: captured in call form (its graph's signature could not be Python)."""

    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, scale=None, y=None):
        h = torch.relu(self.body(x + y))
        return Scores(self.fc(h), h)


def _two_inputs():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    result = fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=5))], example_inputs=(x,), example_kwargs={"y": y})
    return result, x, y


def test_a_call_form_model_returning_a_namedtuple_saves_and_loads(tmp_path):
    result, x, y = _two_inputs()
    want = result.module(x, y=y)
    assert type(want) is Scores and want.logits.shape == (2, 5)
    result.save(tmp_path / "out")
    assert "OUTPUT = pytree.tree_structure(test_papercuts_3.Scores(0, 0))" in (tmp_path / "out" / "model.py").read_text()
    loaded = fxs.load(tmp_path / "out", trust_code=True)
    got = loaded(x, y=y)
    assert type(got) is Scores
    assert torch.equal(got.logits, want.logits) and torch.equal(got.features, want.features)
    with pytest.raises(SaveError) as err:  # graph.json cannot hold the call form: the message says so and how to load
        fxs.load(tmp_path / "out")
    assert str(err.value) == (f"{tmp_path / 'out'}: graph.json cannot describe this model (it is called through a call adapter that "
                              "model.py implements), so loading it means importing model.py; fix: read model.py and load with "
                              "trust_code=True (--trust-code) if you trust it")


def test_a_namedtuple_model_py_cannot_import_is_one_line_and_writes_nothing(tmp_path):
    Local = typing.NamedTuple("Local", [("a", torch.Tensor)])
    Local.__qualname__ = "maker.<locals>.Local"  # as a class defined inside a function is named

    class Returns(TwoInputs):
        def forward(self, x, scale=None, y=None):
            return Local(self.fc(torch.relu(self.body(x + y))))

    torch.manual_seed(0)
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    result = fxs.apply(Returns().eval(), [Replace("fc", nn.Linear(8, 2))], example_inputs=(x,), example_kwargs={"y": y})
    with pytest.raises(SaveError) as err:
        result.save(tmp_path / "out")
    assert str(err.value) == ("cannot write model.py: the output is a Local, defined in a function, which model.py cannot "
                              "import; fix: define it at the top level of an importable module")
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == []


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, k=2, bias=0.5):
        return self.fc(torch.relu(self.body(x)) * k + bias)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_exports_a_forward_with_unannotated_number_defaults(tmp_path):
    torch.manual_seed(0)
    model = Scaled().eval()
    x = torch.randn(2, 4)
    result = fxs.apply(model, [fxs.Freeze("body")], example_inputs=(x,))
    code_before = result.module.code
    result.save(tmp_path / "out", formats=["torchscript"])
    assert result.module.code == code_before  # the annotations were for TorchScript only
    scripted = torch.jit.load(str(tmp_path / "out" / "model.torchscript.pt"))
    assert torch.equal(scripted(x), model(x)) and torch.equal(scripted(x, 2, 0.5), model(x, 2, 0.5))
    args = scripted.forward.schema.arguments  # self, x, k, bias
    assert [(a.name, str(a.type), a.default_value) for a in args[2:]] == [("k", "int", 2), ("bias", "float", 0.5)]


def test_an_inner_call_refused_for_a_list_of_other_length_says_both_lengths():
    """Faster R-CNN captured on 2 images refuses 3 at roi_heads.box_roi_pool, which takes one boxes tensor per image."""
    from torch.utils import _pytree as pytree
    from torchvision.ops import MultiScaleRoIAlign

    from fxsurgery.capture import mismatch, normalise, signature_of
    pool = MultiScaleRoIAlign(["0"], 7, 2)
    signature = signature_of(pool)
    features, sizes = {"0": torch.randn(2, 4, 8, 8)}, [(32, 32), (32, 32)]

    def boxes(n):
        return [torch.rand(5, 4) for _ in range(n)]
    leaves, spec = pytree.tree_flatten(normalise(signature, (features, boxes(2), sizes), {}))
    fixed = {i: v for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)}
    assert mismatch(signature, spec, fixed, (features, boxes(3), sizes), {}, "roi_heads.box_roi_pool") == (
        "'roi_heads.box_roi_pool' was captured with boxes=a list of 2 tensors and this call gives boxes=a list of 3 tensors; "
        "fix: capture with example inputs that make the model call it this way")
    # its twin: the captured length is the captured call, nothing to refuse
    again, again_spec = pytree.tree_flatten(normalise(signature, (features, boxes(2), sizes), {}))
    assert again_spec == spec
