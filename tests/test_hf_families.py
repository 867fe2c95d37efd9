"""Layer edits, generation and training on kept transformers models, family by family.

Qwen2 and T5 (both stacks, and the counts each keeps: num_layers,
num_decoder_layers, the stacks' own configuration copies) against the edit
made by hand; for Llama, Qwen2, GPT-2 and T5, 20 steps of training on
`result.trainable_parameters()` lower the loss and leave every frozen tensor
bitwise as it was.
"""

from __future__ import annotations

import copy

import pytest
import torch
from hf_models import apply, assert_unchanged, generate, gpt2, ids, llama, logits, qwen2, relayer, snapshot, t5

from fxsurgery import Freeze, Layers

transformers = pytest.importorskip("transformers")

ORDERS = {"delete": [0, 3], "duplicate": [0, 1, 2, 1, 2, 3]}  # T5's block 0 holds the relative position bias: kept first


def inputs(model):
    return (ids(1, 5), None, ids(1, 4)) if model.config.is_encoder_decoder else (ids(1, 5),)


def run(model, x):
    extra = {"decoder_input_ids": x.roll(1, dims=1)} if model.config.is_encoder_decoder else {}
    return logits(model, x, **extra)


def t5_by_hand(model, order):
    hand = copy.deepcopy(model)
    relayer(hand, "encoder.block", order, counts=("num_layers",))
    relayer(hand, "decoder.block", order, counts=("num_decoder_layers",))
    hand.encoder.config.num_layers = hand.decoder.config.num_layers = len(order)
    return hand


@pytest.mark.parametrize("edit", list(ORDERS))
def test_t5_both_stacks_follow_their_counts(edit, tmp_path):
    model, order = t5(), ORDERS[edit]
    before = snapshot(model)
    result = apply(model, [Layers("encoder.block", order=order), Layers("decoder.block", order=order)], inputs(model))
    got, hand = result.module, t5_by_hand(model, order)
    n = len(order)
    assert (got.config.num_layers, got.config.num_decoder_layers, got.encoder.config.num_layers,
            got.decoder.config.num_layers) == (n, n, n, n)
    first, second = (m.label for m in result.plan.matches)
    assert result.report.notes[1:3] == [f"config.num_hidden_layers: 4 -> {n} ({first})",
                                        f"encoder.config.num_layers: 4 -> {n} ({first})"]
    assert f"config.num_decoder_layers: 4 -> {n} ({second})" in result.report.notes
    assert f"decoder.config.num_layers: 4 -> {n} ({second})" in result.report.notes
    for batch, length in [(1, 5), (3, 9)]:
        x = ids(batch, length, seed=batch)
        assert torch.allclose(run(got, x), run(hand, x), atol=1e-6, rtol=0)
    x = ids(2, 6)
    tokens = generate(got, x)
    assert tokens.shape == (2, 21) and torch.equal(tokens, generate(hand, x))
    result.save(tmp_path / "out")
    loaded = transformers.T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert (loaded.config.num_layers, loaded.config.num_decoder_layers) == (n, n)
    assert torch.equal(run(loaded, x), run(got, x)) and torch.equal(generate(loaded, x), tokens)
    assert_unchanged(model, before)


def test_qwen2_layer_deletion_equals_the_edit_by_hand(tmp_path):
    model = qwen2()
    result = apply(model, [Layers("model.layers", order=[0, 3])])
    hand = relayer(copy.deepcopy(model), "model.layers", [0, 3])
    x = ids(2, 6)
    assert torch.allclose(run(result.module, x), run(hand, x), atol=1e-6, rtol=0)
    assert torch.equal(generate(result.module, x), generate(hand, x))
    result.save(tmp_path / "out")
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(run(loaded, x), run(result.module, x))


# (builder, layer list, the last kept layer's prefix): every family deletes two layers and trains the last one
TRAIN = {"llama": (llama, "model.layers", "model.layers.1."), "qwen2": (qwen2, "model.layers", "model.layers.1."),
         "gpt2": (gpt2, "transformer.h", "transformer.h.1."), "t5": (t5, "decoder.block", "decoder.block.1.")}


