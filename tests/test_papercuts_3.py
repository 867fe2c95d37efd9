"""Papercuts of the third round: call-form models that return a NamedTuple save and load, TorchScript takes
unannotated defaults, messages that say what differs and keep their fix."""

import json
import os
import re
import sys
import typing

import pytest
import torch
import torchvision
from conftest import rehash
from torch import nn

import fxsurgery as fxs
from fxsurgery import Replace, SaveError


class Scores(typing.NamedTuple):
    logits: torch.Tensor
    features: torch.Tensor


class TwoInputs(nn.Module):
    """Takes `y` after a parameter left at its default: captured in call form (its graph's signature could not be Python)."""

    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, scale=None, y=None):
        h = torch.relu(self.body(x + y))
        return Scores(self.fc(h), h)


class TwoInputsDict(TwoInputs):
    def forward(self, x, scale=None, y=None):
        h = torch.relu(self.body(x + y))
        return {"logits": self.fc(h), "features": (h, h * 2)}


def test_a_call_form_model_loads_from_graph_json(tmp_path):
    torch.manual_seed(0)
    model = TwoInputsDict().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    result = fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=5))], example_inputs=(x,), example_kwargs={"y": y})
    result.save(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "graph.json").read_text())["call"]["fixed"] == [[1, None]]  # scale=None
    loaded = fxs.load(tmp_path / "out")  # no model.py imported
    want, got = result.module(x, y=y), loaded(x, None, y)
    assert list(got) == ["logits", "features"] and torch.equal(got["logits"], want["logits"])
    assert torch.equal(got["features"][1], want["features"][1]) and torch.equal(got["features"][0], torch.relu(model.body(x + y)))
    with pytest.raises(RuntimeError) as err:  # a call the capture does not cover: refused as the result refuses it
        loaded(x, 2.0, y=y)
    assert str(err.value) == ("the model was captured with scale=None and this call gives scale=2.0; fix: capture with "
                              "example_kwargs={'scale': 2.0}")


@pytest.mark.parametrize("given", ["x, y=x", "y=x, x=x"])
def test_one_tensor_given_twice_becomes_two_inputs(tmp_path, given):
    # the example passes one tensor object as both x and y: later calls give two, in either keyword order
    torch.manual_seed(0)
    model = TwoInputsDict().eval()
    x = torch.randn(2, 4)
    args, kwargs = ((x,), {"y": x}) if given == "x, y=x" else ((), {"y": x, "x": x})
    result = fxs.apply(model, [], example_inputs=args, example_kwargs=kwargs)
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    for call in (lambda m: m(a, y=b), lambda m: m(y=b, x=a), lambda m: m(a, None, b)):
        assert torch.equal(call(result.module)["logits"], model(a, y=b)["logits"])
    result.save(tmp_path / "out")
    loaded = fxs.load(tmp_path / "out")
    assert torch.equal(loaded(y=b, x=a)["logits"], model(a, y=b)["logits"])


def _two_inputs():
    torch.manual_seed(0)
    model = TwoInputs().eval()
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    result = fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=5))], example_inputs=(x,), example_kwargs={"y": y})
    return result, x, y


def test_a_call_form_model_returning_a_namedtuple_saves_and_loads(tmp_path):
    result, x, y = _two_inputs()
    want = result.module(x, y=y)
    assert type(want) is Scores and want.logits.shape == (2, 5)
    result.save(tmp_path / "out")
    assert "OUTPUT = pytree.tree_structure(test_papercuts_3.Scores(0, 0))" in (tmp_path / "out" / "model.py").read_text()
    loaded = fxs.load(tmp_path / "out", trust_code=True)
    got = loaded(x, y=y)
    assert type(got) is Scores
    assert torch.equal(got.logits, want.logits) and torch.equal(got.features, want.features)
    with pytest.raises(SaveError) as err:  # graph.json cannot hold the call form: the message says so and how to load
        fxs.load(tmp_path / "out")
    assert str(err.value) == (f"{tmp_path / 'out'}: graph.json cannot describe this model (its call or output holds a NamedTuple, "
                              "which model.py imports), so loading it means importing model.py; fix: read model.py and load with "
                              "trust_code=True (--trust-code) if you trust it")


def test_a_namedtuple_model_py_cannot_import_is_one_line_and_writes_nothing(tmp_path):
    Local = typing.NamedTuple("Local", [("a", torch.Tensor)])
    Local.__qualname__ = "maker.<locals>.Local"  # as a class defined inside a function is named

    class Returns(TwoInputs):
        def forward(self, x, scale=None, y=None):
            return Local(self.fc(torch.relu(self.body(x + y))))

    torch.manual_seed(0)
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    result = fxs.apply(Returns().eval(), [Replace("fc", nn.Linear(8, 2))], example_inputs=(x,), example_kwargs={"y": y})
    with pytest.raises(SaveError) as err:
        result.save(tmp_path / "out")
    assert str(err.value) == ("cannot write model.py: the output is a Local, defined in a function, which model.py cannot "
                              "import; fix: define it at the top level of an importable module")
    assert not os.path.exists(tmp_path / "out") and os.listdir(tmp_path) == []


class Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.fc = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x, k=2, bias=0.5):
        return self.fc(torch.relu(self.body(x)) * k + bias)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_torchscript_exports_a_forward_with_unannotated_number_defaults(tmp_path):
    torch.manual_seed(0)
    model = Scaled().eval()
    x = torch.randn(2, 4)
    result = fxs.apply(model, [fxs.Freeze("body")], example_inputs=(x,))
    code_before = result.module.code
    result.save(tmp_path / "out", formats=["torchscript"])
    assert result.module.code == code_before  # the annotations were for TorchScript only
    scripted = torch.jit.load(str(tmp_path / "out" / "model.torchscript.pt"))
    assert torch.equal(scripted(x), model(x)) and torch.equal(scripted(x, 2, 0.5), model(x, 2, 0.5))
    args = scripted.forward.schema.arguments  # self, x, k, bias
    assert [(a.name, str(a.type), a.default_value) for a in args[2:]] == [("k", "int", 2), ("bias", "float", 0.5)]


def test_an_inner_call_refused_for_a_list_of_other_length_says_both_lengths():
    """Faster R-CNN captured on 2 images refuses 3 at roi_heads.box_roi_pool, which takes one boxes tensor per image."""
    from torch.utils import _pytree as pytree
    from torchvision.ops import MultiScaleRoIAlign

    from fxsurgery.capture import mismatch, normalise, signature_of
    pool = MultiScaleRoIAlign(["0"], 7, 2)
    signature = signature_of(pool)
    features, sizes = {"0": torch.randn(2, 4, 8, 8)}, [(32, 32), (32, 32)]

    def boxes(n):
        return [torch.rand(5, 4) for _ in range(n)]
    leaves, spec = pytree.tree_flatten(normalise(signature, (features, boxes(2), sizes), {}))
    fixed = {i: v for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)}
    assert mismatch(signature, spec, fixed, (features, boxes(3), sizes), {}, "roi_heads.box_roi_pool") == (
        "'roi_heads.box_roi_pool' was captured with boxes=a list of 2 tensors and this call gives boxes=a list of 3 tensors; "
        "fix: capture with example inputs that make the model call it this way")
    # its twin: the captured length is the captured call, nothing to refuse
    again, again_spec = pytree.tree_flatten(normalise(signature, (features, boxes(2), sizes), {}))
    assert again_spec == spec


def test_fold_bn_with_nothing_to_fold_keeps_why_and_the_fix_whole(tmp_path):
    """Its message passes the 300-character bound behind the shipped rule file's path: the why and the fix stay whole,
    the fix the flag (it said 'call .eval() on the model' then 'check the selectors', --eval last)."""
    from test_bad_inputs import run_cli
    out = tmp_path / "out"
    code, _, stderr, raised = run_cli(["apply", "torchvision.models:resnet18", "fold-bn", "--input", "1x3x64x64", "-o", str(out)])
    assert code == 2 and not out.exists() and len(raised.full) > 300
    assert stderr.startswith("fxsurgery: error: nothing to change: rule 1 'rewrite fold_bn (...)' (")
    assert stderr.endswith(": every candidate was left alone: conv1 (Conv2d) + bn1 (BatchNorm2d): BatchNorm2d is in training mode, "
                           "where it normalises with batch statistics; fix: pass --eval (inference rewrites such as fold-bn need "
                           "the model in eval mode)\n")


def test_a_bounded_problem_keeps_its_first_clause_where_the_rest_leaves_room():
    from fxsurgery.errors import bounded
    message = "r.yaml:3: what was tried: " + ": ".join(f"step {i} " + "x" * 40 for i in range(8)) + ": why it failed; fix: do this"
    steps = ": ".join(f"step {i} {'x' * 10}...{'x' * 10}" for i in range(1, 8))  # long words shortened first, then step 0 left out
    assert bounded(message) == f"r.yaml:3: what was tried: ...: {steps}: why it failed; fix: do this"
    assert bounded(message.replace("what was tried", "tried " * 40)).startswith("r.yaml:3: ...: step ")  # a long first clause goes first


def test_a_vit_with_a_new_head_loads_from_graph_json_in_both_modes(tmp_path):
    """torchvision's ViT code (vit_b_16's, at a small size), dropout on: graph.json rebuilds it without model.py."""
    import torchvision
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                                                 dropout=0.1, attention_dropout=0.1)
    x = torch.randn(2, 3, 32, 32)
    result = fxs.apply(model, [Replace("heads.head", fxs.new(nn.Linear, out_features=10))], example_inputs=(x,))
    result.save(tmp_path / "out")
    loaded = fxs.load(tmp_path / "out")
    assert isinstance(loaded, torch.fx.GraphModule) and loaded.heads.head.out_features == 10
    for mode in (False, True):
        result.module.train(mode)
        loaded.train(mode)
        torch.manual_seed(1)
        want = result.module(x)
        torch.manual_seed(1)
        got = loaded(x)
        assert torch.equal(got, want), mode
    torch.manual_seed(2)
    assert not torch.equal(loaded(x), want)  # train mode: dropout draws, so the seeded comparison above means something


