"""The result returns the containers the original did: torch.fx writes every dict as a plain one."""

import collections
import importlib.util
import uuid

import torch
import torchvision
from torch import nn

import fxsurgery as fxs


class Nested(nn.Module):
    """An OrderedDict inside a tuple, and one handed to a submodule that reads its order."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.first = First()

    def forward(self, x):
        y = self.fc(x)
        table = collections.OrderedDict(b=y, a=x)
        return self.first(table), collections.OrderedDict(z=y.relu(), y=y)


class First(nn.Module):
    def forward(self, table):
        assert type(table) is collections.OrderedDict  # traced through: the graph builds the same table
        return next(iter(table.values())) * 2


def _import_model_py(directory):
    spec = importlib.util.spec_from_file_location(f"saved_{uuid.uuid4().hex}", directory / "model.py")
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    return code.Model.load(str(directory))


def _same(got, want):
    assert type(got) is type(want)
    if isinstance(want, dict):
        assert list(got) == list(want)
        for k in want:
            _same(got[k], want[k])
    elif isinstance(want, tuple):
        assert len(got) == len(want)
        for g, w in zip(got, want):
            _same(g, w)
    else:
        assert torch.equal(got, want)


def test_a_segmentation_model_returns_an_ordered_dict_through_surgery_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, [fxs.Freeze("backbone.*")], example_inputs=(x[:1],))
    with torch.no_grad():
        want = model(x)
        assert type(want) is collections.OrderedDict
        _same(result.module(x), want)
        result.save(tmp_path / "o", formats=("pt2",))
        _same(fxs.load(tmp_path / "o")(x), want)
        _same(_import_model_py(tmp_path / "o")(x), want)
        _same(torch.export.load(tmp_path / "o" / "model.pt2").module()(x), want)


def test_ordered_dicts_nested_in_the_output_and_passed_inside_keep_their_type_and_order(tmp_path):
    torch.manual_seed(0)
    model = Nested()
    x = torch.randn(3, 4)
    result = fxs.apply(model, [], example_inputs=(x,))
    with torch.no_grad():
        want = model(x)
        _same(result.module(x), want)
        result.save(tmp_path / "o")
        _same(fxs.load(tmp_path / "o")(x), want)
        _same(_import_model_py(tmp_path / "o")(x), want)