@pytest.mark.parametrize("family", list(TRAIN))
def test_training_the_trainable_parameters_of_a_pruned_model(family):
    build, path, last = TRAIN[family]
    model = build()
    result = apply(model, [Layers(path, order=[0, 3]), Freeze("*", exclude=[f"{last}*"])], inputs(model))
    got = result.module.train()
    trainable = result.trainable_parameters()
    names = {id(p): n for n, p in got.named_parameters()}
    assert trainable and all(names[id(p)].startswith(last) for p in trainable)
    assert len(trainable) == len([n for n, _ in got.named_parameters() if n.startswith(last)])
    frozen = {n: p.detach().clone() for n, p in got.named_parameters() if not p.requires_grad}
    assert len(frozen) == len(list(got.parameters())) - len(trainable)
    x = ids(4, 8, seed=3)
    extra = {"decoder_input_ids": x.roll(1, dims=1)} if model.config.is_encoder_decoder else {}
    optimizer = torch.optim.Adam(trainable, lr=1e-2)
    losses = []
    torch.manual_seed(0)
    for _ in range(20):
        loss = got(x, labels=x, **extra).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.95 * losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in got.named_parameters() if n in frozen)
    # other batch sizes and lengths run after training
    got.eval()
    for batch, length in [(1, 3), (5, 12)]:
        assert run(got, ids(batch, length)).shape == (batch, length, 100)


CLASSIFIERS = {"llama": (llama, "LlamaForSequenceClassification"), "qwen2": (qwen2, "Qwen2ForSequenceClassification"),
               "gpt2": (gpt2, "GPT2ForSequenceClassification")}


@pytest.mark.parametrize("family", list(CLASSIFIERS))
def test_a_new_classification_head_sets_num_labels_and_reloads(family, tmp_path):
    """The decoder families' sequence classifiers (a `score` head on the last token): swapped, counted, reloaded."""
    import fxsurgery as fxs
    from fxsurgery import Replace

    build, name = CLASSIFIERS[family]
    config = copy.deepcopy(build().config)
    config.pad_token_id = 0  # the last real token of each row is found by its padding
    torch.manual_seed(0)
    model = getattr(transformers, name)(config).eval()
    before = snapshot(model)
    result = apply(model, [Replace("score", fxs.new(torch.nn.Linear, out_features=5, bias=False))])
    got = result.module
    hand = copy.deepcopy(model)
    hand.score = torch.nn.Linear(32, 5, bias=False)
    hand.score.load_state_dict(got.score.state_dict())
    hand.config.num_labels, hand.num_labels = 5, 5
    assert type(got) is type(model) and (got.config.num_labels, got.num_labels, model.config.num_labels) == (5, 5, 2)
    for batch, length in [(1, 5), (3, 11)]:
        x = ids(batch, length, seed=batch)
        assert logits(got, x).shape == (batch, 5)
        assert torch.allclose(logits(got, x), logits(hand, x), atol=1e-6, rtol=0)
    assert result.report.new == ["score.weight"] and result.report.dropped == ["score.weight"]
    result.save(tmp_path / "out")
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    x = ids(2, 9)
    assert loaded.config.num_labels == 5 and torch.equal(logits(loaded, x), logits(got, x))
    assert_unchanged(model, before)


def bart():
    torch.manual_seed(0)
    return transformers.BartForConditionalGeneration(transformers.BartConfig(
        vocab_size=100, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
        decoder_start_token_id=2)).eval()


