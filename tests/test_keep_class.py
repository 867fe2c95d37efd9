"""keep_class: the result is the model's own class, and its configuration follows the edit.

Every result is compared with the same edit made by hand on a copy (the
ModuleList and the configuration edited directly): logits, greedy generate(),
and a save_pretrained / from_pretrained round trip that never imports fxsurgery's
output format.
"""

from __future__ import annotations

import copy
import pickle
from collections import OrderedDict

import pytest
import torch
from hf_models import apply, assert_unchanged, bert, by_hand, gpt2, ids, llama, logits, snapshot, tensors
from torch import nn

import fxsurgery as fxs
from fxsurgery import Detach, Freeze, Layers, MatchError, Replace, RuleError

transformers = pytest.importorskip("transformers")


STACKS = {"llama": (llama, "model.layers"), "gpt2": (gpt2, "transformer.h"), "bert": (bert, "bert.encoder.layer")}
ORDERS = {"delete": [0, 3], "duplicate": [0, 1, 2, 1, 2, 3]}
SHAPES = [(1, 5), (2, 9)]  # two batch sizes, two sequence lengths


@pytest.mark.parametrize("edit", list(ORDERS))
@pytest.mark.parametrize("family", list(STACKS))
def test_a_layer_edit_keeps_the_class_and_equals_the_edit_by_hand(family, edit, tmp_path):
    build, path = STACKS[family]
    model, order = build(), ORDERS[edit]
    before = snapshot(model)
    result = apply(model, [Layers(path, order=order)])
    hand = by_hand(model, path, order)
    got = result.module

    assert type(got) is type(model) and result.mode == f"kept class {type(model).__name__}"
    assert got.config.num_hidden_layers == len(order) and model.config.num_hidden_layers == 4
    assert len(got.get_submodule(path)) == len(order)
    for batch, length in SHAPES:
        x = ids(batch, length, seed=batch + length)
        assert torch.allclose(logits(got, x), logits(hand, x), atol=1e-6, rtol=0)
    if family != "bert":
        x = ids(2, 6)
        kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, attention_mask=torch.ones_like(x),
                  pad_token_id=0)
        with torch.no_grad():
            tokens = got.generate(x, **kw)
        assert tokens.shape == (2, 26)
        assert torch.equal(tokens, hand.generate(x, **kw))

    # Each tensor of layer i comes from layer order[i]; the layers left out are dropped.
    report, per_layer = result.report, len(tensors(model.get_submodule(path)[0]))
    total = len(tensors(model))
    counts = report.counts()
    assert counts == {"transferred": total + (len(order) - 4) * per_layer, "adapted": 0, "new": 0,
                      "dropped": (4 - len(set(order))) * per_layer, "frozen": 0}
    for i, j in enumerate(order):
        for name in tensors(model.get_submodule(path)[0]):
            entry = report.entry(f"{path}.{i}.{name}")
            assert (entry.status, entry.source) == ("transferred", f"{path}.{j}.{name}")
    assert sorted(report.dropped) == sorted(f"{path}.{j}.{n}" for j in set(range(4)) - set(order)
                                            for n in tensors(model.get_submodule(path)[0]))
    assert report.notes[:2] == [f"result mode: kept class {type(model).__name__}",
                                f"config.num_hidden_layers: 4 -> {len(order)} ({result.plan.matches[0].label})"]
    # The copies of a duplicated layer are tensors of their own.
    if edit == "duplicate":
        first, second = got.get_submodule(path)[1], got.get_submodule(path)[3]
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first.parameters(), second.parameters()))

    # save_pretrained / from_pretrained: transformers alone rebuilds the same model.
    result.save(tmp_path / "out")
    loaded = type(model).from_pretrained(tmp_path / "out").eval()
    assert loaded.config.num_hidden_layers == len(order)
    x = ids(2, 9)
    assert torch.equal(logits(loaded, x), logits(got, x))
    assert_unchanged(model, before)


