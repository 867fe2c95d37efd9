"""Prune heads: torch.nn.MultiheadAttention (torchvision ViT), BERT, Llama and Qwen2 attention (grouped-query).

A head is removed exactly when the pruned model's outputs equal the
original's with that head's value rows and bias zeroed (it then writes zeros
into the output projection): float64, atol 1e-5, at other batch sizes and
sequence lengths than the ones captured.
"""

import copy

import hf_models as H
import pytest
import torch
import torchvision
from conftest import assert_state_equal, state_copy
from torch import nn

import fxsurgery as fxs
from fxsurgery import Prune
from fxsurgery.errors import RewriteError
from fxsurgery.match import zero_heads
from fxsurgery.spec._load import parse_rules

ATTENTION = "encoder.layers.encoder_layer_1.self_attention"


def vit(seed=0):
    torch.manual_seed(seed)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=4, hidden_dim=32,
                                                 mlp_dim=64, num_classes=5).eval().double()
    nn.init.uniform_(model.heads.head.weight, -0.2, 0.2)  # zero at init: outputs would hide a difference
    return model


def params(module):
    return sum(p.numel() for p in module.parameters())


def check(model, result, path, heads, *inputs):
    """The result equals the original with `heads` of `path` zeroed at their values (and not the original)."""
    reference = zero_heads(copy.deepcopy(model), path, heads)
    with torch.no_grad():
        for x in inputs:
            got, want, before = result.module(*x), reference(*x), model(*x)
            got, want, before = (getattr(v, "logits", v) for v in (got, want, before))
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
            assert not torch.allclose(got, before, atol=1e-5)


def test_vit_heads_exact_with_hand_counted_parameters_and_report():
    model, x = vit(), torch.randn(2, 3, 32, 32).double()
    saved = state_copy(model)
    result = fxs.apply(model, [Prune(ATTENTION, heads=[1, 3])], example_inputs=(x,))
    check(model, result, ATTENTION, [1, 3], (x,), (torch.randn(5, 3, 32, 32).double(),))
    # 4 heads of 8 over embed_dim 32: q, k and v lose 2 x 8 rows of 32 weights and a bias each; out_proj 16 columns of 32
    assert params(model) - params(result.module) == 3 * 16 * (32 + 1) + 16 * 32
    report = result.report
    assert report.adapted == [f"{ATTENTION}.in_proj_weight", f"{ATTENTION}.in_proj_bias", f"{ATTENTION}.out_proj.weight"]
    assert report.entry(f"{ATTENTION}.in_proj_weight").op.startswith(
        "dim 0 keeps 48 of 96: [0-7, 16-23, 32-39, 48-55, 64-71, 80-87] by rule 1")
    assert report.entry(f"{ATTENTION}.out_proj.weight").op.startswith("dim 1 keeps 16 of 32: [0-7, 16-23] by rule 1")
    assert report.entry(f"{ATTENTION}.out_proj.bias").status == "transferred" and not report.dropped and not report.new
    kept = model.get_submodule(ATTENTION).in_proj_weight[[*range(8), *range(16, 24)]]
    assert torch.equal(result.module.get_submodule(ATTENTION).in_proj_weight[:16], kept)
    assert_state_equal(model, saved)  # the user's model is never modified
    with torch.no_grad():  # no dropout in ViT's attention: training mode computes the same (the other layer's kernels differ)
        torch.testing.assert_close(result.module.train()(x), result.module.eval()(x), rtol=0, atol=1e-12)


def test_vit_heads_saved_loaded_and_replayed_on_another_checkpoint(tmp_path):
    model, x = vit(), torch.randn(2, 3, 32, 32).double()
    result = fxs.apply(model, [Prune(ATTENTION, heads=[0])], example_inputs=(x,))
    result.save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o")
    assert torch.equal(loaded(x), result.module(x))
    later = vit(seed=1)  # another checkpoint of the same architecture
    mapped = fxs.map_weights(later.state_dict(), tmp_path / "o")
    loaded.load_state_dict(mapped, strict=True)
    direct = fxs.apply(later, [Prune(ATTENTION, heads=[0])], example_inputs=(x,)).module
    assert torch.equal(loaded(x), direct(x))
    assert torch.equal(mapped[f"{ATTENTION}.out_proj.weight"], later.get_submodule(ATTENTION).out_proj.weight[:, 8:])