def test_inspect_groups_lists_the_attention_heads_prune_can_remove(tmp_path):
    from conftest import cli
    (tmp_path / "vitmodel.py").write_text(
        "import torchvision\n\n\ndef small_vit():\n    return torchvision.models.VisionTransformer(image_size=32, patch_size=16, "
        "num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64)\n")
    code, stdout, _ = cli("inspect", f"{tmp_path / 'vitmodel.py'}:small_vit", "--input", "1x3x32x32", "--groups")
    assert code == 0
    text = stdout.split("\n\n", 1)[1].splitlines()  # after the channel groups
    assert text[0] == "2 attention modules, 2 with heads Prune(sel, heads=[...]) can remove"
    assert [line.split() for line in text[3:]] == [["1", "encoder.layers.encoder_layer_0.self_attention", "4", "8", "3", "-"],
                                                   ["2", "encoder.layers.encoder_layer_1.self_attention", "4", "8", "3", "-"]]
    code, stdout, _ = cli("inspect", f"{tmp_path / 'vitmodel.py'}:small_vit", "--input", "1x3x32x32", "--groups", "--json")
    rows = json.loads(stdout)
    assert rows[-1] == {"layers": ["encoder.layers.encoder_layer_1.self_attention"], "heads": 4, "head_dim": 8, "group": 1,
                        "tensors": 3, "refused": None}
    # its twin: a ResNet has no attention, and its table ends with its channel groups
    code, stdout, _ = cli("inspect", "torchvision.models:resnet18", "--input", "1x3x64x64", "--groups")
    assert code == 0 and "attention" not in stdout


def test_groups_list_grouped_query_heads_and_refuse_what_prune_refuses():
    import hf_models as H

    from fxsurgery.views._groups import attention_heads, groups_table
    rows = attention_heads(H.llama())
    assert rows[0] == {"layers": ["model.layers.0.self_attn"], "heads": 2, "head_dim": 8, "group": 2, "tensors": 4, "refused": None}
    assert groups_table(rows).splitlines()[-4].split() == ["1", "model.layers.0.self_attn", "2", "(x2", "query)", "8", "4", "-"]
    bert = attention_heads(H.bert())  # the attention module, not its `self` part inside it
    assert [r["layers"] for r in bert] == [[f"bert.encoder.layer.{i}.attention"] for i in range(4)]
    refused = attention_heads(nn.Sequential(nn.MultiheadAttention(8, 2, add_bias_kv=True)))
    assert refused == [{"layers": ["0"], "heads": None, "head_dim": None, "group": None, "tensors": 0,
                        "refused": "node '0': MultiheadAttention heads are not followed when it adds learned key/value biases (add_bias_kv)"}]


class TrainOnly(nn.Module):
    """Calls `noise` in train mode only: a graph per mode, and a module that only one of them holds."""

    def __init__(self):
        super().__init__()
        self.fc, self.noise = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        y = self.fc(x)
        if self.training:
            y = y + self.noise(x)
        return y


def test_a_model_running_other_code_per_mode_loads_from_graph_json(tmp_path):
    torch.manual_seed(0)
    model, x = TrainOnly(), torch.randn(2, 4)
    result = fxs.apply(model, [Replace("fc", fxs.new(nn.Linear, out_features=3))], example_inputs=(x,))
    result.save(tmp_path / "out")
    graph = json.loads((tmp_path / "out" / "graph.json").read_text())
    assert [a["path"] for a in graph["attributes"]] == ["fc", "noise"] and graph["other"]["training"] is False
    loaded = fxs.load(tmp_path / "out")  # no model.py imported
    for mode in (True, False):
        assert torch.equal(loaded.train(mode)(x), result.module.train(mode)(x))
    assert torch.equal(loaded.train()(x), result.module.fc(x) + model.noise(x))
    assert torch.equal(loaded.eval()(x), result.module.fc(x))
    fxs.save(loaded.train(), tmp_path / "again")  # saved as it was loaded
    assert (tmp_path / "again" / "graph.json").read_text() == (tmp_path / "out" / "graph.json").read_text()


def test_an_output_type_of_the_running_script_is_refused_in_one_line(tmp_path):
    Scripted = typing.NamedTuple("Scripted", [("logits", torch.Tensor)])
    Scripted.__module__ = "__main__"  # as a class defined in a script run with `python script.py` is

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return Scripted(self.fc(x))

    result = fxs.apply(Head(), [Replace("fc", nn.Linear(4, 2))], example_inputs=(torch.randn(2, 4),))
    with pytest.raises(SaveError) as err:
        result.save(tmp_path / "out")
    assert str(err.value) == ("cannot write model.py: the forward uses Scripted, defined in the script being run, which model.py "
                              "cannot import; fix: define it at the top level of an importable module")
    assert os.listdir(tmp_path) == []


