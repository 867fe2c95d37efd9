"""Tiny transformers models and the by-hand edits the keep_class tests compare with.

Every builder seeds itself, so two calls give the same weights; nothing is
downloaded. The by-hand edits are what a user writes without fxsurgery: a new
ModuleList of copies, new embeddings with the kept rows, the configuration
set directly.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

import fxsurgery as fxs

try:
    import transformers
except ImportError:  # the tests that need it skip themselves
    transformers = None

VOCAB = 100


def llama(tie=False):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64,
                                      tie_word_embeddings=tie)
    return transformers.LlamaForCausalLM(config).eval()


def qwen2():
    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=64)
    return transformers.Qwen2ForCausalLM(config).eval()


def gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=4, n_head=2, vocab_size=VOCAB, bos_token_id=98, eos_token_id=99)
    return transformers.GPT2LMHeadModel(config).eval()


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37,
                                     vocab_size=VOCAB)
    return transformers.BertForSequenceClassification(config).eval()


def t5():
    torch.manual_seed(0)
    config = transformers.T5Config(d_model=32, d_kv=8, d_ff=64, num_layers=4, num_decoder_layers=4, num_heads=4,
                                   vocab_size=VOCAB, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return transformers.T5ForConditionalGeneration(config).eval()


def ids(batch, length, seed=1, vocab=VOCAB):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def relayer(hand, path, order, counts=("num_hidden_layers",)):
    """Rearrange the list at `path` of `hand` in place: copies in `order`, each layer_idx its position."""
    stack = hand.get_submodule(path)
    parent, _, name = path.rpartition(".")
    setattr(hand.get_submodule(parent), name, nn.ModuleList([copy.deepcopy(stack[i]) for i in order]))
    for key in counts:
        setattr(hand.config, key, len(order))
    for i, layer in enumerate(hand.get_submodule(path)):
        for sub in layer.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = i
    return hand


def by_hand(model, path, order):
    """The layer edit as a user writes it, on a copy."""
    return relayer(copy.deepcopy(model), path, order)


def trim_by_hand(model, rows):
    """The vocabulary cut to `rows` on a copy: new embedding and output rows, vocab_size set, ties kept."""
    hand = copy.deepcopy(model)
    index = torch.tensor(rows)
    old_in, old_out = hand.get_input_embeddings(), hand.get_output_embeddings()
    tied = old_out is not None and old_out.weight is old_in.weight
    embedding = nn.Embedding(len(rows), old_in.embedding_dim)
    embedding.weight.data.copy_(old_in.weight.data[index])
    hand.set_input_embeddings(embedding)
    if old_out is not None:
        head = nn.Linear(old_out.in_features, len(rows), bias=False)
        head.weight = embedding.weight if tied else nn.Parameter(old_out.weight.data[index].clone())
        hand.set_output_embeddings(head)
    hand.config.vocab_size = len(rows)
    for config in (hand.config, getattr(hand, "generation_config", None)):  # an encoder classifier has none
        for key in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
            if config is not None and getattr(config, key, None) in rows:
                setattr(config, key, rows.index(getattr(config, key)))
    return hand


def tensors(module):
    return dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.config.to_dict()


def assert_unchanged(model, before):
    state, config = before
    now = model.state_dict()
    assert list(now) == list(state)
    assert all(torch.equal(now[k], state[k]) for k in state)
    assert model.config.to_dict() == config


def logits(model, x, **kw):
    with torch.no_grad():
        return model(x, **kw).logits


def apply(model, rules, inputs=None, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxs.apply(model, rules, example_inputs=inputs or (ids(1, 5),), **kw)


GENERATE = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, pad_token_id=0)


def generate(model, x):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(x, attention_mask=torch.ones_like(x), **GENERATE)
