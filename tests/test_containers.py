"""The original's containers stay containers: `result.features[0]`, `result.layer4[-1]`,
`len(result.encoder.layer)` and `for layer in ...` work on the result as on the original, in memory, after a
deep copy or a pickle, and after a save loaded from graph.json or model.py.

torch.fx makes the parents of what a graph calls bare nn.Module()s: indexing one raised "'Module' object is not
subscriptable" (per-layer learning rates, a hook on the last block, reading one layer's weights).
"""

import copy
import io
import json

import pytest
import torch
import torchvision
import transformers
from conftest import rehash
from torch import nn

import fxsurgery as fxs
from fxsurgery.errors import bounded
from fxsurgery.export._graphload import FIX

INLINE = ("this nn.Sequential's modules run inline in the result's graph, which does more between them than call "
          "one after the other (a detach cut, an inserted call, a block traced through); fix: call the result, "
          "or nn.Sequential(*modules) to run them one after the other")


def _pickled(module):
    buffer = io.BytesIO()
    torch.save(module, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def _forms(module, tmp_path):
    """The result as users hold it: in memory, deep-copied, pickled, loaded from graph.json and from model.py."""
    fxs.save(module, tmp_path / "o")
    return {"memory": module, "deepcopy": copy.deepcopy(module), "pickle": _pickled(module),
            "graph.json": fxs.load(tmp_path / "o"), "model.py": fxs.load(tmp_path / "o", trust_code=True)}


def _kinds(module):
    return {path: type(sub).__name__ for path, sub in module.named_modules()
            if isinstance(sub, (nn.Sequential, nn.ModuleList, nn.ModuleDict))}


@pytest.fixture(scope="module")
def mobilenet():
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, [fxs.Insert(nn.Dropout(0.1), after="features.2"), fxs.Delete("features.5")], example_inputs=(x,))
    return model, result.module, x


def test_containers_index_and_iterate_as_the_original_in_every_form(mobilenet, tmp_path):
    model, module, x = mobilenet
    expected_kinds = _kinds(module)
    # features holds blocks traced through and an inserted dropout: indexed, not called; classifier is the chain it was
    assert expected_kinds["features"] == "InlineSequential" and expected_kinds["classifier"] == "Sequential"
    assert expected_kinds["features.1.block"] == "InlineSequential" and expected_kinds["features.0"] == "Sequential"
    z = torch.randn(3, 576)
    reference = model.features[0](x)
    for form, held in _forms(module, tmp_path).items():
        assert _kinds(held) == expected_kinds, form
        features = held.features
        assert [n for n, _ in features.named_children()] == ["0", "1", "2", "2_dropout", "3", "4", "6", "7", "8", "9", "10", "11", "12"]
        assert len(features) == 13 and features[3] is held.get_submodule("features.2_dropout"), form
        assert features[-1] is held.get_submodule("features.12") and list(features)[6] is held.get_submodule("features.6")
        assert torch.equal(held.classifier(z), model.classifier(z)), form  # a chain the graph calls as nn.Sequential does
        assert torch.equal(features[:1](x), reference), form  # a slice runs its modules one after the other
        with pytest.raises(RuntimeError) as err:
            features(x)
        assert str(err.value) == INLINE
        assert torch.equal(held(x), module(x)), form


def test_a_model_py_load_saves_its_containers_again(mobilenet, tmp_path):
    _, module, x = mobilenet
    fxs.save(module, tmp_path / "a")
    loaded = fxs.load(tmp_path / "a", trust_code=True)
    fxs.save(loaded, tmp_path / "b")
    first, second = ((tmp_path / d / "model.py").read_text() for d in "ab")
    assert first == second and "\nCONTAINERS = {" in first
    assert json.loads((tmp_path / "b" / "graph.json").read_text())["containers"]["features"][0] == "InlineSequential"


def test_resnet_blocks_by_position_for_per_layer_learning_rates():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64)
    module = fxs.apply(model, [fxs.Freeze("layer1")], example_inputs=(x,)).module
    assert module.layer4[-1] is module.get_submodule("layer4.1") and len(module.layer1) == 2
    groups = {name: sorted(n for n, _ in getattr(module, name).named_parameters()) for name in ("layer1", "layer2", "layer3", "layer4")}
    assert groups == {name: sorted(n for n, _ in getattr(model, name).named_parameters()) for name in groups}
    for ours, theirs in zip(module.layer4[-1].parameters(), model.layer4[-1].parameters()):
        assert torch.equal(ours, theirs)
    assert all(not p.requires_grad for p in module.layer1.parameters())
    assert all(p.requires_grad for p in module.layer4.parameters())


class Stack(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(4))
        self.heads = nn.ModuleDict({"a": nn.Linear(8, 2), "b": nn.Linear(8, 3)})

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.heads["a"](x), self.heads["b"](x)