def _call_form_loaded_with(tmp_path, change) -> str:
    """The message of fxs.load for a saved call-form model whose graph.json `call` is changed (and its hash made to fit)."""
    torch.manual_seed(0)
    x, y = torch.randn(2, 4), torch.randn(2, 4)
    fxs.apply(TwoInputsDict().eval(), [], example_inputs=(x,), example_kwargs={"y": y}).save(tmp_path / "o")
    graph = json.loads((tmp_path / "o" / "graph.json").read_text())
    change(graph["call"])
    (tmp_path / "o" / "graph.json").write_text(json.dumps(graph))
    rehash(tmp_path / "o")
    with pytest.raises(SaveError) as err:
        fxs.load(tmp_path / "o")
    return str(err.value)


@pytest.mark.parametrize("name, problem", [
    ("transformers.modeling_outputs.Unloaded", "is not registered with torch's pytree by importing transformers.modeling_outputs; "
                                               "fix: register it before loading"),
    ("unittest.__main__.Out", "names no module a library defines a type in; fix: write the directory again with save()"),
    ("json.tool.Out", "is read once its library is imported; fix: pass --allow-module json (allow=('json',)) if you trust it"),
    ("transformers._private.Out", "names no module a library defines a type in; fix: write the directory again with save()"),
    (".transformers.Out", "names no module a library defines a type in; fix: write the directory again with save()"),
    ("transformers.testing_utils.Out", "is not in a module transformers defines output types in; fix: pass --allow-module "
                                       "transformers (allow=('transformers',)) if you trust it"),  # imports thousands of modules
    ("transformers.models.q.modeling_q.O", "cannot be read: importing transformers.models.q.modeling_q fails "
                                          "(ModuleNotFoundError: No module named 'transformers.models.q'); fix: install the library that defines it"),
])
def test_a_call_form_output_type_is_imported_only_from_a_library_the_user_imported(tmp_path, name, problem):
    """A transformers output type is known to torch by name once the transformers module defining it is imported:
    the loader imports that module where the user imported transformers, and no module of any other package."""
    pytest.importorskip("transformers")
    def unloaded(call):
        call["output"] = call["output"].replace("builtins.dict", name, 1)
    assert _call_form_loaded_with(tmp_path, unloaded) == f"{tmp_path / 'o' / 'graph.json'}: call: output type {name} {problem}"


@pytest.mark.parametrize("change, problem", [
    (lambda call: call.pop("order"), "is not {parameters, call, fixed, order, output}"),
    (lambda call: call["parameters"][0].update(kind=["x"]), "parameters are not a list of {name, kind, default}"),
    (lambda call: call.update(order=[0]), "order does not take each tensor of the call once"),
    (lambda call: call.update(fixed=[[99, None]]), "fixed or order are not positions in the call"),
])
def test_a_malformed_call_form_names_the_entry(tmp_path, change, problem):
    from fxsurgery.export._graphload import FIX
    assert _call_form_loaded_with(tmp_path, change) == f"{tmp_path / 'o' / 'graph.json'}: call: {problem}; {FIX}"


