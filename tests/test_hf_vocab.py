"""A vocabulary trim on a kept transformers model: the embedding replaced with some of its rows.

`Replace(<input embedding>, nn.Embedding(K, d), weights={"select": rows})`:
`config.vocab_size` becomes K, the output embedding keeps the same rows (one
tensor with the input embedding when the model ties them), special token ids
follow their rows; compared with the trim made by hand, in logits, greedy
generate() and a save_pretrained / from_pretrained round trip.
"""

from __future__ import annotations

import pytest
import torch
from hf_models import apply, assert_unchanged, bert, generate, gpt2, ids, llama, logits, qwen2, snapshot, t5, tensors, trim_by_hand
from torch import nn

import fxsurgery as fxs
from fxsurgery import MatchError, Replace

transformers = pytest.importorskip("transformers")

# token i of the trimmed vocabulary is old token ROWS[i]: 0, 1 (T5's pad and eos) and 98, 99 (GPT-2's bos and eos) kept
ROWS = [99, 98, 0, 1, *range(2, 97, 2)]
K = len(ROWS)
FAMILIES = {"llama": (llama, "model.embed_tokens"), "llama-tied": (lambda: llama(tie=True), "model.embed_tokens"),
            "qwen2": (qwen2, "model.embed_tokens"), "gpt2": (gpt2, "transformer.wte"),
            "t5": (t5, "encoder.embed_tokens")}  # T5 calls encoder.embed_tokens, which holds `shared`'s weight


def trim(model, path, rows=ROWS, weights=None):
    width = model.get_input_embeddings().embedding_dim
    return apply(model, [Replace(path, nn.Embedding(len(rows), width), weights=weights or {"select": rows})], inputs(model))


def inputs(model):
    """Example inputs; an encoder-decoder model is called with (input_ids, attention_mask, decoder_input_ids)."""
    return (ids(1, 5), None, ids(1, 4)) if model.config.is_encoder_decoder else (ids(1, 5),)


def run(model, x):
    """Logits; an encoder-decoder model decodes x shifted by one."""
    extra = {"decoder_input_ids": x.roll(1, dims=1)} if model.config.is_encoder_decoder else {}
    return logits(model, x, **extra)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_vocabulary_trim_equals_the_trim_by_hand(family, tmp_path):
    build, path = FAMILIES[family]
    model = build()
    before = snapshot(model)
    result = trim(model, path)
    got, hand = result.module, trim_by_hand(model, ROWS)

    assert type(got) is type(model) and got.config.vocab_size == K and model.config.vocab_size == 100
    tied = model.config.tie_word_embeddings
    assert (got.get_output_embeddings().weight is got.get_input_embeddings().weight) is tied
    assert got.get_output_embeddings().weight.shape == (K, 32) and got.get_output_embeddings().out_features == K
    for batch, length in [(1, 5), (3, 11)]:
        x = ids(batch, length, seed=batch + length, vocab=K)
        assert run(got, x).shape[-1] == K
        assert torch.allclose(run(got, x), run(hand, x), atol=1e-6, rtol=0)
    x = ids(2, 6, vocab=K)
    tokens = generate(got, x)
    assert torch.equal(tokens, generate(hand, x)) and tokens.shape[1] == (21 if model.config.is_encoder_decoder else 26)

    report, label = result.report, result.plan.matches[0].label
    embedding, head = f"{path}.weight", [p for p, m in got.named_modules() if m is got.get_output_embeddings()][0]
    entry = report.entry(embedding)
    assert (entry.status, entry.source, entry.shape) == ("adapted", embedding, (K, 32))
    assert entry.op == f"select rows {ROWS} of [100, 32] by {label}"
    head_entry = report.entry(f"{head}.weight")
    assert (head_entry.status, head_entry.source) == ("adapted", embedding if tied else f"{head}.weight")
    assert report.counts()["dropped"] == 0 and report.counts()["new"] == 0
    assert report.counts()["transferred"] == len(tensors(got)) - report.counts()["adapted"]
    assert report.notes[1] == f"config.vocab_size: 100 -> {K} ({label})"
    if not tied:
        assert f"{head}: 100 -> {K} outputs, weights select {K} rows as {path} ({label})" in report.notes
    specials = {k: getattr(model.config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id")
                if isinstance(getattr(model.config, k, None), int) and 0 <= getattr(model.config, k) < 100}
    for key, old in specials.items():
        assert getattr(got.config, key) == ROWS.index(old) == getattr(hand.config, key)
        assert f"config.{key}: {old} -> {ROWS.index(old)} ({label})" in report.notes

    # transformers alone reloads it: the new vocabulary size, the tie, the same logits and tokens
    result.save(tmp_path / "out")
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    assert loaded.config.vocab_size == K
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) is tied
    assert torch.equal(run(loaded, x), run(got, x))
    assert torch.equal(generate(loaded, x), tokens)
    assert_unchanged(model, before)


