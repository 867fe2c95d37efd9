"""Delete of a block called with several inputs, in a regenerated graph (keep_class=False).

A decoder layer takes the hidden states and the mask, the rotary tables and
the positions; deleting it passes its first argument (the residual stream)
on, as the kept class's `Layers` rule and the opaque-code `Skip` do. The
graph form is what model.py, ONNX and torch.export need, and the CLI asks for
it with --no-keep-class.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import cli
from hf_models import apply, gpt2, ids, llama, logits
from torch import nn

import fxsurgery as fxs

transformers = pytest.importorskip("transformers")


def _no_cache(build):
    model = build()
    model.config.use_cache = False  # a graph takes no cache object
    return model


@pytest.mark.parametrize("build, path, layers", [(llama, "model.layers", 4), (gpt2, "transformer.h", 4)])
@pytest.mark.parametrize("leaf", [False, True], ids=["traced-through", "leaf"])
def test_a_deleted_decoder_layer_passes_its_hidden_states_on(build, path, layers, leaf, tmp_path):
    model = _no_cache(build)
    kept = [i for i in range(layers) if i != 2]
    graph = apply(model, [fxs.Delete(f"{path}.2")], keep_class=False, leaf_paths=[f"{path}.*"] if leaf else ())
    by_class = apply(model, [fxs.Layers(path, order=kept)])  # the kept class's own loop over the layers left
    assert type(graph.module).__mro__[1] is torch.fx.GraphModule
    inside = sorted(k for k in model.state_dict() if k.startswith(f"{path}."))
    assert sorted(k for k in graph.report.dropped if k.startswith(f"{path}.")) == [k for k in inside if k.startswith(f"{path}.2.")]
    x = ids(3, 9)  # not the example's batch or length
    assert torch.equal(logits(graph.module, x), logits(by_class.module, x))
    if not leaf:  # model.py rebuilds torch.nn modules; a transformers layer as a leaf needs its config
        graph.save(tmp_path / "out")
        assert torch.equal(logits(fxs.load(tmp_path / "out"), x), logits(graph.module, x))


@pytest.mark.parametrize("rules", [["model.layers.1", "model.layers.2"], ["model.layers.2", "model.layers.1"],
                                   ["model.layers.[12]"]], ids=["in order", "reversed", "one rule"])
def test_adjacent_traced_through_layers_delete_in_any_order(rules):
    """After layers.1 went, layers.2's first argument was layers.0's output, which the tracer had marked as
    layers.1's: 'it reads 4 tensors, so there is no single input to pass on', in order only."""
    model = _no_cache(llama)
    graph = apply(model, [fxs.Delete(r) for r in rules], keep_class=False)
    by_class = apply(model, [fxs.Layers("model.layers", order=[0, 3])])
    x = ids(3, 9)
    assert torch.equal(logits(graph.module, x), logits(by_class.module, x))


class _Gate(nn.Module):
    """Two inputs, and an output shaped like neither: nothing to pass on."""

    def forward(self, x, y):
        return (x * y).sum(-1)


class _Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate = _Gate()
        self.proj = nn.Linear(4, 4)

    def forward(self, x):
        return self.gate(self.proj(x), x)


def test_a_block_whose_output_is_not_shaped_like_its_first_input_is_still_refused():
    model = _Gated()
    with pytest.raises(fxs.RewriteError) as err:
        fxs.apply(model, [fxs.Delete("gate")], example_inputs=(torch.randn(2, 4),))
    origin, problem = str(err.value).split(" at ", 1)
    assert origin.startswith("rule 1 'delete gate' (") and origin.endswith("test_graph_delete.py:80)")
    assert problem == ("'gate': it reads 2 tensors (proj, x), so there is no single input to "
                       "pass on; fix: replace it instead, or select a node with one input, or make it one call "
                       "(leaf_paths=['gate']) so that its first argument passes through")
    with pytest.raises(fxs.RewriteError) as err:
        fxs.apply(model, [fxs.Delete("gate")], example_inputs=(torch.randn(2, 4),), leaf_paths=["gate"])
    assert str(err.value).split(" at ", 1)[1] == ("'gate': it reads 2 tensors (proj, x), so there is no single input to "
                                                  "pass on; fix: replace it instead, or select a node with one input")


FACTORY = """from hf_models import llama


def cached():
    return llama()


def uncached():
    model = llama()
    model.config.use_cache = False
    return model
"""
RULES = "fxsurgery: 1\nrules:\n  - delete: model.layers.2\n"


def test_the_cli_regenerates_a_transformers_model_with_no_keep_class(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    (tmp_path / "models.py").write_text(FACTORY)
    (tmp_path / "drop.yaml").write_text(RULES)

    def run(factory, *flags):
        return cli("apply", f"{tmp_path / 'models.py'}:{factory}", tmp_path / "drop.yaml", "--input", "1x5:int64",
                   "--quiet", *flags)

    code, _, stderr = run("cached", "--format", "onnx", "-o", tmp_path / "kept")
    assert code == 2 and not (tmp_path / "kept").exists()
    assert stderr == ("fxsurgery: error: formats onnx: a kept LlamaForCausalLM is saved by its own save_pretrained; "
                      "fix: leave formats out, or apply with keep_class=False (--no-keep-class)\n")
    code, _, stderr = run("cached", "--no-keep-class", "-o", tmp_path / "cached")
    assert code == 2 and not (tmp_path / "cached").exists()
    assert stderr == ("fxsurgery: error: cannot write model.py for LlamaForCausalLM: 'LlamaForCausalLM' stays Python "
                      "(NotImplementedError: argument of type: <class 'transformers.cache_utils.DynamicCache'>); "
                      "fix: build the model with config.use_cache=False (a graph takes no cache object) and apply again\n")
    code, stdout, stderr = run("uncached", "--no-keep-class", "-o", tmp_path / "graph")
    assert code == 0, stderr
    assert sorted(os.listdir(tmp_path / "graph")) == ["graph.json", "model.py", "model.safetensors", "surgery.json"]
    loaded = fxs.load(tmp_path / "graph")
    by_class = apply(_no_cache(llama), [fxs.Layers("model.layers", order=[0, 1, 3])])
    x = ids(2, 7)
    assert torch.equal(logits(loaded, x), logits(by_class.module, x))