@pytest.mark.parametrize("where", ["call", "output"])
def test_an_enum_in_a_call_form_tree_imports_nothing(tmp_path, monkeypatch, where):
    """torch's tree reader imports the module an "__enum__" context names (the directory's own model.py, any
    installed module): graph.json's trees are read only once no enum is in them."""
    (tmp_path / "planted.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\nclass E: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def enum(call):
        proto, spec = json.loads(call[where])
        spec["children_spec"].append({"type": "builtins.dict", "children_spec": [],
                                      "context": json.dumps([{"__enum__": True, "fqn": "planted:E", "name": "x"}])})
        call[where] = json.dumps([proto, spec])
    assert _call_form_loaded_with(tmp_path, enum) == (
        f"{tmp_path / 'o' / 'graph.json'}: call: holds an enum in a tree structure, which torch would import a module to read; "
        "fix: write the directory again with save(), or read model.py and load with trust_code=True (--trust-code) if you trust it")
    assert not (tmp_path / "ran").exists() and "planted" not in sys.modules


@pytest.mark.parametrize("module, name", [("planted", "E"), ("builtins", "eval"), ("os", "system")])
def test_a_defaultdict_in_a_call_form_tree_imports_and_calls_nothing(tmp_path, monkeypatch, module, name):
    """torch reads a defaultdict node by importing its factory's module (the directory's own model.py, run from
    inside it) and the output calls that factory on a missing key: only a builtin container or number is read."""
    (tmp_path / "planted.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').close()\nE = dict\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def factory(call):
        proto, spec = json.loads(call["output"])
        call["output"] = json.dumps([proto, {"type": "collections.defaultdict", "children_spec": spec["children_spec"], "context": {
            "default_factory_module": module, "default_factory_name": name, "dict_context": json.loads(spec["context"])}}])
    assert _call_form_loaded_with(tmp_path, factory) == (
        f"{tmp_path / 'o' / 'graph.json'}: call: holds a defaultdict of a factory torch would import; fix: write the directory again with save(), or read model.py and load with trust_code=True "
        "(--trust-code) if you trust it")
    assert not (tmp_path / "ran").exists() and "planted" not in sys.modules


class Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x, y=None):
        h = self.fc(x + y)
        top = h.topk(2, dim=1)
        return {"best": h.max(dim=1).values + top.values[:, 0], "where": top.indices}


def test_result_fields_load_from_graph_json(tmp_path):
    """`.values` and `.indices` of torch's result tuples are data, read by getattr like `.shape`: a graph reading
    them loads without model.py (refused as methods by name) and computes what the original does."""
    torch.manual_seed(0)
    model = Grouped().eval()
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    fxs.apply(model, [], example_inputs=(x,), example_kwargs={"y": y}).save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o")
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    got, want = loaded(x, y=y), model(x, y=y)
    assert torch.equal(got["best"], want["best"]) and torch.equal(got["where"], want["where"])


def test_nothing_to_fold_under_eval_does_not_ask_for_eval(tmp_path):
    """A model without BatchNorm under --eval: the fix asked for --eval, which was given. (timm's EfficientNet, once
    the example here, folds: its BatchNormAct2d layers are called as one module for fold_bn.)"""
    pytest.importorskip("timm")
    from test_bad_inputs import run_cli
    code, _, stderr, raised = run_cli(["apply", "torchvision.models:squeezenet1_0", "fold-bn", "--eval", "--input", "1x3x64x64",
                                       "-o", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists()
    assert raised.full.endswith("; fix: check the selectors against 'fxsurgery inspect MODEL'") and "--eval" not in raised.full
    code, stdout, _, _ = run_cli(["apply", "timm.models:efficientnet_b0", "fold-bn", "--eval", "--input", "1x3x64x64", "-o", str(tmp_path / "e")])
    assert code == 0 and re.search(r"rewrite fold_bn \(conv \+ batchnorm -> conv\) +49 ", stdout)


def test_a_closed_pipe_ends_the_output_quietly():
    """`fxsurgery rules | head -1` ended in an internal error (BrokenPipeError): here the reader (`true`) is gone
    before the first line is written."""
    import subprocess
    proc = subprocess.run(f"{sys.executable} -m fxsurgery.cli rules | true; echo ${{PIPESTATUS[0]}}", shell=True, capture_output=True,
                          text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), executable="/bin/bash")
    assert (proc.stdout, proc.stderr) == ("0\n", "")


def test_a_shipped_rule_file_loads_by_its_name_in_python_as_on_the_command_line(tmp_path, monkeypatch):
    """fxs.load_rules("prune-half") said "check the path", while `fxsurgery apply MODEL prune-half` took the name."""
    from conftest import RULES
    by_name = fxs.load_rules("prune-half")
    assert by_name.source == os.path.join(RULES, "prune-half.yaml")
    assert [str(r) for r in by_name] == [str(r) for r in fxs.load_rules(os.path.join(RULES, "prune-half.yaml"))]
    assert [str(r) for r in fxs.load_rules("classifier-head.yaml", params={"num_classes": 3})] == ["replace fc with Linear(out_features=3)"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fold-bn").write_text("fxsurgery: 1\nrules:\n  - freeze: fc\n")  # a file of the user's comes first
    assert [str(r) for r in fxs.load_rules("fold-bn")] == ["freeze fc"]
    (tmp_path / "fold-bn").unlink()
    (tmp_path / "fold-bn.yaml").write_text("fxsurgery: 1\nrules:\n  - freeze: fc\n")  # so does NAME.yaml, as the shipped ones are named
    assert [str(r) for r in fxs.load_rules("fold-bn")] == ["freeze fc"]
    from fxsurgery.cli import shipped
    assert shipped("fold-bn") == "fold-bn.yaml" and shipped("prune-half") == os.path.join(RULES, "prune-half.yaml")
    with pytest.raises(fxs.RuleError) as err:
        fxs.load_rules("no-such-rules")
    assert str(err.value) == "no-such-rules: cannot read rule file: No such file or directory; fix: check the path, or see 'fxsurgery rules'"
    with pytest.raises(fxs.RuleError) as err:  # a shipped name misspelled: the closest shipped ones
        fxs.load_rules("classifer-head")
    assert str(err.value) == ("classifer-head: cannot read rule file: No such file or directory; fix: did you mean classifier-head? "
                              "('fxsurgery rules' lists them)")


def test_explain_says_why_when_no_rule_matched(tmp_path):
    """--explain is asked for exactly when nothing matched: it printed nothing, as the refusal came first."""
    from test_bad_inputs import run_cli
    code, stdout, stderr, _ = run_cli(["apply", "torchvision.models:resnet18", "fold-bn", "--input", "1x3x64x64", "--explain",
                                       "-o", str(tmp_path / "out")])
    assert code == 2 and not (tmp_path / "out").exists() and stderr.startswith("fxsurgery: error: nothing to change: ")
    lines = stdout.splitlines()
    assert lines[0] == "explain:" and lines[1].startswith("rule 1 'rewrite fold_bn (conv + batchnorm -> conv)' (")
    assert lines[1].endswith("fold-bn.yaml:11): 0 matches")
    assert lines[2] == ("  left alone: conv1 (Conv2d) + bn1 (BatchNorm2d): BatchNorm2d is in training mode, where it normalises "
                        "with batch statistics: call .eval() on the model before folding")


def test_rules_refuse_none_as_their_selector_and_nan_among_a_modules_settings(tmp_path):
    """Freeze(None) was an AttributeError, Delete(None) was accepted; nn.Dropout(nan) passes its own check and
    failed at the first call (nn.LeakyReLU(nan) made every output NaN), and `fxsurgery check` passed its rule file."""
    here = "tests/test_papercuts_3.py:"
    for rule, action in ((lambda: fxs.Freeze(None), "freeze"), (lambda: fxs.Delete(None), "delete")):
        with pytest.raises(fxs.RuleError) as err:
            rule()
        assert str(err.value).startswith(here) and str(err.value).endswith(
            f": {action} needs a selector of what it acts on, got None; fix: name module paths or a type, e.g. "
            f"{action.capitalize()}('layer1.*')")
    for module, name, kind in ((nn.Dropout(float("nan")), "p", "Dropout"), (fxs.new(nn.LeakyReLU, negative_slope=float("nan")),
                                                                         "negative_slope", "torch.nn.LeakyReLU"),
                               (nn.Upsample(scale_factor=(float("nan"), 2.0)), "scale_factor", "Upsample"),  # inside a tuple
                               (fxs.new(nn.LeakyReLU, negative_slope=torch.tensor(float("nan"))), "negative_slope", "torch.nn.LeakyReLU")):
        with pytest.raises(fxs.RuleError) as err:
            fxs.Insert(module, after="0")
        assert str(err.value).endswith(f": inserted module {kind} has {name}=nan, which is not a number; fix: give {name} a value")
    rules = tmp_path / "nan.yaml"
    rules.write_text("fxsurgery: 1\nrules:\n  - insert: {after: '0', module: torch.nn.Dropout, p: .nan}\n")
    from conftest import cli
    code, _, stderr = cli("check", rules)
    assert (code, stderr) == (2, f"fxsurgery: error: {rules}:3: inserted module torch.nn.Dropout has p=nan, which is not a "
                                 "number; fix: give p a value\n")


def test_a_plan_prints_as_its_table():
    """print(result.plan) dumped kilobytes of dataclass fields."""
    result = fxs.apply(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), [fxs.Freeze("0")])
    assert repr(result.plan) == str(result.plan) == result.plan.table()
    assert str(result.plan).splitlines()[2].split() == ["1", "freeze", "0", "1", "0"]


def test_modules_whose_tensors_cannot_join_the_model_are_refused_by_the_rule():
    """An inserted module built on meta, or holding a sparse or quantized tensor, failed inside the shape pass with
    'Tensor on device meta is not on the expected device cpu!' or 'unsupported memory format option Preserve'."""
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 4)
    here = "tests/test_papercuts_3.py:"
    with pytest.raises(fxs.RuleError) as err:
        fxs.apply(model, [fxs.Insert(nn.Linear(4, 4, device="meta"), after="1")], example_inputs=(x,))
    assert str(err.value).startswith(here) and str(err.value).endswith(
        ": insert Linear: its tensors are on the meta device, with no values; fix: build it "
        "outside fxs.empty_weights(), or pass fxs.new(torch.nn.Linear, ...)")
    with fxs.empty_weights():  # a model built without weights fills its own from a checkpoint, never an added module's
        empty = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(fxs.RuleError, match=r": insert Linear: its tensors are on the meta device, with no values; fix"):
        fxs.apply(empty, [fxs.Insert(nn.Linear(4, 4, device="meta"), after="1")], stream=True)
    with pytest.raises(fxs.RuleError, match=r": replace Linear: its tensors are on the meta device"):
        fxs.apply(model, [fxs.Replace("2", nn.Linear(4, 2, device="meta"), weights="keep")], example_inputs=(x,))
    sparse, quantized = nn.Linear(4, 4), nn.Linear(4, 4)
    sparse.weight = nn.Parameter(sparse.weight.detach().to_sparse())
    quantized.register_buffer("scale", torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8))
    for module, why in ((sparse, "its tensor weight is sparse_coo; fix: give it dense tensors (.to_dense())"),
                        (quantized, "its tensor scale is quantized (torch.qint8); fix: give it float tensors (.dequantize())")):
        with pytest.raises(fxs.RuleError) as err:
            fxs.Insert(module, after="1")
        assert str(err.value).startswith(here) and str(err.value).endswith(f": inserted module Linear cannot join the model: {why}")