def test_layer_types_follow_the_order(tmp_path):
    torch.manual_seed(0)
    types = ["full_attention", "sliding_attention", "full_attention", "sliding_attention"]
    config = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=64, vocab_size=100, max_position_embeddings=64, layer_types=types,
                                      sliding_window=4, use_sliding_window=True)
    model = transformers.Qwen2ForCausalLM(config).eval()
    result = apply(model, [Layers("model.layers", order=[1, 1, 2])])
    hand = by_hand(model, "model.layers", [1, 1, 2])
    hand.config.layer_types = [types[1], types[1], types[2]]
    assert result.module.config.layer_types == hand.config.layer_types and model.config.layer_types == types
    x = ids(2, 9)
    assert torch.allclose(logits(result.module, x), logits(hand, x), atol=1e-6, rtol=0)
    result.save(tmp_path / "out")
    loaded = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert loaded.config.layer_types == hand.config.layer_types
    assert torch.equal(logits(loaded, x), logits(result.module, x))


def test_a_new_head_sets_num_labels_and_reloads(tmp_path):
    model = bert()
    before = snapshot(model)
    result = apply(model, [Replace("classifier", fxs.new(nn.Linear, out_features=5))])
    got = result.module
    hand = copy.deepcopy(model)
    hand.classifier = nn.Linear(32, 5)
    hand.classifier.load_state_dict(got.classifier.state_dict())
    hand.config.num_labels, hand.num_labels = 5, 5

    assert isinstance(got, transformers.BertForSequenceClassification)
    assert (got.config.num_labels, got.num_labels, model.config.num_labels) == (5, 5, 2)
    assert got.config.id2label == {i: f"LABEL_{i}" for i in range(5)}
    assert got.config.label2id == {f"LABEL_{i}": i for i in range(5)}
    for batch, length in SHAPES:
        x = ids(batch, length)
        assert logits(got, x).shape == (batch, 5)
        assert torch.allclose(logits(got, x), logits(hand, x), atol=1e-6, rtol=0)
    assert result.report.new == ["classifier.weight", "classifier.bias"]
    assert sorted(result.report.dropped) == ["classifier.bias", "classifier.weight"]
    assert result.report.counts()["transferred"] == len(tensors(model)) - 2
    assert result.report.notes[1] == f"config.num_labels: 2 -> 5, id2label/label2id remade ({result.plan.matches[0].label})"

    result.save(tmp_path / "out")
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    x = ids(2, 9)
    assert loaded.config.num_labels == 5
    assert torch.equal(logits(loaded, x), logits(got, x))
    # fxs.load (and so the command line's MODEL) reads it by its class's own from_pretrained: it refused, naming it
    again = fxs.load(tmp_path / "out")
    assert type(again) is transformers.BertForSequenceClassification and torch.equal(logits(again, x), logits(got, x))
    assert_unchanged(model, before)


