"""A loop over the pieces of a split (`for t in x.unbind(1)`, `torch.split`, `chunk`) runs as many times as the
example's size gave: the graph asserts that count, so a call at another size is refused, not computed short."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fxsurgery as fxs
from fxsurgery import Insert

transformers = pytest.importorskip("transformers")


class Steps(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell, self.act = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        h = torch.zeros_like(x[:, 0])
        for t in x.unbind(1):
            h = torch.tanh(self.cell(h) + t)
        return self.act(h)


class Pairs(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        return self.act(self.lin(torch.stack([p.sum(1) for p in torch.split(x, 2, dim=1)], 1)))


class Later(nn.Module):
    """Every step after the first: a slice of the pieces is as many less one."""

    def __init__(self):
        super().__init__()
        self.cell, self.act = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        steps = torch.ops.aten.unbind.int(x, 1)
        h = steps[0]
        for t in steps[1:]:
            h = torch.tanh(self.cell(h) + t)
        return self.act(h)


class Count(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.act = nn.Linear(4, 4), nn.ReLU()

    def forward(self, x):
        return self.act(self.lin(x)) * len(x.chunk(x.shape[1], dim=1))


@pytest.mark.parametrize("cls, length, other, pieces, name, probed", [(Steps, 3, 5, 3, "unbind", True), (Pairs, 6, 10, 3, "split", False),
                                                                       (Count, 3, 5, 3, "chunk", True),
                                                                       (Later, 3, 6, 2, r"unbind_int\[slice\(1, None, None\)\]", True)])
def test_a_loop_over_split_pieces_is_refused_at_another_count(cls, length, other, pieces, name, probed):
    torch.manual_seed(0)
    model = cls().eval()
    result = fxs.apply(model, [Insert(nn.Identity(), after="act")], example_inputs=(torch.randn(2, length, 4),))
    for x in (torch.randn(2, length, 4), torch.randn(7, length, 4)):  # the batch stays general
        assert torch.equal(result.module(x), model(x))
    with pytest.raises(AssertionError, match=rf"was captured where `len\({name}\)` is {pieces} at .*test_split_loops.py"):
        result.module(torch.randn(2, other, 4))  # it computed {pieces} steps of {other} before, without a word
    assert list(result.specialised) == ["x"] and list(result.specialised["x"]) == [1]
    declared = dict(example_inputs=(torch.randn(2, length, 4),), dynamic_shapes={"x": {1: "seq"}})
    if probed:  # a count that changes with the next size up: the declared dim is refused at capture
        with pytest.raises(fxs.ModelError, match=rf"declares dim 1 of input 'x' dynamic, but the code decides `len\({name}\)` is {pieces}"):
            fxs.apply(model, [Insert(nn.Identity(), after="act")], **declared)
    else:  # pairs of 6 and of 5 are both 3: the probe finds no change, and the graph's assertion refuses the call
        declared = fxs.apply(model, [Insert(nn.Identity(), after="act")], **declared)
        with pytest.raises(AssertionError, match=rf"`len\({name}\)` is {pieces}"):
            declared.module(torch.randn(2, other, 4))


def test_bert_chunked_feed_forward_refuses_a_length_it_would_cut():
    """transformers' apply_chunking_to_forward splits the sequence into chunks: captured at length 8 with chunks
    of 4, a call at 12 or 16 kept 2 chunks and returned 8 tokens, 4 or 8 of them lost after the first layer."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64, chunk_size_feed_forward=4)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    result = fxs.apply(model, [fxs.Freeze("embeddings")], example_inputs=(ids,), keep_class=False)
    for x in (ids, torch.randint(0, 100, (3, 8))):
        assert torch.equal(result.module(x)["last_hidden_state"], model(x).last_hidden_state)
    for length in (12, 16):
        with pytest.raises(AssertionError, match=r"`len\(chunk\)` is 2 at transformers/pytorch_utils.py"):
            result.module(torch.randint(0, 100, (2, length)))