def test_a_spec_on_the_meta_device_and_a_model_that_is_no_module_are_refused():
    """fxs.new(..., device='meta') was accepted and the rule file's form failed with 'Cannot copy out of meta tensor';
    apply('not a model') was an AttributeError."""
    with pytest.raises(fxs.RuleError) as err:
        fxs.new(nn.Linear, out_features=5, device="meta")
    assert str(err.value).endswith(": torch.nn.Linear(device='meta') would have no values to run or save; fix: leave device out "
                                   "(the module is built where the model's tensors are)")
    with pytest.raises(fxs.ModelError) as err:
        fxs.apply("not a model", [])
    assert str(err.value) == ("apply needs a torch.nn.Module, got a str; fix: pass the model object, e.g. "
                              "fxs.apply(torchvision.models.resnet18(), rules)")


def test_a_layer_larger_than_the_machine_is_refused_before_it_is_allocated():
    """out_features: 10**10 in a rule file was allocated and initialised (186 GiB) until memory ran out."""
    model, x = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 4)
    with pytest.raises(fxs.RewriteError) as err:
        fxs.apply(model, [fxs.Replace("2", fxs.new(nn.Linear, out_features=10 ** 12))], example_inputs=(x,))
    assert re.fullmatch(r"rule 1 'replace 2 with Linear\(out_features=1000000000000\)' \(tests/test_papercuts_3.py:\d+\) at '2': "
                        r"torch.nn.Linear\(out_features=1000000000000, in_features=4\) would hold 18626.5 GiB of tensors, more than half "
                        r"this machine's memory \(\d+\.\d GiB\); fix: give sizes that fit", str(err.value)), str(err.value)
    with pytest.raises(fxs.RewriteError) as err:  # device= named: still measured on meta, when the rule is made and applied
        fxs.apply(model, [fxs.Replace("2", fxs.new(nn.Linear, out_features=10 ** 12, device="cpu"))], example_inputs=(x,))
    assert "would hold 18626.5 GiB of tensors, more than half this machine's memory" in str(err.value)