@pytest.mark.parametrize("weights, n, names, before", [
    ({"select": [2, 0]}, 2, ["pos", "neg"], ["neg", "neu", "pos"]),
    ("slice", 2, ["neg", "neu"], ["neg", "neu", "pos"]),
    ("pad", 4, ["neg", "neu", "pos", "LABEL_3"], ["neg", "neu", "pos"]),
    ("new", 2, ["LABEL_0", "LABEL_1"], ["neg", "neu", "pos"]),
    # transformers' default names say where each class came from too (they were renumbered LABEL_0, LABEL_1)
    ({"select": [2, 0]}, 2, ["LABEL_2", "LABEL_0"], ["LABEL_0", "LABEL_1", "LABEL_2"]),
    ("pad", 4, ["LABEL_3", "neu", "pos", "LABEL_3_new"], ["LABEL_3", "neu", "pos"]),  # a new row's name taken by a kept one
])
def test_a_head_keeping_some_classes_keeps_their_names(tmp_path, weights, n, names, before):
    """A head that keeps the rows of some classes (select, slice, pad) keeps their names in id2label, saved and
    reloaded: pipelines and model cards read them, and LABEL_0 for 'pos' is a wrong answer."""
    model = bert()
    model.config.id2label = dict(enumerate(before))
    model.config.label2id = {name: i for i, name in enumerate(before)}
    model.config.num_labels = 3
    model.classifier = nn.Linear(32, 3)
    model.num_labels = 3
    rule = Replace("classifier", fxs.new(nn.Linear, out_features=n), weights=weights)
    result = apply(model, [rule])
    config = result.module.config
    assert config.id2label == dict(enumerate(names)) and config.label2id == {name: i for i, name in enumerate(names)}
    x = ids(2, 7)
    rows = weights["select"] if isinstance(weights, dict) else {"slice": [0, 1], "pad": [0, 1, 2]}.get(weights)
    if rows is not None and None not in rows:
        assert torch.allclose(logits(result.module, x)[:, :len(rows)], logits(model, x)[:, rows], atol=1e-6, rtol=0)
    shown = "LABEL_0, LABEL_1" if weights == "new" else ", ".join(names)
    kind = "id2label/label2id remade" if weights == "new" else f"id2label follows the rows kept: {shown}"
    assert result.report.notes[1] == f"config.num_labels: 3 -> {n}, {kind} ({result.plan.matches[0].label})"
    result.save(tmp_path / "out")
    loaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "out")
    assert loaded.config.id2label == dict(enumerate(names))


def test_training_the_trainable_parameters_lowers_the_loss_and_leaves_frozen_ones_alone():
    model = bert()
    result = apply(model, [Replace("classifier", fxs.new(nn.Linear, out_features=3)), Freeze("bert.*")])
    got = result.module
    trainable = result.trainable_parameters()
    assert [id(p) for p in trainable] == [id(got.classifier.weight), id(got.classifier.bias)]
    assert result.gradient_flow.counts() == {"trainable": 2, "frozen": len(list(model.parameters())) - 2, "cut": 0, "unused": 0}
    assert len(result.report.frozen) == len(list(model.parameters())) - 2
    frozen = {n: p.detach().clone() for n, p in got.named_parameters() if not p.requires_grad}
    x, y = ids(4, 8), torch.tensor([0, 1, 2, 1])
    optimizer = torch.optim.Adam(trainable, lr=0.05)
    losses = []
    for _ in range(10):
        loss = got(x, labels=y).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0] and losses == sorted(losses, reverse=True)
    assert all(torch.equal(p, frozen[n]) for n, p in got.named_parameters() if n in frozen)


def test_a_detach_wraps_the_layer_and_cuts_what_lies_before_it():
    model = llama()
    result = apply(model, [Detach(after="model.layers.1")])
    flow = result.gradient_flow.status
    assert type(result.module.model.layers[1]).__name__ == "Around"
    assert (flow["model.embed_tokens.weight"], flow["model.layers.1.module.mlp.up_proj.weight"]) == ("cut", "cut")
    assert (flow["model.layers.2.mlp.up_proj.weight"], flow["lm_head.weight"]) == ("trainable", "trainable")
    assert result.gradient_flow.counts() == {"trainable": 2 * 9 + 2, "frozen": 0, "cut": 2 * 9 + 1, "unused": 0}
    x = ids(2, 9)
    assert torch.equal(logits(result.module, x), logits(model, x))


def test_the_default_keeps_transformers_models_and_regenerates_others():
    model = gpt2()
    assert fxs.apply(model, [], example_inputs=(ids(1, 5),)).mode == "kept class GPT2LMHeadModel"
    regenerated = apply(model, [], keep_class=False)
    # its forward takes a cache object, which stays Python: the mode says so (it said 'regenerated graph module')
    assert regenerated.mode == "GPT2LMHeadModel, its forward opaque Python, parts traced"
    assert regenerated.summary().endswith("): model.py needs a graph of the whole forward")
    assert "\nresult: GPT2LMHeadModel, its forward opaque Python, parts traced (" in regenerated.summary()
    assert any(isinstance(m, torch.fx.GraphModule) for m in regenerated.module.modules())
    plain = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert fxs.apply(plain, [], example_inputs=(torch.randn(1, 4),)).mode == "regenerated graph module"


