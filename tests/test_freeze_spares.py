"""A Freeze's `except` must name something: one that selects nothing froze the head it meant to spare, silently."""

import pytest
import torch
import torchvision
from hf_models import llama
from test_bad_inputs import run_cli

import fxsurgery as fxs
from fxsurgery import Freeze, MatchError

pytest.importorskip("transformers")

IDS = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


def test_freeze_backbone_on_a_model_without_fc_names_the_param_and_the_models_head():
    with pytest.raises(MatchError) as err:
        fxs.apply(llama(), ["freeze-backbone"], example_inputs=(IDS,))
    origin = str(err.value).split("' (")[1].split(")")[0]
    assert origin.endswith("rules/freeze-backbone.yaml:8")
    assert str(err.value) == (f"rule 1 'freeze * except fc (bn: eval)' ({origin}): except 'fc' selects no module, so it spares "
                              "nothing (39 of 39 parameters would freeze); fix: set the file's param: --set head=lm_head, "
                              "the model's last Linear (params={'head': ...} in Python)")


def test_the_param_it_names_spares_the_head():
    result = fxs.apply(llama(), ["freeze-backbone"], params={"head": "lm_head"}, example_inputs=(IDS,))
    assert [n for n, p in result.module.named_parameters() if p.requires_grad] == ["lm_head.weight"]


def test_an_except_naming_a_parameter_points_to_its_module():
    with pytest.raises(MatchError, match=r"^rule 1 'freeze \* except lm_head.weight' \(tests/test_freeze_spares.py:36\): except 'lm_head.weight' "
                                         r"selects no module, so it spares nothing \(39 of 39 parameters would freeze\); "
                                         r"closest: lm_head; fix: correct the selector or add 'optional: true'$"):
        fxs.apply(llama(), [Freeze("*", exclude="lm_head.weight")], example_inputs=(IDS,))


def test_each_exception_of_a_list_must_select_something():
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with pytest.raises(MatchError, match=r"except 'layer9\.\*' selects no module, so it spares nothing \(60 of 62 parameters"):
        fxs.apply(model, [Freeze("*", exclude=["fc", "layer9.*"])], example_inputs=(x,))
    # optional: the exceptions that select something still spare, as before
    result = fxs.apply(model, [Freeze("*", exclude=["fc", "layer9.*"], optional=True)], example_inputs=(x,))
    assert [n for n, p in result.module.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]


def test_the_cli_exits_with_the_fix_and_writes_nothing(tmp_path):
    code, out, err, _ = run_cli(["apply", "torchvision.models:mobilenet_v3_small", "freeze-backbone", "--input", "1x3x64x64",
                                 "-o", str(tmp_path / "out")])
    assert code != 0 and "Traceback" not in err
    assert "except 'fc' selects no module" in err and "fix: set the file's param: --set head=classifier.3, the model's last Linear" in err
    assert not (tmp_path / "out").exists()


def test_an_except_may_name_a_module_an_earlier_rule_adds():
    """Replace(fc, Sequential) then Freeze('*', exclude=['fc.2']): the check looked at the original model only."""
    from torch import nn
    model = nn.Sequential()
    model.add_module("body", nn.Linear(4, 8))
    model.add_module("fc", nn.Linear(8, 3))
    rules = [fxs.Replace("fc", nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))), Freeze("*", exclude=["fc.2"])]
    result = fxs.apply(model, rules, example_inputs=(torch.randn(2, 4),))
    assert [n for n, p in result.module.named_parameters() if p.requires_grad] == ["fc.2.weight", "fc.2.bias"]