def test_a_result_prints_as_one_line():
    """repr(result) was 76 KB for resnet18 (228 KB for a two-layer Llama): every example tensor and captured call."""
    result = fxs.apply(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), [fxs.Freeze("0"), fxs.Replace("2", nn.Linear(4, 3))],
                       example_inputs=(torch.randn(1, 4),))
    assert repr(result) == ("SurgeryResult(regenerated graph module, 2 rules (matches 1: 1, 2: 1), tensors: 2 transferred, 2 new, "
                            "2 dropped, 2 frozen; .summary() says more)")
    assert repr(fxs.apply(nn.Sequential(nn.Linear(4, 2)), [], example_inputs=(torch.randn(1, 4),))) == (
        "SurgeryResult(regenerated graph module, 0 rules, tensors: 2 transferred; .summary() says more)")


def test_a_dry_run_refuses_what_model_py_cannot_rebuild(tmp_path):
    """--dry-run passed (and --format onnx with it) where the save then refused model.py (an activation function of
    the user's own, which model.py cannot write down)."""
    from test_bad_inputs import run_cli
    (tmp_path / "tiny_tf.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Tiny(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, batch_first=True, activation=torch.tanh), 1, "
        "enable_nested_tensor=False)\n"
        "        self.head = nn.Linear(8, 2)\n\n    def forward(self, x):\n        return self.head(self.enc(x))\n")
    for extra in ([], ["--format", "onnx"]):
        code, stdout, stderr, raised = run_cli(["apply", f"{tmp_path / 'tiny_tf.py'}:Tiny", "drop-dropout", "--input", "2x5x8", "--dry-run", *extra])
        assert (code, stdout, type(raised)) == (2, "", fxs.SaveError)
        assert stderr == ("fxsurgery: error: cannot write model.py: module 'enc.encoder_layer' (torch.nn.TransformerEncoderLayer) argument "
                          "'activation' is a builtin_function_or_method, not a literal; fix: use a module whose arguments are plain values\n")


def test_a_dry_run_refuses_what_each_kind_of_save_refuses(tmp_path):
    """--dry-run passed a kept torchvision model model.py cannot rebuild, a kept transformers model whose adapters
    from_pretrained would drop, and a regenerated causal LM whose forward stays Python: each save then refused."""
    pytest.importorskip("transformers")
    from test_bad_inputs import run_cli
    (tmp_path / "tiny.py").write_text(
        "import torch, transformers\n\n\ndef bert():\n    torch.manual_seed(0)\n    return transformers.BertForSequenceClassification("
        "transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, "
        "intermediate_size=32)).eval()\n\n\ndef llama():\n    torch.manual_seed(0)\n    return transformers.LlamaForCausalLM("
        "transformers.LlamaConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, "
        "intermediate_size=32)).eval()\n")
    cases = [
        (["torchvision.models:resnet18", "classifier-head", "--input", "1x3x64x64", "--keep-class"],
         "cannot write model.py: module 'layer1.0' (torchvision.models.resnet.BasicBlock) does not keep its constructor argument "
         "'inplanes'; fix: use a torch.nn module there, or in Python, torch.save(result.module) keeps it as it is (loading "
         "that needs fxsurgery)"),
        ([f"{tmp_path / 'tiny.py'}:bert", "lora", "--input", "1x8:int64"],
         "BertForSequenceClassification: 'bert.encoder.layer.0.attention.self.query.base.weight' (8 tensors in all) is not "
         "built by its config, so from_pretrained would drop it; fix: apply with keep_class=False (--no-keep-class; saved as "
         "model.py + safetensors)"),
        ([f"{tmp_path / 'tiny.py'}:llama", "freeze-backbone", "--set", "head=lm_head", "--input", "1x8:int64", "--no-keep-class"],
         "cannot write model.py for LlamaForCausalLM: 'LlamaForCausalLM' stays Python (NotImplementedError: argument of type: "
         "<class 'transformers.cache_utils.DynamicCache'>); fix: build the model with config.use_cache=False (a graph takes no "
         "cache object) and apply again"),
    ]
    for argv, message in cases:
        code, stdout, stderr, raised = run_cli(["apply", *argv, "--dry-run", "--quiet"])
        assert (code, stdout, type(raised)) == (2, "", fxs.SaveError), stderr
        assert stderr == fxs.errors.bounded(f"fxsurgery: error: {message}") + "\n"
        code, _, saved, _ = run_cli(["apply", *argv, "--quiet", "-o", str(tmp_path / "out")])  # the save says the same
        assert (code, saved) == (2, stderr) and not (tmp_path / "out").exists()