def test_a_module_list_a_rule_deleted_from_is_indexed_by_position(tmp_path):
    torch.manual_seed(0)
    model = Stack().eval()
    x = torch.randn(3, 8)
    module = fxs.apply(model, [fxs.Delete("layers.1")], example_inputs=(x,)).module
    by_hand = copy.deepcopy(model)
    del by_hand.layers[1]  # renumbers: layers[1] is the original's layers[2]
    expected = by_hand(x)
    for form, held in _forms(module, tmp_path).items():
        assert type(held.layers).__name__ == "PositionalModuleList" and type(held.heads) is nn.ModuleDict, form
        assert [n for n, _ in held.layers.named_children()] == ["0", "2", "3"]  # the state_dict keys stay the original's
        assert len(held.layers) == 3 and held.layers[1] is held.get_submodule("layers.2") and held.layers[-1] is held.get_submodule("layers.3")
        assert [torch.equal(a.weight, b.weight) for a, b in zip(held.layers, by_hand.layers)] == [True] * 3
        assert list(held.heads) == ["a", "b"] and held.heads["b"] is held.get_submodule("heads.b")
        out = held(x)
        assert torch.equal(out[0], expected[0]) and torch.equal(out[1], expected[1]), form
    scripted = torch.jit.script(module)
    assert torch.equal(scripted(x)[1], expected[1])


def test_a_bert_graph_keeps_its_layer_list():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                     intermediate_size=37, max_position_embeddings=64)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 100, (2, 8))
    module = fxs.apply(model, [fxs.Freeze("bert.encoder.layer.0")], example_inputs=(ids,), keep_class=False).module
    layers = module.bert.encoder.layer
    assert type(layers) is nn.ModuleList and len(layers) == 3
    assert [layer is module.get_submodule(f"bert.encoder.layer.{i}") for i, layer in enumerate(layers)] == [True] * 3
    assert torch.equal(layers[2].output.dense.weight, model.bert.encoder.layer[2].output.dense.weight)
    assert torch.equal(module(ids).logits, model(ids).logits)


@pytest.mark.parametrize("containers, problem", [
    ({"features": ["os.system", []]}, "containers 'features': is not [one of Sequential, ModuleList, ModuleDict, "
                                      "InlineSequential, PositionalModuleList, InlineBlock, module names]"),
    ({"features.0.0": ["Sequential", []]}, "containers 'features.0.0': names no parent of the graph's modules"),
    ({"nothing": ["ModuleList", []]}, "containers 'nothing': names no parent of the graph's modules"),
    (["features"], "containers: is not a dict of paths"),
])
def test_tampered_containers_are_refused(mobilenet, tmp_path, containers, problem):
    _, module, _ = mobilenet
    fxs.save(module, tmp_path / "o")
    doc = json.loads((tmp_path / "o" / "graph.json").read_text())
    doc["containers"] = containers
    (tmp_path / "o" / "graph.json").write_text(json.dumps(doc))
    rehash(tmp_path / "o")
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert str(err.value) == bounded(f"{tmp_path / 'o' / 'graph.json'}: {problem}; {FIX}")


class TrainOnly(nn.Module):
    """Code that differs by mode beside containers: model.py holds a forward per mode and the containers' helpers."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
        self.blocks = nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        h = self.body(x)
        if self.training:
            h = h * 2
        h = self.blocks[0](h) + self.blocks[1](h)  # both on h: blocks is no chain
        return self.head(h)


def test_a_model_of_two_modes_with_containers_saves_and_runs_each_mode(tmp_path):
    torch.manual_seed(0)
    model = TrainOnly()
    x = torch.randn(3, 4)
    module = fxs.apply(model, [fxs.Freeze("body")], example_inputs=(torch.randn(2, 4),)).module
    for form, held in _forms(module, tmp_path).items():
        assert (type(held.body), type(held.blocks).__name__, type(held.blocks[0])) == (nn.Sequential, "InlineSequential", nn.Sequential)
        for training in (True, False):
            model.train(training)
            held.train(training)
            assert torch.equal(held(x), model(x)), (form, training)


BLOCK_CALL = ("this block's code runs inline in the result's graph, which calls the layers inside it, not the block; "
              "fix: call the result, or Output('<its path>') for its value")
BLOCK_HOOK = ("a forward hook on a block the result's graph runs inline never runs; fix: register it on a layer the "
              "graph calls (the block's last one), or Output('<its path>') for its value")


def test_a_block_traced_through_refuses_a_call_and_says_a_hook_on_it_never_runs(tmp_path):
    """resnet's layer4[-1] (a BasicBlock, traced through) was a bare nn.Module: called, torch said only "missing the
    required forward"; a Grad-CAM hook on it was taken and never ran."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 64)
    result = fxs.apply(model, [fxs.Freeze("layer1")], example_inputs=(x,))
    for form, module in _forms(result.module, tmp_path).items():
        block = module.layer4[-1]
        assert type(block).__name__ == "InlineBlock", form
        assert torch.equal(module(x), model(x)), form
        with pytest.raises(RuntimeError) as err:
            block(torch.randn(2, 512, 2, 2))
        assert str(err.value) == BLOCK_CALL, form
        seen = []
        with pytest.warns(UserWarning) as warned:
            block.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(out))
        assert [str(w.message) for w in warned] == [BLOCK_HOOK], form
        module.layer4[-1].conv2.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(out))  # a layer the graph calls
        module(x)
        assert len(seen) == 1 and seen[0].shape == (2, 512, 2, 2), form  # the block's hook did not run; the layer's did
