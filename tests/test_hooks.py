"""Hooks a user registered on the model: the result runs them as the original does, and a save that
would lose them refuses instead of writing a model that computes something else."""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import bert, ids
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze
from fxsurgery.errors import bounded


def hooked() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Linear(3, 3), nn.ReLU()), nn.Dropout(0.5), nn.Linear(3, 2))
    model.register_forward_pre_hook(lambda m, args: (args[0] + 1,))                      # the root: around the graph
    model.register_forward_hook(lambda m, args, kwargs, out: out * 2 + 7, with_kwargs=True)
    model[1].register_forward_hook(lambda m, args, out: out + 100)                      # traced through
    model[3].register_forward_pre_hook(lambda m, args: (args[0] * 0.5,))                # a leaf, called
    return model.eval()


@pytest.mark.parametrize("example", [True, False])
def test_the_result_runs_the_hooks_the_original_runs(example):
    model, x = hooked(), torch.randn(4, 3)
    result = fxs.apply(model, [Freeze("0")], example_inputs=(x[:2],) if example else None)
    with torch.no_grad():
        assert torch.equal(result.module(x), model(x))
        result.module.train()
        model.train()
        torch.manual_seed(1)
        trained = model(x)
        torch.manual_seed(1)
        assert torch.equal(result.module(x), trained)  # the dropout follows the mode, the hooks still run
    # each hook once: the root's are carried, not added again by a second surgery of the same model
    assert len(result.module._forward_hooks) == len(result.module._forward_pre_hooks) == 1
    # a deep copy (an EMA model) runs them too: torch.fx's rebuilt the root without its own hooks
    model.eval(), result.module.eval()
    for copied in (copy.deepcopy(result.module), copy.deepcopy(copy.deepcopy(result.module))):
        with torch.no_grad():
            assert torch.equal(copied(x), model(x))
        assert copied.get_parameter("0.weight") is not result.module.get_parameter("0.weight")


def test_a_loaded_model_keeps_hooks_registered_on_it_through_a_deep_copy(tmp_path):
    torch.manual_seed(0)
    model, x = nn.Sequential(nn.Linear(3, 3), nn.ReLU()), torch.randn(4, 3)
    fxs.apply(model, [], example_inputs=(x,)).save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o")
    loaded.register_forward_hook(lambda m, args, out: out - 5)
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(loaded)(x), model(x) - 5)


def test_a_save_that_would_lose_hooks_is_refused_and_writes_nothing(tmp_path):
    model, x = hooked(), torch.randn(4, 3)
    result = fxs.apply(model, [Freeze("0")], example_inputs=(x,))
    with pytest.raises(fxs.SaveError) as err:
        result.save(tmp_path / "o")
    assert str(err.value) == bounded(
        "(the model), 3: run hooks registered on the model, which model.py and graph.json do not rebuild, so the saved "
        "model would compute without them; fix: remove the hooks (handle.remove()) before saving and register them again "
        "after loading")
    assert list(tmp_path.iterdir()) == []
    for sub in result.module.modules():  # the fix the message gives
        sub._forward_hooks.clear()
        sub._forward_pre_hooks.clear()
    result.save(tmp_path / "o")
    reference = hooked()  # without the hooks removed: those of the root and of the leaf; the one traced through stays in the graph
    for sub in (reference, reference[3]):
        sub._forward_hooks.clear()
        sub._forward_pre_hooks.clear()
    with torch.no_grad():
        assert torch.equal(result.module(x), reference(x))
        assert torch.equal(fxs.load(tmp_path / "o")(x), reference(x))


def test_a_kept_class_keeps_its_hooks_and_save_pretrained_refuses_to_lose_them(tmp_path):
    model, x = bert(), ids(2, 8)
    model.bert.pooler.register_forward_hook(lambda m, args, out: out * 0)
    result = fxs.apply(model, [Freeze("bert.embeddings")], example_inputs=(x,))
    with torch.no_grad():
        assert torch.equal(result.module(x).logits, model(x).logits)
        assert torch.equal(result.module(x).logits, model.classifier.bias.expand(2, -1))  # pooled output zeroed: the bias
    with pytest.raises(fxs.SaveError) as err:
        result.save(tmp_path / "o")
    assert str(err.value).startswith("bert.pooler: run hooks registered on the model, which from_pretrained does not rebuild")
    assert list(tmp_path.iterdir()) == []


def test_hooks_that_see_other_values_or_cannot_be_carried_are_said():
    import warnings

    model, x = hooked(), torch.randn(4, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxs.apply(model, [fxs.Output({"1": "features", "3": "logits"})], example_inputs=(x,))
    label = result.plan.matches[0].label
    assert f"{label} changes what the model takes or returns, and the hooks registered on the model, which run around the " \
           "result too, see the new values; fix: check them, or remove them (handle.remove())" in [str(w.message) for w in caught]
    old_style = nn.Sequential(nn.Linear(3, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's own deprecation warning
        old_style.register_backward_hook(lambda m, gin, gout: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxs.apply(old_style, [Freeze("0")], example_inputs=(x,))
    assert "the model's register_backward_hook hooks (torch's deprecated kind) are not carried to the result; fix: register " \
           "them on result.module with register_full_backward_hook" in [str(w.message) for w in caught]