def test_a_reordered_vocabulary_keeps_its_size_and_moves_the_head_rows_with_it():
    model = gpt2()
    rows = list(reversed(range(100)))
    result = trim(model, "transformer.wte", rows=rows)
    got, hand = result.module, trim_by_hand(model, rows)
    x = ids(2, 7)
    assert got.config.vocab_size == 100 and got.lm_head.weight is got.transformer.wte.weight
    assert torch.equal(run(got, x), run(hand, x))
    assert torch.equal(run(got, x), run(model, 99 - x).flip(-1))
    label = result.plan.matches[0].label
    assert result.report.notes[1:] == [f"config.bos_token_id: 98 -> 1 ({label})", f"config.eos_token_id: 99 -> 0 ({label})",
                                       f"generation_config.bos_token_id: 98 -> 1 ({label})",
                                       f"generation_config.eos_token_id: 99 -> 0 ({label})",
                                       f"lm_head: share the new transformer.wte.weight, as they shared the old one ({label})"]


def test_an_embedding_kept_as_it_is_leaves_the_vocabulary_alone():
    model = llama(tie=True)
    result = trim(model, "model.embed_tokens", rows=list(range(100)), weights="keep")
    got = result.module
    assert result.report.notes == ["result mode: kept class LlamaForCausalLM"]
    assert got.config.to_dict() == model.config.to_dict() and got.lm_head.weight is got.model.embed_tokens.weight
    x = ids(2, 7)
    assert torch.equal(run(got, x), run(model, x))


def test_a_token_whose_row_is_gone_is_unset_and_said():
    model = gpt2()
    rows = list(range(50))  # bos 98 and eos 99 are not kept
    result = trim(model, "transformer.wte", rows=rows)
    label = result.plan.matches[0].label
    assert (result.module.config.bos_token_id, result.module.config.eos_token_id) == (None, None)
    assert f"config.eos_token_id: 99 -> None (its row is not kept) ({label})" in result.report.notes
    # said as a warning too: generate() has no eos to stop at
    assert f"{label}: config.eos_token_id 99 is a row the trim does not keep, so it is None now; fix: keep that row" in \
        result.plan.warnings


def test_t5s_shared_embedding_is_never_called_and_the_error_says_which_module_calls_its_weight():
    rule = Replace("shared", nn.Embedding(K, 32), weights={"select": ROWS})
    with pytest.raises(MatchError) as err:
        apply(t5(), [rule], inputs(t5()))
    assert str(err.value) == (f"rule 1 'replace shared with Embedding({K}, 32)' ({rule.origin}) matched nothing: shared is never "
                              "called by the forward (inside a leaf module or unused); its weights are called through "
                              "encoder.embed_tokens: select that; fix: correct the selector or add 'optional: true'")