class SeqFirst(nn.Module):
    """(sequence, batch, features) attention with dropout on its weights, as torch.nn.Transformer calls it."""

    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, dropout=0.3)
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        y, _ = self.attn(x, x, x)
        return self.out(torch.relu(y))


def test_sequence_first_attention_with_dropout_by_l2_importance():
    torch.manual_seed(0)
    model, x = SeqFirst().eval().double(), torch.randn(6, 2, 16).double()
    with torch.no_grad():  # head 2 has the smallest weights: amount=0.25 of 4 heads removes it
        model.attn.in_proj_weight[[*range(8, 12), *range(24, 28), *range(40, 44)]] *= 0.01
    result = fxs.apply(model, [Prune("attn", amount=0.25, importance="l2")], example_inputs=(x,))
    check(model, result, "attn", [2], (x,), (torch.randn(9, 3, 16).double(),))
    dropout = [m for m in result.module.modules() if isinstance(m, nn.Dropout)]
    assert [d.p for d in dropout] == [0.3]  # attention dropout is a module: train() and eval() switch it
    result.module.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(result.module(x), result.module(x))


def test_bert_heads_kept_class_attributes_follow():
    model = H.bert().double()
    path = "bert.encoder.layer.1.attention"
    result = fxs.apply(model, [Prune(path, heads=[0])], example_inputs=(H.ids(2, 7),))
    assert type(result.module) is type(model)  # keep_class: transformers' own code runs the pruned module
    check(model, result, path, [0], (H.ids(2, 7),), (H.ids(3, 11, seed=4),))
    attn = result.module.get_submodule(path)
    assert (attn.self.num_attention_heads, attn.self.all_head_size, attn.self.attention_head_size) == (1, 16, 16)
    assert model.get_submodule(path).self.num_attention_heads == 2  # the original's module is left as it was
    assert (attn.self.query.out_features, attn.output.dense.in_features) == (16, 16)
    assert len(result.report.adapted) == 7 and result.report.entry(f"{path}.self.value.bias").op.startswith("dim 0 keeps 16 of 32: [16-31]")


def test_llama_grouped_query_heads_take_their_query_group_and_generate():
    model = H.llama().double()
    path = "model.layers.2.self_attn"   # 4 query heads, 2 key/value heads of 8: each key/value head serves 2 query heads
    result = fxs.apply(model, [Prune(path, heads=[0])], example_inputs=(H.ids(2, 7),))
    check(model, result, path, [0], (H.ids(2, 7),), (H.ids(1, 12, seed=3),))
    attn = result.module.get_submodule(path)
    assert (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features, attn.o_proj.in_features) == (16, 8, 8, 16)
    assert attn.num_key_value_groups == 2
    assert params(model) - params(result.module) == 16 * 32 + 2 * 8 * 32 + 32 * 16
    reference = zero_heads(copy.deepcopy(model), path, [0])
    prompt = H.ids(1, 5, seed=9)
    with torch.no_grad():  # the key/value cache holds the pruned layer's narrower keys
        got = result.module.generate(prompt, max_new_tokens=6, do_sample=False)
        want = reference.generate(prompt, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_qwen2_heads_traced_graph():
    model = H.qwen2().double()
    path = "model.layers.1.self_attn"
    result = fxs.apply(model, [Prune(path, heads=[1])], example_inputs=(H.ids(2, 7),), keep_class=False)
    check(model, result, path, [1], (H.ids(2, 7),), (H.ids(3, 10, seed=2),))
    assert result.report.entry(f"{path}.k_proj.bias").op.startswith("dim 0 keeps 8 of 16: [0-7] by rule 1")
    assert result.report.entry(f"{path}.o_proj.weight").op.startswith("dim 1 keeps 16 of 32: [0-15] by rule 1")


def test_yaml_heads_rule():
    rules = parse_rules(f"fxsurgery: 1\nrules:\n  - prune: {ATTENTION}\n    heads: [2]\n", "<r>")
    assert [str(r) for r in rules] == [f"prune {ATTENTION} heads=[2]"]
    model, x = vit(), torch.randn(1, 3, 32, 32).double()
    check(model, fxs.apply(model, rules, example_inputs=(x,)), ATTENTION, [2], (x,))


class Masked(nn.Module):
    def __init__(self, **kwargs):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True, **kwargs)
        self.register_buffer("mask", torch.zeros(3, 3))

    def forward(self, x, read_weights: bool = False, mask: bool = False):
        y, w = self.attn(x, x, x, attn_mask=self.mask if mask else None)
        return y + w.sum() if read_weights else y