def test_a_regenerated_module_names_the_methods_it_lacks_and_the_kept_class_has_them():
    """timm's forward_features and num_classes on a regenerated graph: torch's "no attribute", as if mistyped, said
    nothing of why; the message names the class and the fix, in memory, in a deep copy and after a pickle."""
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet18", pretrained=False, num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    graph = fxs.apply(model, [Freeze("layer1")], example_inputs=(x,)).module
    for module in (graph, copy.deepcopy(graph), pickle.loads(pickle.dumps(graph))):
        assert torch.equal(module(x), model(x))
        for name in ("forward_features", "num_classes"):
            with pytest.raises(AttributeError) as err:
                getattr(module, name)
            assert str(err.value) == (f"{type(module).__name__!r} object has no attribute {name!r}: the result runs the graph of "
                                      "timm.models.resnet.ResNet.forward alone, without its other methods and attributes; fix: apply "
                                      "with keep_class=True (--keep-class) to keep the class, or Output(...) to return an inner value")
        with pytest.raises(AttributeError) as err:  # a name the original lacks too: torch's own message
            _ = module.forward_feature
        assert str(err.value) == f"{type(module).__name__!r} object has no attribute 'forward_feature'"
    kept = fxs.apply(model, [Freeze("layer1")], example_inputs=(x,), keep_class=True).module
    assert torch.equal(kept.forward_features(x), model.forward_features(x)) and kept.num_classes == 5


def test_keeping_the_order_changes_nothing():
    model = llama()
    result = apply(model, [Layers("model.layers", order=[0, 1, 2, 3])])
    x = ids(2, 9)
    assert torch.equal(logits(result.module, x), logits(model, x))
    assert result.report.counts()["dropped"] == 0 and result.report.counts()["transferred"] == len(tensors(model))
    assert result.report.notes == ["result mode: kept class LlamaForCausalLM"]
    assert result.module.config.to_dict() == model.config.to_dict()


def test_an_index_out_of_range_is_refused():
    rule = Layers("model.layers", order=[0, 4])
    with pytest.raises(MatchError) as err:
        apply(llama(), [rule])
    assert str(err.value) == (f"rule 1 'layers model.layers order=[0, 4]' ({rule.origin}): index 4 is out of range for "
                              "model.layers, which holds 4 layers; fix: use indices 0 to 3")


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def test_any_module_keeps_its_class_on_request():
    model, x = Stack(), torch.randn(3, 4)
    result = fxs.apply(model, [Layers("layers", order=[2, 0])], example_inputs=(x,), keep_class=True)
    assert type(result.module) is Stack and result.mode == "kept class Stack"
    want = torch.tanh(model.layers[0](torch.tanh(model.layers[2](x))))
    assert torch.equal(result.module(x), want)
    assert [(e.name, e.source) for e in result.report.entries if e.status == "transferred"] == [
        ("layers.0.weight", "layers.2.weight"), ("layers.0.bias", "layers.2.bias"),
        ("layers.1.weight", "layers.0.weight"), ("layers.1.bias", "layers.0.bias")]
    assert result.report.dropped == ["layers.1.weight", "layers.1.bias"]


