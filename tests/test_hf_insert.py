"""In a kept model a replacement or inserted module receives what the original received.

A decoder layer is called by its model's code with hidden_states and, by
name, attention_mask, position_embeddings, the cache...: a replacement gets
all of them; a module inserted before or after a layer gets them too, its
first input the layer's input or output; a copy of a layer inserted into the
layer list joins it (its own KV-cache slot, counted by the configuration).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import apply, generate, ids, llama, logits, relayer, tensors
from torch import nn

import fxsurgery as fxs
from fxsurgery import Insert, Layers, Replace

transformers = pytest.importorskip("transformers")


class Seen(nn.Module):
    """A layer that notes the keywords it is called with."""

    def __init__(self, layer=None):
        super().__init__()
        self.layer, self.keys = layer, None

    def forward(self, hidden_states, *args, **kwargs):
        self.keys = sorted(kwargs)
        return self.layer(hidden_states, *args, **kwargs) if self.layer is not None else hidden_states * 2


def received(model, path, x):
    """The keywords the original's module at `path` is called with."""
    got = {}
    hook = model.get_submodule(path).register_forward_hook(lambda m, a, kw, out: got.update(keys=sorted(kw)), with_kwargs=True)
    model(x)
    hook.remove()
    return got["keys"]


def test_a_replacement_and_inserted_modules_get_the_layers_keywords():
    model = llama()
    x = ids(2, 7)
    keys = received(model, "model.layers.2", x)
    assert {"attention_mask", "position_embeddings"} <= set(keys)
    result = apply(model, [Replace("model.layers.2", Seen(copy.deepcopy(model.model.layers[2]))),
                           Insert(Seen(), before="model.layers.3"), Insert(Seen(), after="model.layers.0")])
    layers = result.module.model.layers
    out = logits(result.module, x)
    assert layers[2].keys == layers[3].before.keys == layers[0].after.keys == keys

    # the reference: layer 3's input and layer 0's output doubled, by hand
    hand = copy.deepcopy(model)
    hand.model.layers[3].register_forward_pre_hook(lambda m, a: (a[0] * 2, *a[1:]))
    hand.model.layers[0].register_forward_hook(lambda m, a, o: o * 2 if torch.is_tensor(o) else (o[0] * 2, *o[1:]))
    assert torch.equal(out, logits(hand, x))


def test_a_module_that_takes_one_input_gets_one():
    model = llama()
    result = apply(model, [Insert(nn.Dropout(0.5), after="model.layers.1")])
    x = ids(2, 7)
    assert torch.equal(logits(result.module.eval(), x), logits(model, x))  # eval: dropout is the identity


@pytest.mark.parametrize("where, order", [("after", [0, 1, 1, 2, 3]), ("before", [0, 1, 1, 2, 3])])
def test_a_copy_of_a_layer_inserted_beside_it_joins_the_list(where, order, tmp_path):
    model = llama()
    result = apply(model, [Insert(copy.deepcopy(model.model.layers[1]), **{where: "model.layers.1"})])
    got, hand = result.module, relayer(copy.deepcopy(model), "model.layers", order)
    via_layers = apply(model, [Layers("model.layers", order=order)]).module
    assert got.config.num_hidden_layers == 5 and len(got.model.layers) == 5
    assert [layer.self_attn.layer_idx for layer in got.model.layers] == [0, 1, 2, 3, 4]
    for batch, length in [(1, 4), (3, 9)]:
        x = ids(batch, length, seed=batch)
        assert torch.equal(logits(got, x), logits(hand, x)) and torch.equal(logits(got, x), logits(via_layers, x))
    x = ids(2, 6)
    assert torch.equal(generate(got, x), generate(hand, x))
    label = result.plan.matches[0].label
    at = 2 if where == "after" else 1
    per_layer = len(list(model.model.layers[0].parameters()))
    assert result.report.counts() == {"transferred": len(tensors(model)), "adapted": 0, "new": per_layer,
                                      "dropped": 0, "frozen": 0}
    assert all(result.report.entry(n).rule == 1 for n in result.report.new)
    assert sorted(result.report.new) == sorted(f"model.layers.{at}.{n}" for n, _ in model.model.layers[0].named_parameters())
    assert result.report.notes[1] == f"config.num_hidden_layers: 4 -> 5 ({label})"
    result.save(tmp_path / "out")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(loaded, x), logits(got, x))


def test_a_module_of_another_class_is_wrapped_not_listed():
    model = llama()
    result = apply(model, [Insert(fxs.new(nn.Identity), after="model.layers.1")])
    assert len(result.module.model.layers) == 4 and result.module.config.num_hidden_layers == 4
    assert type(result.module.model.layers[1]).__name__ == "Around"
