"""Every corpus model, rewritten once, at three batch sizes (and three sequence lengths) in both modes.

Each model is captured once, on the corpus's own example (batch 1), with a rule
set that changes it: a new classifier head where the model is a classifier, an
activation type swapped for another elsewhere, and everything frozen. The
reference is the original with the result's new modules put in place; both
run at batch sizes 1, 2 and 3 and, for the text models, at sequence lengths 5,
8 and the maximum position of the tiny config, in eval mode (atol 1e-5) and in
train mode (the same seed before each call: dropout draws the same masks).

Where the model's root stays Python (torchvision's detection models and RAFT:
their forward loops over a list of images, or iterates refinement steps with
data-dependent shapes, which torch.fx cannot follow), the rewritten model is
that Python calling graphs captured on the calls the example made: it is
compared at every size where those graphs take the call, and elsewhere refuses
with a one-line error naming the module captured for another call form (never a
wrong output): Faster R-CNN's RoI pooling graph was captured on one image's
boxes and refuses two images. Detection in train mode wants targets, which
the original refuses without as well.

A quick subset (QUICK) runs by default; `pytest -m "slow or not slow"
tests/test_corpus_sizes.py` runs all 42.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from corpus import ACTIVATIONS, CORPUS, VOCAB
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze, Replace

BATCHES = (1, 2, 3)
SWAP = {"ReLU": nn.GELU, "GELU": nn.ReLU, "SiLU": nn.GELU, "Hardswish": nn.ReLU}
TWO_HEADS = {"timm/levit_128": "re:head(_dist)?\\.linear", "timm/crossvit_9_240": "re:head\\.[01]",
             "timm/efficientformer_l1": "re:head(_dist)?"}
CLASSIFIERS = ("timm", "torchvision-video")
# The default run's subset: each capture path (whole trace, walker, size-1 batches captured again at 2,
# LeViT's train-mode heads, captured on a batch of 2 as BatchNorm1d takes no batch of one) at a small cost; the rest (GFLOPs per image, or seconds per pass) are slow.
QUICK = {"tv/deeplabv3_mobilenet_v3_large", "tv/lraspp_mobilenet_v3_large", "timm/efficientnet_b0",
         "timm/levit_128", "timm/regnety_002", *(c.name for c in CORPUS if c.family == "transformers")}
# Models whose root forward stays Python, and why (see the module docstring).
PYTHON_ROOT = {"torchvision-detection": "the forward loops over a list of images of any size",
               "torchvision-flow": "the refinement loop reads values of tensors"}


def cases():
    return [pytest.param(c, id=c.name, marks=[] if c.name in QUICK else [pytest.mark.slow]) for c in CORPUS]


def _max_length(model: nn.Module) -> int | None:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions", "max_target_positions"):
        if config is not None and isinstance(getattr(config, key, None), int):
            return getattr(config, key)
    return 64 if config is not None else None  # T5: relative positions, no maximum; 64 as the others


def sized(case, batch: int, length: int | None, seed: int) -> tuple:
    """The case's example call at another batch size (and sequence length for its token ids)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for value in case.inputs():
        if isinstance(value, list):  # detection: one image per list item
            out.append([torch.rand(value[0].shape, generator=gen) for _ in range(batch)])
        elif value is None:
            out.append(None)
        elif value.dtype == torch.int64:
            out.append(torch.randint(0, VOCAB, (batch, length or value.shape[1]), generator=gen))
        else:
            out.append(torch.randn((batch, *value.shape[1:]), generator=gen))
    return tuple(out)


def rules_for(case, model: nn.Module) -> list:
    rules = []
    if case.activations:
        old = next(c for c in ACTIVATIONS if c.__name__ == case.activations[0])
        rules.append(Replace(old, SWAP[old.__name__]))
    if case.head and (case.family in CLASSIFIERS or case.name.startswith("hf/")):
        original = model.get_submodule(case.head)
        spec = (fxs.new(nn.Linear, out_features=7) if isinstance(original, nn.Linear)
                else fxs.new(type(original), out_channels=7, kernel_size=original.kernel_size))
        rules.append(Replace(TWO_HEADS.get(case.name, case.head), spec))
    if not rules:  # transformers' own activation classes (GELUActivation, QuickGELUActivation)
        kind = next(type(m) for m in model.modules() if type(m).__name__.endswith("GELUActivation"))
        rules.append(Replace(kind, nn.ReLU))
    return [*rules, Freeze("*")]


def reference(model: nn.Module, result) -> nn.Module:
    """The original with each module the rules replaced swapped for the result's."""
    ref = copy.deepcopy(model)
    for match in result.plan.matches:
        for path in match.modules if isinstance(match.rule, Replace) else ():
            parent, _, name = path.rpartition(".")
            setattr(ref.get_submodule(parent) if parent else ref, name, result.module.get_submodule(path))
    return ref


def _text_inputs(result) -> set[str]:
    root = result.capture.regions[0]
    return {n for n, v in zip(root.input_names(), root.example_inputs) if getattr(v, "dtype", None) == torch.int64}


def tensors(out):
    return out if isinstance(out, tuple) else (out,)


def run(model, case, inputs, train: bool):
    model.train(train)
    torch.manual_seed(7)
    with torch.no_grad():
        return tensors(case.output(model(*inputs)))


@pytest.mark.parametrize("case", cases())
def test_corpus_model_at_any_size_in_both_modes(case):
    model = case.build()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxs.apply(model, rules_for(case, model), example_inputs=case.inputs(), keep_class=False)
    assert any(m.modules for m in result.plan.matches if isinstance(m.rule, Replace))
    assert not any(p.requires_grad for p in result.module.parameters())
    python_root = case.family in PYTHON_ROOT
    assert python_root == ("" in result.capture.opaque)
    # no decision pins the batch (GPT-2's and Llama's size-1 branch included: captured again at 2), nor a length
    pinned = {(name, dim) for name, dims in result.capture.specialised(ones=False).items() for dim in dims}
    assert not [(name, dim) for name, dim in pinned if dim == 0 or case.family == "transformers" and dim == 1
                and name in _text_inputs(result)], pinned
    ref = reference(model, result)
    longest = _max_length(model)
    lengths = (5, 8, longest) if longest else (None,)
    compared, refused, skipped = 0, [], []
    for train in (False, True):
        for batch in BATCHES:
            for length in lengths:
                inputs = sized(case, batch, length, seed=batch * 100 + (length or 0))
                try:
                    want = run(ref, case, inputs, train)
                except Exception:  # the original refuses it too (BatchNorm on one value per channel, no targets)
                    skipped.append((train, batch))
                    continue
                if python_root:
                    try:
                        got = run(result.module, case, inputs, train)
                    except (AssertionError, RuntimeError) as err:  # a graph under it was captured for another call
                        assert "was captured" in str(err) and "\n" not in str(err), err
                        refused.append((train, batch))
                        continue
                else:
                    got = run(result.module, case, inputs, train)
                assert len(got) == len(want)
                for g, w in zip(got, want):
                    assert g.shape == w.shape
                    assert torch.allclose(g, w, atol=1e-5), (case.name, train, batch, length, (g - w).abs().max())
                compared += 1
    if python_root:  # at the example's size at least, in eval mode
        assert compared and (False, 1) not in refused, refused
    else:  # everywhere the original runs: only train-mode BatchNorm on one value per channel refuses
        assert not refused and compared + len(skipped) == 2 * len(BATCHES) * len(lengths)
        assert all(train and batch == 1 for train, batch in skipped), skipped