def test_a_shipped_rule_that_matches_nothing_names_its_param():
    """linear-probe on a timm MobileNetV3 ('fc' matches nothing) said 'correct the selector', in a file shipped with
    fxsurgery; the param to set (head) and the model's head were not said."""
    pytest.importorskip("timm")
    from test_bad_inputs import run_cli
    code, _, stderr, raised = run_cli(["apply", "timm.models:mobilenetv3_small_050", "linear-probe", "--set", "num_classes=5",
                                       "--input", "1x3x64x64", "--dry-run"])
    assert code == 2 and raised.full.endswith(
        "matched nothing: no module path or node name matches 'fc'; fix: set the file's param: --set head=classifier, the model's "
        "last Linear (params={'head': ...} in Python)")
    code, stdout, _, _ = run_cli(["apply", "timm.models:mobilenetv3_small_050", "linear-probe", "--set", "num_classes=5",
                                  "--set", "head=classifier", "--input", "1x3x64x64", "--dry-run"])
    assert code == 0 and "dry run: nothing written" in stdout


def test_a_shortened_message_drops_its_asides_before_its_reason():
    """The 300-character bound kept the list of types present and cut 'no call of torch.nn.Linear ... in the traced
    graphs', the reason."""
    from fxsurgery.errors import bounded
    where = "rule 2 'rewrite lora (rank 8, alpha 16)' (rules/lora.yaml:15) matched nothing"
    types = ", ".join(f"Type{i}" for i in range(40))
    message = f"{where}: no call of torch.nn.Linear selected by q_proj in the traced graphs (types present: {types}); fix: correct it"
    assert bounded(message) == f"{where}: no call of torch.nn.Linear selected by q_proj in the traced graphs (...); fix: correct it"


def test_explain_lists_every_near_miss_when_asked():
    """plan.explain() told Python users that --json lists the near misses it left out."""
    result = fxs.apply(torchvision.models.mobilenet_v3_small().eval(), [fxs.Rewrite(fxs.FoldBatchNorm)],
                       example_inputs=(torch.randn(1, 3, 32, 32),))
    shown, every = result.plan.explain().splitlines(), result.plan.explain(limit=None).splitlines()
    assert shown[-1] == "  ... and 13 more (--json or plan.explain(limit=None) lists them all)"
    assert len(every) == len(shown) - 1 + 13 and not any("more (" in line for line in every)


def test_asides_go_only_where_shortened_words_do_not_fit_and_cost_one_pass():
    """A tensor name in '(first: ...)' was dropped where shortening it sufficed; 8,000 asides took 38 s."""
    import time

    from fxsurgery.errors import bounded
    full = ("/home/alice/experiments/vit-lora-2024-05-01/output/checkpoint-final: model.safetensors does not hold the tensors "
            "graph.json declares (first: 'model.layers.11.self_attn.q_proj.lora_A.weight'); fix: write the directory again with "
            "save(), or read model.py and load with trust_code=True (--trust-code) if you trust it")
    assert "(first: 'model.layers.11...j.lora_A.weight')" in bounded(full)
    start = time.perf_counter()
    assert len(bounded("a.yaml: " + " ".join("(" + "a" * 20 + ")" for _ in range(8000)) + "; fix: x")) == 300
    assert time.perf_counter() - start < 2


def test_a_shipped_head_rule_without_example_inputs_gives_the_input_flag_with_a_shape(tmp_path):
    """`fxsurgery apply torchvision.models:resnet18 classifier-head` (as `fxsurgery rules` suggests it) said only '--input'."""
    from test_bad_inputs import run_cli
    code, stdout, stderr, raised = run_cli(["apply", "torchvision.models:resnet18", "classifier-head", "--set", "num_classes=5",
                                            "-o", str(tmp_path / "out")])
    assert (code, stdout, type(raised)) == (2, "", fxs.RewriteError) and not (tmp_path / "out").exists()
    assert stderr.endswith("at 'fc': cannot infer in_features of Linear without example inputs; fix: pass example_inputs (--input "
                           "1x3x224x224 for an image model, 1x16:int64 for token ids) or give in_features explicitly\n")