def test_a_tied_output_with_a_bias_over_the_vocabulary_keeps_the_kept_tokens_rows(tmp_path):
    """BERT's MLM decoder shares the embedding's weight and has a bias over the vocabulary (also cls.predictions.bias).
    It was refused, and the fix it gave (replace the decoder too) untied the two and left the old bias unused."""
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                                     vocab_size=100)
    model = transformers.BertForMaskedLM(config).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_()
    rule = Replace("bert.embeddings.word_embeddings", nn.Embedding(K, 32), weights={"select": ROWS})
    result = fxs.apply(model, [rule], example_inputs=(torch.randint(0, 100, (2, 8)),))
    kept = result.module
    decoder = kept.cls.predictions.decoder
    assert decoder.weight is kept.bert.embeddings.word_embeddings.weight and decoder.bias is kept.cls.predictions.bias
    assert torch.equal(decoder.bias, model.cls.predictions.bias[ROWS]) and kept.config.vocab_size == K
    assert model.cls.predictions.bias.shape == (100,) and model.config.vocab_size == 100   # the original is left alone
    old_ids = torch.tensor([ROWS[:4]])
    new_ids = torch.arange(4)[None]
    with torch.no_grad():
        torch.testing.assert_close(kept(new_ids).logits, model(old_ids).logits[..., ROWS], rtol=1e-6, atol=1e-6)
    assert (f"cls.predictions.decoder: 100 -> {K} outputs, sharing the new bert.embeddings.word_embeddings.weight, bias "
            f"select {K} rows; cls.predictions.bias with it ({result.plan.matches[0].label})") in result.report.notes
    result.save(tmp_path / "o")
    reloaded = transformers.BertForMaskedLM.from_pretrained(tmp_path / "o").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(new_ids).logits, kept(new_ids).logits)


def test_a_bert_classifier_keeps_its_logits_over_the_kept_tokens(tmp_path):
    """An encoder without an output embedding: the input rows and vocab_size follow, nothing else."""
    model = bert()
    before = snapshot(model)
    result = trim(model, "bert.embeddings.word_embeddings")
    got, hand = result.module, trim_by_hand(model, ROWS)
    assert type(got) is type(model) and got.config.vocab_size == K and got.get_output_embeddings() is None
    for batch, length in [(1, 5), (3, 11)]:
        x = ids(batch, length, seed=batch + length, vocab=K)
        assert torch.allclose(logits(got, x), logits(hand, x), atol=1e-6, rtol=0)
    assert result.report.counts()["dropped"] == 0 and result.report.counts()["adapted"] == 1
    result.save(tmp_path / "out")
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    x = ids(2, 7, vocab=K)
    assert loaded.config.vocab_size == K and torch.equal(logits(loaded, x), logits(got, x))
    assert_unchanged(model, before)


def test_a_head_tied_to_a_frozen_embedding_is_said_to_be_frozen():
    """freeze-backbone with head=lm_head on a tied Llama: the head trained nothing (0 parameters trainable, the
    optimiser got an empty list) and nothing said why."""
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxs.apply(llama(tie=True), fxs.load_rules("freeze-backbone", params={"head": "lm_head"}), example_inputs=(ids(1, 8),))
    label = result.plan.matches[0].label
    assert [str(w.message) for w in caught if "tied" in str(w.message)] == [
        f"{label} freezes model.embed_tokens.weight, which lm_head.weight is tied to (one tensor): lm_head.weight is frozen too; "
        "fix: untie them (config.tie_word_embeddings=False for transformers) to train lm_head.weight alone, or freeze both knowingly"]
    assert result.trainable_parameters() == []
    both = fxs.apply(llama(tie=True), [fxs.Freeze("model.embed_tokens"), fxs.Freeze("lm_head")], example_inputs=(ids(1, 8),))
    assert not any("tied" in w for w in both.plan.warnings)  # both frozen knowingly: nothing to say
    untied = fxs.apply(llama(), fxs.load_rules("freeze-backbone", params={"head": "lm_head"}), example_inputs=(ids(1, 8),))
    assert not any("tied" in w for w in untied.plan.warnings)
    assert [n for n, p in untied.module.named_parameters() if p.requires_grad] == ["lm_head.weight"]


def test_an_eos_list_that_loses_one_row_keeps_the_others_and_says_so():
    """generation_config.eos_token_id [98, 99] without row 98 is [48], 99's new id; the warning said "None"."""
    model = gpt2()
    model.generation_config.eos_token_id = [98, 99]
    rows = [*range(50, 98), 99]  # 98 is gone, 99 becomes token 48
    result = trim(model, "transformer.wte", rows=rows)
    label = result.plan.matches[0].label
    assert result.module.generation_config.eos_token_id == [48]
    assert f"generation_config.eos_token_id: [98, 99] -> [48] (its row is not kept) ({label})" in result.report.notes
    assert (f"{label}: generation_config.eos_token_id [98, 99] holds a row the trim does not keep, so it is [48] now; "
            "fix: keep that row") in result.plan.warnings
