"""LoRA by rules next to PEFT's: `[Freeze("*"), Rewrite(AddLoRA(r, alpha), select=...)]` on a kept Llama.

Against `peft.get_peft_model(model, LoraConfig(r, lora_alpha, target_modules))`
on the same model: the same trainable parameters (count and shapes), equal
outputs at initialisation (B = 0), and equal outputs once both get the same
A and B (W x + alpha/r B A x).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import apply, ids, llama, logits

from fxsurgery import AddLoRA, Freeze, Rewrite

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

R, ALPHA = 4, 8.0
TARGETS = ["q_proj", "v_proj"]


def both():
    model = llama()
    result = apply(model, [Freeze("*"), Rewrite(AddLoRA(R, ALPHA), select="re:.*\\.(q_proj|v_proj)")])
    theirs = peft.get_peft_model(copy.deepcopy(model), peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=TARGETS,
                                                                       lora_dropout=0.0)).eval()
    return model, result, theirs


def pairs(ours, theirs):
    """(our A, our B, their A, their B) per adapted projection, matched by path."""
    out = []
    for path, sub in ours.named_modules():
        if hasattr(sub, "lora_a"):
            twin = theirs.base_model.model.get_submodule(path)
            out.append((sub.lora_a.weight, sub.lora_b.weight, twin.lora_A["default"].weight, twin.lora_B["default"].weight))
    return out


def test_lora_by_rules_trains_what_peft_trains_and_computes_what_it_computes():
    model, result, theirs = both()
    got = result.module
    ours_trainable = result.trainable_parameters()
    peft_trainable = [p for p in theirs.parameters() if p.requires_grad]
    assert sum(p.numel() for p in ours_trainable) == sum(p.numel() for p in peft_trainable) == 4 * (R * (32 + 32) + R * (32 + 16))  # 4 layers, q: 32 -> 32, v: 32 -> 16
    assert sorted(tuple(p.shape) for p in ours_trainable) == sorted(tuple(p.shape) for p in peft_trainable)
    assert len(result.report.new) == len(ours_trainable) == 16 and len(pairs(got, theirs)) == 8

    x = ids(2, 7)
    assert torch.equal(logits(got, x), logits(model, x))  # B = 0: both start as the model
    assert torch.equal(logits(theirs, x), logits(model, x))

    torch.manual_seed(1)
    with torch.no_grad():
        for a, b, their_a, their_b in pairs(got, theirs):
            a.copy_(torch.randn_like(a))
            b.copy_(torch.randn_like(b))
            their_a.copy_(a)
            their_b.copy_(b)
    ours, reference = logits(got, x), logits(theirs, x)
    assert not torch.allclose(ours, logits(model, x), atol=1e-3)
    assert torch.allclose(ours, reference, atol=1e-5, rtol=0)
