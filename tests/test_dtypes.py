"""A captured model follows its dtype as the original does: `.to(torch.bfloat16)`, `.half()`, `.float()`."""

import copy

import pytest
import torch
from torch import nn

import fxsurgery as fxs


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, h):
        dtype = h.dtype
        h = h.to(torch.float32)   # an upcast written in the code: stays float32
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        return self.weight * h.to(dtype)   # back to the input's dtype: follows it


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.norm, self.lin = nn.Embedding(10, 8), Norm(), nn.Linear(8, 4)

    def forward(self, ids):
        h = self.emb(ids)
        if h.shape[1] > 1:   # a decision on a size (transformers' mask code makes them): the capture follows values
            h = h * 1.0
        return self.lin(self.norm(h))


class Masked(Decoder):
    def forward(self, ids):
        h = self.emb(ids)
        if h.shape[1] > 1:
            h = h + torch.finfo(h.dtype).tiny   # a number Python needs from the dtype: the graph asserts the dtype
        return self.lin(h)


@pytest.mark.parametrize("captured, run", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float16)])
def test_a_graph_follows_the_dtype_it_is_cast_to(captured, run):
    """`h.to(h.dtype)` was written into the graph as the example's dtype: a model captured in bfloat16 and made
    float ran parts in bfloat16 (1.9e-3 off), one captured in float32 and made bfloat16 failed in a matmul."""
    torch.manual_seed(0)
    model = Decoder().eval().to(captured)
    result = fxs.apply(model, [], example_inputs=(torch.randint(0, 10, (2, 5)),))
    assert f"torch.{str(captured).split('.')[1]}" not in result.module.code.replace("torch.float32)", "")
    ids = torch.randint(0, 10, (3, 7))
    want = copy.deepcopy(model).to(run)(ids)
    got = copy.deepcopy(result.module).to(run)(ids)
    assert got.dtype == run and torch.equal(got, want)


def test_a_dtype_python_needs_is_asserted_not_followed_silently():
    torch.manual_seed(0)
    model = Masked().eval()
    result = fxs.apply(model, [], example_inputs=(torch.randint(0, 10, (2, 5)),))
    ids = torch.randint(0, 10, (3, 7))
    assert torch.equal(result.module(ids), model(ids))
    with pytest.raises(AssertionError) as err:
        copy.deepcopy(result.module).to(torch.bfloat16)(ids)
    assert str(err.value) == ("'the model' was captured where `emb.dtype` is torch.float32 at tests/test_dtypes.py:40 (h = h + "
                              "torch.finfo(h.dtype).tiny   # a number Python needs from the dtype: the graph asserts the dtype); "
                              "this call gives another value, and the graph holds only the code for that one; fix: capture again "
                              "with the model in the dtype you run it in, or make the module running that line a leaf (leaf_paths=)")


def test_a_transformers_decoder_captured_in_float32_runs_in_bfloat16():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=128, vocab_size=100, use_cache=False)
    llama = transformers.LlamaForCausalLM(config).eval()
    result = fxs.apply(llama, [fxs.Freeze("model.embed_tokens")], example_inputs=(torch.randint(0, 100, (2, 8)),), keep_class=False)
    ids = torch.randint(0, 100, (2, 8))
    with torch.no_grad():
        want = copy.deepcopy(llama).to(torch.bfloat16)(ids).logits
        got = copy.deepcopy(result.module).to(torch.bfloat16)(ids).logits
    assert got.dtype == torch.bfloat16 and torch.equal(got, want)