@pytest.mark.parametrize("stack, counts", [("model.decoder.layers", (3, 1)), ("model.encoder.layers", (1, 3))])
def test_bart_counts_each_stack_by_its_own_key(stack, counts, tmp_path):
    # num_hidden_layers is BART's alias of encoder_layers: a decoder edit wrote its count there, and from_pretrained
    # rebuilt 1 encoder layer (2 trained ones dropped) and 3 decoder layers (2 at random)
    model = bart()
    x, decoder = ids(2, 7), ids(2, 5, seed=2)
    result = apply(model, [Layers(stack, order=[0])], (x,), example_kwargs={"decoder_input_ids": decoder})
    got = result.module
    assert (got.config.encoder_layers, got.config.decoder_layers) == counts
    key = "decoder_layers" if "decoder" in stack else "num_hidden_layers"
    assert result.report.notes[1] == f"config.{key}: 3 -> 1 ({result.plan.matches[0].label})"
    hand = copy.deepcopy(model)
    relayer(hand, stack, [0], counts=("decoder_layers" if "decoder" in stack else "encoder_layers",))
    y = ids(3, 9, seed=3)
    assert torch.equal(logits(got, y, decoder_input_ids=decoder[:1].expand(3, -1)),
                       logits(hand, y, decoder_input_ids=decoder[:1].expand(3, -1)))
    result.save(tmp_path / "out")
    loaded = transformers.BartForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    assert (len(loaded.model.encoder.layers), len(loaded.model.decoder.layers)) == counts
    assert torch.equal(logits(loaded, y, decoder_input_ids=decoder[:1].expand(3, -1)),
                       logits(got, y, decoder_input_ids=decoder[:1].expand(3, -1)))


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_a_clip_tower_is_counted_in_its_own_part_of_the_configuration(tower, tmp_path):
    # CLIPConfig counts no layers itself: a tower's edit left text_config / vision_config at 3, and
    # from_pretrained rebuilt 2 random layers
    torch.manual_seed(0)
    part = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37)
    model = transformers.CLIPModel(transformers.CLIPConfig(text_config={**part, "vocab_size": 100},
                                                           vision_config={**part, "image_size": 32, "patch_size": 8})).eval()
    text, pixels = ids(2, 7), torch.randn(2, 3, 32, 32)
    result = apply(model, [Layers(f"{tower}_model.encoder.layers", order=[2])], (text, pixels))
    got = result.module
    assert (got.config.text_config.num_hidden_layers, got.config.vision_config.num_hidden_layers) == \
        ((1, 3) if tower == "text" else (3, 1))
    assert result.report.notes[1] == f"config.{tower}_config.num_hidden_layers: 3 -> 1 ({result.plan.matches[0].label})"
    result.save(tmp_path / "out")
    loaded = transformers.CLIPModel.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(loaded(text, pixels).logits_per_image, got(text, pixels).logits_per_image)


def test_a_head_ending_in_out_proj_sets_num_labels(tmp_path):
    # RoBERTa's head is classifier.dense -> classifier.out_proj: num_labels stayed 5 beside 3 outputs, and a call
    # with labels failed inside transformers
    import fxsurgery as fxs
    from fxsurgery import Replace

    torch.manual_seed(0)
    config = transformers.RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=37, max_position_embeddings=64, num_labels=5, pad_token_id=1)
    model = transformers.RobertaForSequenceClassification(config).eval()
    x, labels = ids(2, 8), torch.tensor([0, 2])
    result = apply(model, [Replace("classifier.out_proj", fxs.new(torch.nn.Linear, out_features=3))], (x,))
    got = result.module
    assert (got.config.num_labels, got.num_labels) == (3, 3)
    expected = torch.nn.functional.cross_entropy(got(x).logits, labels)
    assert torch.equal(got(x, labels=labels).loss, expected)
    result.save(tmp_path / "out")
    loaded = transformers.RobertaForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.num_labels == 3 and torch.equal(loaded(x).logits, got(x).logits)


def test_t5_without_its_first_block_first_warns_that_the_stack_loses_its_position_bias():
    # T5's block 0 computes the relative position bias every block reads: order=[1, 2] ran without any, as by hand,
    # and nothing said so
    import warnings

    import fxsurgery as fxs

    model = t5()

    def warned(order):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = fxs.apply(model, [Layers("decoder.block", order=order)], example_inputs=(ids(1, 5),),
                               example_kwargs={"decoder_input_ids": ids(1, 4)})
        return result.plan.matches[0].label, [str(w.message) for w in caught if "position" in str(w.message)]

    label, said = warned([1, 2])
    assert said == [f"{label}: layer 0 of decoder.block computes the relative position bias every layer reads, and layer 1, "
                    "first now, has none: the stack runs without position information; fix: keep layer 0 first"]
    assert warned([0, 2])[1] == []


