"""Every model of the corpus: captured, reproduced, frozen, swapped, re-headed.

The quick cases run in CI; `pytest -m "slow or not slow" tests/test_corpus.py`
runs all 42.
"""

import warnings

import pytest
import torch
from corpus import ACTIVATIONS, CORPUS
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze, Replace

# Models with two classifier heads (a distillation head beside the class head)
HEADS = {"timm/levit_128": "re:head(_dist)?\\.linear", "timm/crossvit_9_240": "re:head\\.[01]",
         "timm/efficientformer_l1": "re:head(_dist)?"}
CLASSIFIERS = ("timm", "torchvision-video")
SWAP = {"ReLU": nn.GELU, "GELU": nn.ReLU, "SiLU": nn.GELU, "Hardswish": nn.ReLU}


def cases():
    return [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in CORPUS]


def tensors(out):
    return out if isinstance(out, tuple) else (out,)


def count(module, cls):
    return sum(1 for m in module.modules() if isinstance(m, cls))


@pytest.mark.parametrize("case", cases())
def test_corpus_model(case):
    model = case.build()
    inputs = case.inputs()
    trainable = [p.requires_grad for p in model.parameters()]  # Whisper ships a frozen position table
    with torch.no_grad():
        want = tensors(case.output(model(*inputs)))

    # An empty rule list reproduces the original, bit for bit.
    result = fxs.apply(model, [], example_inputs=inputs, keep_class=False)
    with torch.no_grad():
        got = tensors(case.output(result.module(*inputs)))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    coverage = result.coverage()
    assert coverage["traced_share"] > 0.35, coverage

    # One surgery: swap an activation type everywhere, a new head, freeze everything.
    rules = []
    if case.activations:
        old = next(c for c in ACTIVATIONS if c.__name__ == case.activations[0])
        new = SWAP[old.__name__]
        rules.append(Replace(old, new))
    head = case.family in CLASSIFIERS or case.name == "hf/vit" or case.name.startswith("hf/") and case.head
    if case.head and head:
        original = model.get_submodule(case.head)
        spec = (fxs.new(nn.Linear, out_features=7) if isinstance(original, nn.Linear)
                else fxs.new(type(original), out_channels=7, kernel_size=original.kernel_size))
        rules.append(Replace(HEADS.get(case.name, case.head), spec))
    rules.append(Freeze("*"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edited = fxs.apply(model, rules, example_inputs=inputs, keep_class=False)
    with torch.no_grad():
        out = tensors(case.output(edited.module(*inputs)))
    assert not any(p.requires_grad for p in edited.module.parameters())
    assert [p.requires_grad for p in model.parameters()] == trainable
    if case.activations:
        assert count(edited.module, old) == 0
        assert count(edited.module, new) == count(model, new) + count(model, old)
    if case.head and head:
        assert out[0].shape[-1] == 7
        swapped = next(m for m in edited.plan.matches if m.rule is rules[-2]).modules
        assert swapped
        for path in swapped:  # each new head reads the width of the head it replaced
            old_head, new_head = model.get_submodule(path), edited.module.get_submodule(path)
            assert getattr(new_head, "out_features", getattr(new_head, "out_channels", None)) == 7
            assert getattr(new_head, "in_features", None) == getattr(old_head, "in_features", None)
            assert getattr(new_head, "in_channels", None) == getattr(old_head, "in_channels", None)