@pytest.mark.parametrize("rule, kwargs, model_kwargs, message", [
    (dict(channels=[0]), {}, {}, "'attn' is an attention module (MultiheadAttention), whose unit is a head; fix: use heads=[...] or amount="),
    (dict(heads=[0]), dict(read_weights=True), {},
     "node 'getitem_1' reads its attention weights, which average over every head; fix: prune heads of attention whose weights are not read"),
    (dict(heads=[0]), dict(mask=True), {},
     "'attn' is called with attn_mask, which its pruned form does not take; fix: prune heads of attention called without masks"),
    (dict(heads=[0]), {}, dict(add_bias_kv=True),
     "the heads of 'attn' cannot be removed: node 'attn': MultiheadAttention heads are not followed when it adds learned key/value "
     "biases (add_bias_kv); fix: select another attention module"),
    (dict(heads=[0, 1]), {}, {}, "removing all 2 heads of attn leaves nothing to compute; fix: keep at least one head"),
    (dict(heads=[2]), {}, {}, "attn has 2 heads, so head 2 does not exist; fix: use indices 0 to 1"),
])
def test_refusals(rule, kwargs, model_kwargs, message):
    model = Masked(**model_kwargs).eval()
    with pytest.raises(RewriteError) as err:
        fxs.apply(model, [Prune("attn", **rule)], example_inputs=(torch.randn(1, 3, 8),), example_kwargs=kwargs)
    assert message in err.value.full and "\n" not in err.value.full


def test_heads_on_a_convolution_and_bert_self_attention_are_refused():
    with pytest.raises(RewriteError, match=r"heads= removes heads of an attention module, and 'conv_proj' is a Conv2d; "
                                           r"fix: select a torch.nn.MultiheadAttention or a transformers attention module"):
        fxs.apply(vit(), [Prune("conv_proj", heads=[0])], example_inputs=(torch.randn(1, 3, 32, 32).double(),))
    with pytest.raises(RewriteError) as err:
        fxs.apply(H.bert(), [Prune("bert.encoder.layer.0.attention.self", heads=[0])], example_inputs=(H.ids(1, 5),))
    assert err.value.full.endswith(
        "the heads of 'bert.encoder.layer.0.attention.self' cannot be removed: node 'bert.encoder.layer.0.attention.self': "
        "BertSelfAttention holds the query, key and value but not the output projection; fix: select another attention module "
        "(one that holds its output projection too)")


def test_two_heads_rules_on_one_kept_class_module_are_refused():
    path = "bert.encoder.layer.1.attention"
    with pytest.raises(RewriteError, match=rf"rule 2 .*: '{path}' was already swapped by an earlier rule, whose head numbers this "
                                           r"one would not see; fix: prune its heads in one rule"):
        fxs.apply(H.bert(), [Prune(path, heads=[0]), Prune(path, heads=[0])], example_inputs=(H.ids(1, 5),))


def test_kept_class_with_pruned_heads_refuses_save_pretrained_and_saves_as_a_graph(tmp_path):
    # a transformers config has one head count for every layer: from_pretrained could not rebuild
    # layer 1 with one head fewer, so the kept class's own format is refused, nothing written
    model = H.bert().double()
    path = "bert.encoder.layer.1.attention"
    kept = fxs.apply(model, [Prune(path, heads=[0])], example_inputs=(H.ids(2, 7),))
    with pytest.raises(fxs.errors.SaveError) as err:
        kept.save(tmp_path / "kept")
    assert str(err.value) == (f"{type(model).__name__}: '{path}.self.query.weight' is [16, 32] but its config builds [32, 32], "
                              "so from_pretrained could not reload it; fix: apply with keep_class=False (--no-keep-class; saved as model.py + safetensors)")
    assert not (tmp_path / "kept").exists()
    graph = fxs.apply(model, [Prune(path, heads=[0])], example_inputs=(H.ids(2, 7),), keep_class=False)
    graph.save(tmp_path / "graph")
    loaded = fxs.load(tmp_path / "graph", trust_code=True)  # a transformers call adapter lives in model.py
    ids = H.ids(3, 9, seed=5)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, kept.module(ids).logits)