@pytest.mark.parametrize("order", [[1, 2], [1, 0]])
def test_t5_saved_without_its_first_block_first_is_told_to_keep_it_first(order, tmp_path):
    # save refused with "remove layers with Layers(path, order=[...])": the rule that had been applied
    import fxsurgery as fxs
    model = t5()
    result = fxs.apply(model, [Layers("decoder.block", order=order)], example_inputs=(ids(1, 5),),
                       example_kwargs={"decoder_input_ids": ids(1, 4)})
    held = [i for i, block in enumerate(result.module.decoder.block) if block.layer[0].SelfAttention.has_relative_attention_bias]
    assert held == ([] if 0 not in order else [order.index(0)])
    with pytest.raises(fxs.SaveError) as err:
        result.save(tmp_path / "out")
    from fxsurgery.errors import bounded
    assert str(err.value) == bounded("T5ForConditionalGeneration: from_pretrained builds the relative position bias into layer 0 of decoder.block, "
                              "which has none now; fix: keep layer 0 first in the Layers order, or apply with keep_class=False "
                              "(--no-keep-class; saved as model.py + safetensors) to the model built with config.use_cache=False")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stack, counts", [("decoder.bert.encoder.layer", (3, 2)), ("encoder.encoder.layer", (2, 3))])
def test_an_encoder_decoder_model_counts_each_side_in_its_own_configuration(stack, counts, tmp_path):
    # config.encoder and config.decoder count the two BERTs: neither followed, and save refused with a fix that was
    # what had been done
    torch.manual_seed(0)
    small = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37, vocab_size=100)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(
        transformers.BertConfig(**small), transformers.BertConfig(**small, is_decoder=True, add_cross_attention=True))
    config.decoder_start_token_id, config.pad_token_id = 0, 0
    model = transformers.EncoderDecoderModel(config=config).eval()
    x, decoder = ids(2, 7), ids(2, 5, seed=2)
    result = apply(model, [Layers(stack, order=[0, 2])], (x,), example_kwargs={"decoder_input_ids": decoder})
    got = result.module
    assert (got.config.encoder.num_hidden_layers, got.config.decoder.num_hidden_layers) == counts
    result.save(tmp_path / "out")
    loaded = transformers.EncoderDecoderModel.from_pretrained(tmp_path / "out").eval()
    assert torch.equal(logits(loaded, x, decoder_input_ids=decoder), logits(got, x, decoder_input_ids=decoder))


def test_a_head_swap_captured_with_labels_names_the_fixed_reshape_and_keep_class_works():
    """The loss reshapes logits to the old num_labels; the error blamed the new head's shapes."""
    import fxsurgery as fxs
    from fxsurgery import Replace

    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    x, labels = torch.randint(0, 100, (2, 8)), torch.tensor([0, 4])
    rules = [Replace("classifier", fxs.new(torch.nn.Linear, out_features=5))]
    with pytest.raises(fxs.ValidateError) as err:
        fxs.apply(model, rules, example_inputs=(x,), example_kwargs={"labels": labels}, keep_class=False)
    assert str(err.value).endswith(
        "[call_method]: the forward reshapes to (-1, 3), sizes fixed at capture; fix: leave out the inputs that lead there "
        "(labels=: a loss over the old classes), or keep_class=True")
    got = fxs.apply(model, rules, example_inputs=(x,), example_kwargs={"labels": labels}, keep_class=True).module
    loss = torch.nn.functional.cross_entropy(got(x).logits, labels)
    assert got.config.num_labels == 5 and torch.equal(got(x, labels=labels).loss, loss)
