"""What a kept transformers model keeps outside its tensors follows an edit, or its save is refused.

Each case was a silent wrong answer: the result in memory, or the model
`from_pretrained` rebuilt from the saved directory, computed something else
than the edit made by hand, with every tensor in place.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import apply, gpt2, ids, llama, logits
from torch import nn

import fxsurgery as fxs
from fxsurgery import Layers, Replace

transformers = pytest.importorskip("transformers")


def gemma():
    torch.manual_seed(0)
    config = transformers.GemmaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      head_dim=16, intermediate_size=64, vocab_size=100, bos_token_id=1, eos_token_id=2,
                                      pad_token_id=0)
    return transformers.GemmaForCausalLM(config).eval()


def test_a_trimmed_scaled_embedding_keeps_its_class_scale_and_padding_row(tmp_path):
    """Gemma's embedding multiplies its rows by sqrt(hidden): the plain nn.Embedding of the trim recipe dropped that
    (0.51 off the original's logits, even for a trim keeping every row in place) and the pad row trained."""
    model = gemma()
    rows = [5, 0, *range(1, 5), *range(6, 100, 3)]  # pad 0 becomes token 1
    result = apply(model, [Replace("model.embed_tokens", nn.Embedding(len(rows), 64), weights={"select": rows})])
    got = result.module
    embedding = got.model.embed_tokens
    assert type(embedding) is type(model.model.embed_tokens) and embedding.padding_idx == 1 == got.config.pad_token_id
    assert torch.equal(embedding.embed_scale, model.model.embed_tokens.embed_scale) and embedding.embed_scale.item() == 8.0
    label = result.plan.matches[0].label
    assert result.report.notes[1:3] == [
        f"model.embed_tokens: a GemmaTextScaledWordEmbedding as before, whose forward is its own, as from_pretrained rebuilds it ({label})",
        f"model.embed_tokens.padding_idx: 1, the pad token's row (0 in the old embedding) ({label})"]
    x = ids(2, 9, vocab=len(rows))
    old_x = torch.tensor(rows)[x]
    assert torch.allclose(logits(got, x), logits(model, old_x)[..., rows], atol=1e-5, rtol=0)  # the tied head's rows too
    embedding(x).sum().backward()  # the head tied to it trains every row, as the original's does
    assert not embedding.weight.grad[1].any() and embedding.weight.grad[0].any()  # the pad row no more than it did
    result.save(tmp_path / "out")
    loaded = transformers.GemmaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(loaded, x), logits(got, x))


def test_forced_and_suppressed_token_ids_follow_their_rows():
    """BART's forced_eos_token_id stayed the old id: every generation reaching max_length ended on another token."""
    model = gpt2()
    model.generation_config.forced_eos_token_id = 99
    model.generation_config.suppress_tokens = [3, 98]
    rows = [*range(50, 100), *range(50)]
    result = apply(model, [Replace("transformer.wte", nn.Embedding(100, 32), weights={"select": rows})])
    config = result.module.generation_config
    assert (config.forced_eos_token_id, config.suppress_tokens, config.eos_token_id) == (49, [53, 48], 49)
    label = result.plan.matches[0].label
    assert f"generation_config.forced_eos_token_id: 99 -> 49 ({label})" in result.report.notes
    assert (model.generation_config.forced_eos_token_id, model.generation_config.suppress_tokens) == (99, [3, 98])


def test_a_new_head_on_a_tied_model_is_untied_in_the_config_too(tmp_path):
    """A new lm_head left config.tie_word_embeddings True: resize_token_embeddings (after adding tokens) or
    tie_weights() put the input embedding back in the new head's place (logits off by 1.88)."""
    model = llama(tie=True)
    torch.manual_seed(1)
    result = apply(model, [Replace("lm_head", nn.Linear(32, 100, bias=False))])
    got = result.module
    assert got.config.tie_word_embeddings is False and model.config.tie_word_embeddings is True
    assert result.report.notes[1:] == ["config.tie_word_embeddings: True -> False: lm_head.weight is a tensor of its own now"]
    x = ids(2, 6)
    want = logits(got, x)
    resized = copy.deepcopy(got)
    resized.resize_token_embeddings(100)
    assert torch.equal(logits(resized, x), want) and resized.lm_head.weight is not resized.model.embed_tokens.weight
    result.save(tmp_path / "out")
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(loaded, x), want) and loaded.lm_head.weight is not loaded.model.embed_tokens.weight