def test_a_sequential_of_numbered_blocks_is_rearranged_as_a_list_is(tmp_path):
    """timm's ViT keeps its blocks in an nn.Sequential: Layers there (the graph refuses it and names keep_class,
    which used to refuse a Sequential in turn) equals the Sequential rebuilt by hand, saved and loaded."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    rule = Layers("blocks", order=[0, 1, 1, 5])
    with pytest.raises(MatchError) as err:
        fxs.apply(model, [rule], example_inputs=(x,))
    assert str(err.value).endswith("fix: pass keep_class=True (--keep-class), or Delete/Insert the layers' calls")
    result = fxs.apply(model, [rule], example_inputs=(x,), keep_class=True)
    hand = copy.deepcopy(model)
    hand.blocks = nn.Sequential(*[copy.deepcopy(model.blocks[i]) for i in (0, 1, 1, 5)])
    assert type(result.module.blocks) is nn.Sequential and list(result.module.blocks._modules) == ["0", "1", "2", "3"]
    other = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(result.module(x), hand(x)) and torch.equal(result.module(other), hand(other))
    assert result.module.blocks[1].attn.qkv.weight is not result.module.blocks[2].attn.qkv.weight  # a second use is a copy
    assert {n.split('.')[1] for n in result.report.dropped} == {'2', '3', '4', '6', '7', '8', '9', '10', '11'}
    assert len(result.report.dropped) == 9 * 12
    result.save(tmp_path / "out")  # timm's blocks traced through: model.py rebuilds torch's modules only
    with torch.no_grad():
        assert torch.equal(fxs.load(tmp_path / "out")(other), hand(other))
        assert torch.equal(fxs.load(tmp_path / "out", trust_code=True)(other), hand(other))
    fxs.save(fxs.load(tmp_path / "out", trust_code=True), tmp_path / "again")  # the loaded result writes the same files
    for name in ("model.py", "graph.json", "model.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "out" / name).read_bytes(), name


class Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 4, 3), act=nn.ReLU()))

    def forward(self, x):
        return self.body(x)


def test_a_sequential_of_named_layers_is_refused():
    rule = Layers("body", order=[1, 0])
    with pytest.raises(MatchError) as err:
        fxs.apply(Named(), [rule], example_inputs=(torch.randn(1, 3, 8, 8),), keep_class=True)
    assert str(err.value) == (f"rule 1 'layers body order=[1, 0]' ({rule.origin}): body is a Sequential, not an nn.ModuleList or "
                              "an nn.Sequential of numbered layers; fix: select the list that holds the layers, e.g. 'model.layers'")


def test_layers_without_keep_class_and_call_rules_with_it_are_refused():
    rule = Layers("layers", order=[0])
    with pytest.raises(MatchError) as err:
        fxs.apply(Stack(), [rule], example_inputs=(torch.randn(1, 4),))
    assert str(err.value) == (f"rule 1 'layers layers order=[0]' ({rule.origin}) rearranges a layer stack, whose calls a graph "
                              "has traced into one call per layer (a loop over a ModuleList, an nn.Sequential's forward); fix: "
                              "pass keep_class=True (--keep-class), or Delete/Insert the layers' calls")
    rule = Replace(torch.nn.functional.silu, torch.nn.functional.gelu)
    with pytest.raises(MatchError) as err:
        apply(llama(), [rule])
    assert str(err.value) == (f"rule 1 'replace torch.nn.functional.silu with torch.nn.functional.gelu' ({rule.origin}) "
                              "edits code inside a forward, which keep_class=True runs as written; "
                              "fix: pass keep_class=False (--no-keep-class) for a regenerated module")


@pytest.mark.parametrize("order, message", [
    ([], "layers order is empty, which would remove every layer; fix: list at least one layer index"),
    ([0, -1], "layers order holds -1, not a layer index; fix: use integers from 0, e.g. order=[0, 1, 3]"),
    ([0, True], "layers order holds True, not a layer index; fix: use integers from 0, e.g. order=[0, 1, 3]"),
])
def test_bad_orders_fail_when_the_rule_is_built(order, message):
    with pytest.raises(RuleError) as err:
        Layers("model.layers", order=order)
    assert str(err.value).split(": ", 1)[1] == message


def test_layers_in_a_rule_file(tmp_path):
    path = tmp_path / "rules.yaml"
    path.write_text("fxsurgery: 1\nrules:\n  - layers: model.layers\n    order: [0, 1, 1, 3]\n")
    (rule,) = fxs.load_rules(path).rules
    assert (rule, str(rule.origin)) == (Layers("model.layers", order=(0, 1, 1, 3), origin=rule.origin), f"{path}:3")
    assert apply(llama(), [rule]).module.config.num_hidden_layers == 4
    path.write_text("fxsurgery: 1\nrules:\n  - layers: model.layers\n    order: [0, 1]\n    keep: 2\n")
    with pytest.raises(RuleError) as err:
        fxs.load_rules(path)
    assert str(err.value) == f"{path}:5: unknown key 'keep' in 'layers' rule; fix: allowed: layers, optional, order"
    path.write_text("fxsurgery: 1\nrules:\n  - layers: model.layers\n    order: []\n")
    with pytest.raises(RuleError) as err:
        fxs.load_rules(path)
    assert str(err.value) == f"{path}:3: layers order is empty, which would remove every layer; fix: list at least one layer index"


def test_a_layer_deleted_in_place_is_refused_at_save_not_reloaded_at_random(tmp_path):
    # Delete leaves a Skip in the layer list and the config its count: from_pretrained would build that layer anew
    model = llama()
    result = apply(model, [fxs.Delete("model.layers.2")])
    x = ids(2, 9)
    assert torch.equal(logits(result.module, x), logits(by_hand(model, "model.layers", [0, 1, 3]), x))
    with pytest.raises(fxs.SaveError) as err:
        result.save(tmp_path / "o")
    assert str(err.value) == (
        "LlamaForCausalLM: its config builds 'model.layers.2.self_attn.q_proj.weight' (9 tensors in all), which the model "
        "lacks, so from_pretrained would leave them at random init; fix: remove layers with Layers(path, order=[...]), which "
        "the config follows, or apply with keep_class=False (--no-keep-class)")
    assert not (tmp_path / "o").exists()


def test_adapters_a_config_does_not_build_are_refused_at_save(tmp_path):
    result = apply(llama(), [Freeze("*"), fxs.Rewrite(fxs.AddLoRA(4, 8), select="re:.*\\.q_proj")])
    with pytest.raises(fxs.SaveError) as err:
        result.save(tmp_path / "o")
    assert str(err.value) == (
        "LlamaForCausalLM: 'model.layers.0.self_attn.q_proj.base.weight' (12 tensors in all) is not built by its config, so "
        "from_pretrained would drop it; fix: apply with keep_class=False (--no-keep-class; saved as model.py + safetensors) to the model "
        "built with config.use_cache=False")
    assert not (tmp_path / "o").exists()


GATE = '''import torch
from torch import nn


class Gate(nn.Module):
    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        if x.sum() > 0:  # data-dependent: stays a call of the module, not traced
            return x * self.scale
        return -x
'''


def test_a_users_layer_a_graph_calls_whole_stays_a_layer_when_saved(tmp_path, monkeypatch):
    """model.py is imported and traced again when saved: the layers it builds from a user's package stay called
    whole (tracing through other libraries' modules is for a kept class of the user's, which model.py cannot build)."""
    (tmp_path / "userlayers").mkdir()
    (tmp_path / "userlayers" / "__init__.py").write_text(GATE)
    monkeypatch.syspath_prepend(str(tmp_path))
    from userlayers import Gate
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), Gate(2.0), nn.Linear(4, 2)).eval()
    result = fxs.apply(model, [Replace("2", fxs.new(nn.Linear, out_features=3))], example_inputs=(torch.randn(2, 4),))
    result.save(tmp_path / "out")
    assert "_put(self, '1', userlayers.Gate(scale=2.0))" in (tmp_path / "out" / "model.py").read_text()
    x = torch.randn(3, 4)
    for loaded in (fxs.load(tmp_path / "out", allow=("userlayers",)), fxs.load(tmp_path / "out", trust_code=True)):
        assert torch.equal(loaded(x), result.module(x)) and torch.equal(loaded(-x.abs()), result.module(-x.abs()))
