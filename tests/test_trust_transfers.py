"""Transfers keep what the original said about its tensors.

- A non-persistent buffer (Llama's rotary inv_freq) stays non-persistent: the
  original's state_dict loads strictly into the result, and a save lists it.
- A new module gets the dtype and device of what it replaces: a bf16 or fp16
  model stays runnable, and its saved copy too.
- weights="keep" on one side of a tie (a GPT head sharing wte's Parameter)
  keeps the tie, or refuses saying why; it never reports a split tie as
  transferred.
"""

from __future__ import annotations

import json

import pytest
import torch
import torchvision
from torch import nn

import fxsurgery as fxs
from fxsurgery import Replace


def tiny_llama():
    import transformers
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                                      use_cache=False, attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


class Rotary(nn.Module):
    """A hand model with a non-persistent buffer beside a persistent one."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("scale", torch.arange(4.0), persistent=False)
        self.register_buffer("shift", torch.ones(4))

    def forward(self, x):
        return self.fc(x) * self.scale + self.shift


# -- non-persistent buffers ---------------------------------------------------------------------

def test_non_persistent_buffers_stay_non_persistent_in_a_hand_model(tmp_path):
    model = Rotary()
    result = fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=4), weights="keep")],
                       example_inputs=(torch.randn(2, 4),))
    assert list(result.module.state_dict()) == ["shift", "fc.weight", "fc.bias"]
    result.module.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(result.module.scale, torch.arange(4.0))
    result.save(tmp_path / "o")
    assert json.loads((tmp_path / "o" / "surgery.json").read_text())["non_persistent"] == ["scale"]
    loaded = fxs.load(tmp_path / "o")
    loaded.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))


def test_llama_rotary_inv_freq_stays_non_persistent():
    model = tiny_llama()
    ids = torch.randint(0, 100, (1, 8))
    result = fxs.apply(model, [Replace("lm_head", fxs.new(nn.Linear, out_features=10, bias=False))],
                       example_inputs=(ids,))
    original = {k: v for k, v in model.state_dict().items() if not k.startswith("lm_head.")}
    assert not any("inv_freq" in k for k in model.state_dict())
    assert not any("inv_freq" in k for k in result.module.state_dict())
    missing, unexpected = result.module.load_state_dict(original, strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])
    same = fxs.apply(model, [fxs.Freeze("model.embed_tokens")], example_inputs=(ids,))
    same.module.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(same.module(ids).logits if hasattr(same.module(ids), "logits") else same.module(ids)["logits"],
                           model(ids).logits)


# -- dtype and device of new modules -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_new_module_takes_the_dtype_it_replaces(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
    x = torch.randn(2, 8, dtype=dtype)
    result = fxs.apply(model, [Replace("2", fxs.new(nn.Linear, out_features=10))], example_inputs=(x,))
    assert result.module.get_submodule("2").weight.dtype == dtype
    assert result.report.entry("2.weight").dtype == str(dtype).replace("torch.", "")
    assert result.module(x).shape == (2, 10) and result.module(x).dtype == dtype


def test_a_bf16_resnet18_keeps_running_after_a_new_head(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).to(torch.bfloat16).eval()
    x = torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)
    result = fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=10))], example_inputs=(x,))
    assert {p.dtype for p in result.module.parameters()} == {torch.bfloat16}
    out = result.module(x)
    assert out.shape == (1, 10) and out.dtype == torch.bfloat16
    result.save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o").eval()
    assert torch.equal(loaded(x), out)


def test_an_inserted_module_takes_the_dtype_of_its_neighbour():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4)).to(torch.float16)
    x = torch.randn(2, 8, dtype=torch.float16)
    result = fxs.apply(model, [fxs.Insert(fxs.new(nn.LayerNorm), after="0")], example_inputs=(x,))
    assert {p.dtype for p in result.module.parameters()} == {torch.float16}
    assert result.module(x).dtype == torch.float16


# -- ties ------------------------------------------------------------------------------------------

class TiedLM(nn.Module):
    """GPT-style: the head's weight is the embedding's Parameter."""

    def __init__(self, vocab=20, dim=8):
        super().__init__()
        self.wte = nn.Embedding(vocab, dim)
        self.body = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.wte.weight

    def forward(self, ids):
        return self.head(torch.relu(self.body(self.wte(ids))))


def test_keep_on_a_tied_head_keeps_the_tie(tmp_path):
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 20, (2, 5))
    result = fxs.apply(model, [Replace("head", fxs.new(nn.Linear, out_features=20, bias=False), weights="keep")],
                       example_inputs=(ids,))
    module = result.module
    assert module.head.weight is module.wte.weight
    assert torch.equal(module.head.weight, model.wte.weight) and torch.equal(module(ids), model(ids))
    entry = result.report.entry("head.weight")
    assert (entry.status, entry.source) == ("transferred", "head.weight")
    result.save(tmp_path / "o")
    assert json.loads((tmp_path / "o" / "surgery.json").read_text())["ties"] == {"head.weight": "wte.weight"}
    loaded = fxs.load(tmp_path / "o")
    assert loaded.head.weight is loaded.wte.weight


def test_keep_on_both_sides_of_a_tie_keeps_it():
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 20, (2, 5))
    result = fxs.apply(model, [Replace("wte", fxs.new(nn.Embedding, num_embeddings=20, embedding_dim=8), weights="keep"),
                               Replace("head", fxs.new(nn.Linear, out_features=20, bias=False), weights="keep")],
                       example_inputs=(ids,))
    assert result.module.head.weight is result.module.wte.weight
    assert torch.equal(result.module(ids), model(ids))


def test_keep_that_would_split_a_tie_refuses_with_the_reason():
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 20, (2, 5))
    with pytest.raises(fxs.TransferError) as err:
        fxs.apply(model, [Replace("wte", fxs.new(nn.Embedding, num_embeddings=20, embedding_dim=8, dtype=torch.float64),
                                  weights="keep")], example_inputs=(ids,))
    assert err.value.full.startswith("rule 1 'replace wte with Embedding(num_embeddings=20, embedding_dim=8, dtype=torch.float64)' (")
    assert err.value.full.endswith(
        "): weights 'keep' would untie wte.weight from head.weight (one tensor in the original): the replacement's is "
        "[20, 8] float64 on cpu, that one [20, 8] float32 on cpu; fix: build the replacement to match it, "
        "or use weights: new for an untied tensor")
    with pytest.raises(fxs.ValidateError) as err:  # a float64 head would not even run on the float32 features
        fxs.apply(model, [Replace("head", fxs.new(nn.Linear, out_features=20, bias=False, dtype=torch.float64),
                                  weights="keep")], example_inputs=(ids,))
    assert str(err.value).endswith("at node 'head': Linear holds float64 weights and receives float32; fix: build it in float32 "
                                   "(.to(torch.float32)), or with fxs.new, which takes the model's dtype")


def test_slice_of_a_tied_head_says_it_unties():
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 20, (2, 5))
    with pytest.warns(fxs.SurgeryWarning) as said:  # said, not only in the report
        result = fxs.apply(model, [Replace("head", fxs.new(nn.Linear, out_features=10, bias=False), weights="slice")],
                           example_inputs=(ids,))
    label = result.plan.matches[0].label
    assert [str(w.message) for w in said] == [
        f"{label}: head.weight and wte.weight are one tensor in the original; its weights policy makes a new head.weight, "
        "so they are untied (wte.weight keeps the original's); fix: replace wte too to keep them one tensor (a kept "
        "transformers model trims both)"]
    entry = result.report.entry("head.weight")
    assert entry.status == "adapted"
    assert entry.op.startswith("slice [20, 8] -> [10, 8] (untied from wte.weight) by rule 1 ")
    assert torch.equal(result.module.head.weight, model.wte.weight[:10])


def test_keep_on_an_untied_head_is_a_plain_copy():  # the must-not-match twin
    torch.manual_seed(0)
    model = TiedLM()
    model.head.weight = nn.Parameter(model.wte.weight.detach().clone())
    ids = torch.randint(0, 20, (2, 5))
    result = fxs.apply(model, [Replace("head", fxs.new(nn.Linear, out_features=20, bias=False), weights="keep")],
                       example_inputs=(ids,))
    assert result.module.head.weight is not result.module.wte.weight
    assert result.report.entry("head.weight").op.startswith("kept by rule 1 ")