def gpt_neo():
    torch.manual_seed(0)
    config = transformers.GPTNeoConfig(hidden_size=32, num_layers=4, num_heads=4, vocab_size=100, max_position_embeddings=64,
                                       attention_types=[[["global", "local"], 2]], window_size=4)
    return transformers.GPTNeoForCausalLM(config).eval()


def smollm3():
    torch.manual_seed(0)
    config = transformers.SmolLM3Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        intermediate_size=64, vocab_size=100, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        no_rope_layers=[1, 1, 1, 0], max_position_embeddings=64)
    return transformers.SmolLM3ForCausalLM(config).eval()


@pytest.mark.parametrize("build, path, order, key, want", [
    (gpt_neo, "transformer.h", [1, 0, 2, 3], "attention_layers", ["local", "global", "global", "local"]),
    (gpt_neo, "transformer.h", [0, 2], "attention_layers", ["global", "global"]),
    (smollm3, "model.layers", [0, 3], "no_rope_layers", [1, 0]),
], ids=["gpt-neo-permuted", "gpt-neo-deleted", "smollm3-deleted"])
def test_a_layer_edit_moves_the_per_layer_settings_and_the_cache_slot(build, path, order, key, want, tmp_path):
    """GPT-Neo's kind of attention per layer and SmolLM3's rotation per layer stayed in the old order: from_pretrained
    rebuilt the layers otherwise (0.145 off), or could not (4 kinds for 3 layers); GPT-Neo's layer_id (its cache
    slot) stayed too, which failed a deletion."""
    model = build()
    result = apply(model, [Layers(path, order=order)])
    got = result.module
    assert getattr(got.config, key) == want
    hand = copy.deepcopy(model)
    stack = hand.get_submodule(path)
    stack_parent, _, name = path.rpartition(".")
    setattr(hand.get_submodule(stack_parent), name, nn.ModuleList([copy.deepcopy(stack[i]) for i in order]))
    x = ids(2, 9)
    assert torch.equal(logits(got, x, use_cache=False), logits(hand, x, use_cache=False))
    tokens = got.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # the cache, slot by slot
    assert torch.equal(tokens, got.generate(x, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False))
    result.save(tmp_path / "out")
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    assert getattr(loaded.config, key) == want and torch.equal(logits(loaded, x, use_cache=False), logits(got, x, use_cache=False))


def test_a_save_the_config_would_rebuild_otherwise_is_refused(tmp_path):
    """An activation swapped in a kept Llama: from_pretrained builds SiLU from the config, and the reload silently
    computed the original's activation."""
    result = apply(llama(), [Replace("model.layers.0.mlp.act_fn", nn.GELU())])
    with pytest.raises(fxs.SaveError) as err:
        result.save(tmp_path / "out")
    assert str(err.value) == ("LlamaForCausalLM: its config builds 'model.layers.0.mlp.act_fn' as SiLUActivation, here a GELU, "
                              "so from_pretrained would reload another model; fix: apply with keep_class=False "
                              "(--no-keep-class; saved as model.py + safetensors) to the model built with config.use_cache=False")
    assert not (tmp_path / "out").exists()


def test_what_the_library_itself_leaves_stale_does_not_refuse_a_save(tmp_path):
    """The save check compares with the original, path by path: DistilBERT's unused copy of n_layers after a layer
    edit, and the model.vocab_size resize_token_embeddings leaves behind, were refused though they reload right."""
    torch.manual_seed(0)
    config = transformers.DistilBertConfig(vocab_size=100, dim=32, n_layers=2, n_heads=2, hidden_dim=37)
    distil = transformers.DistilBertForSequenceClassification(config).eval()
    resized = llama()
    resized.resize_token_embeddings(128)
    for name, model, rules in [("distil", distil, [Layers("distilbert.transformer.layer", order=[1])]),
                               ("resized", resized, [fxs.Freeze("model.layers.0")])]:
        result = apply(model, rules)
        result.save(tmp_path / name)
        loaded = type(model).from_pretrained(tmp_path / name).eval()
        x = ids(2, 7)
        assert torch.equal(logits(loaded, x), logits(result.module, x)), name
