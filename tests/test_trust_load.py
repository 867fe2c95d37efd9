"""Loading a saved directory runs no code from it: graph.json is data, model.py is imported only with trust_code=True.

Each saved directory gets a model.py that writes a marker file when imported
(and a hash forged to match, as whoever shared the directory could do); the
marker must never appear, while the module loads and computes bit for bit
what the saved one computes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import rehash
from test_bad_inputs import run_cli
from torch import nn

import fxsurgery as fxs
from fxsurgery import Detach, Freeze, Insert, Replace
from fxsurgery.errors import bounded

ALLOWED = ("torch, torch.nn.functional, torch.fft, torch.linalg, torch.special, operator, math and builtins abs, all, any, bool, "
           "float, getattr, int, len, list, max, min, range, round, slice, sum, tuple")
FIX = "fix: write the directory again with save(), or read model.py and load with trust_code=True (--trust-code) if you trust it"


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.head = nn.Linear(6, 10, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mid(self.emb(ids))))


class Buffers(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("scale", torch.rand(4), persistent=False)
        self.register_buffer("shift", torch.rand(4))

    def forward(self, x):
        return self.fc(x) * self.scale + self.shift


def _resnet(rules):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    return fxs.apply(model, rules, example_inputs=(x[:1],)), (x,)


CASES = {
    "resnet18": lambda: _resnet([]),
    "insert, replace, detach": lambda: _resnet([Replace("fc", fxs.new(nn.Linear, out_features=10)), Detach(after="layer3"),
                                                Insert(nn.Identity(), after="avgpool"), Freeze("layer1.*")]),
    "tied weights": lambda: (torch.manual_seed(0), fxs.apply(Tied(), [], example_inputs=(torch.tensor([[1, 2]]),)))[1:] + ((torch.tensor([[1, 2, 3]]),),),
    "non-persistent buffers": lambda: (torch.manual_seed(0), fxs.apply(Buffers(), [], example_inputs=(torch.randn(1, 4),)))[1:] + ((torch.randn(3, 4),),),
}



def booby_trap(directory: Path, marker: Path) -> None:
    """model.py writes `marker` when it is imported, and otherwise still works."""
    source = (directory / "model.py").read_text()
    (directory / "model.py").write_text(f"open({str(marker)!r}, 'w').close()\n" + source)
    rehash(directory)


@pytest.mark.parametrize("case", list(CASES))
def test_load_imports_no_model_py(tmp_path, case):
    result, inputs = CASES[case]()
    result.save(tmp_path / "o")
    marker = tmp_path / "imported"
    booby_trap(tmp_path / "o", marker)
    loaded = fxs.load(tmp_path / "o")
    assert not marker.exists()
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), result.module(*inputs))
    want = result.module.state_dict()
    got = loaded.state_dict()
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert [n for n, p in loaded.named_parameters() if not p.requires_grad] == [n for n, p in result.module.named_parameters() if not p.requires_grad]
    assert {p: m.training for p, m in loaded.named_modules()} == {p: m.training for p, m in result.module.named_modules()}
    if case == "tied weights":
        assert loaded.head.weight is loaded.emb.weight
    if case == "non-persistent buffers":
        assert "scale" not in got and torch.equal(loaded.scale, result.module.scale)
    assert run_cli(["inspect", str(tmp_path / "o")])[0] == 0
    assert not marker.exists()
    # trust_code=True imports model.py, as before
    trusted = fxs.load(tmp_path / "o", trust_code=True)
    assert marker.exists()
    with torch.no_grad():
        assert torch.equal(trusted(*inputs), result.module(*inputs))


def test_cli_apply_on_a_saved_directory_runs_none_of_its_code(tmp_path):
    result, _ = CASES["non-persistent buffers"]()
    result.save(tmp_path / "o")
    marker = tmp_path / "imported"
    booby_trap(tmp_path / "o", marker)
    rules = tmp_path / "r.yaml"
    rules.write_text("fxsurgery: 1\nrules:\n  - freeze: fc\n")
    code, _, err, _ = run_cli(["apply", str(tmp_path / "o"), str(rules), "--input=2x4", "-o", str(tmp_path / "out"), "--quiet"])
    assert code == 0, err
    assert not marker.exists()
    assert run_cli(["apply", str(tmp_path / "o"), str(rules), "--input=2x4", "--dry-run", "--trust-code", "--quiet"])[0] == 0
    assert marker.exists()


def _tamper(tmp_path, change):
    torch.manual_seed(0)
    fxs.apply(Buffers(), [], example_inputs=(torch.randn(1, 4),)).save(tmp_path / "o")
    doc = json.loads((tmp_path / "o" / "graph.json").read_text())
    change(doc)
    (tmp_path / "o" / "graph.json").write_text(json.dumps(doc))
    rehash(tmp_path / "o")
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    return str(err.value)


def _node(doc, op):
    return next(n for n in doc["nodes"] if n["op"] == op)


@pytest.mark.parametrize("target", ["torch.ops.aten.add", "os.system", "builtins.eval", "subprocess.run", "torch.load", "operator.methodcaller"])
def test_a_target_outside_the_allowlist_is_refused(tmp_path, target):
    def change(doc):
        node = doc["nodes"][3]
        assert node["name"] == "mul" and node["op"] == "call_function"
        node["target"] = target
    message = _tamper(tmp_path, change)
    assert message == bounded(f"{tmp_path / 'o' / 'graph.json'}: nodes[3] 'mul': target {target!r} is not allowed (allowed: {ALLOWED}); {FIX}")


def _encoders(depth, layers):
    spec = {"class": "torch.nn.TransformerEncoderLayer", "kwargs": {"d_model": 8, "nhead": 2, "dim_feedforward": 16}}
    for _ in range(depth):
        spec = {"class": "torch.nn.TransformerEncoder", "kwargs": {"encoder_layer": {"module": spec}, "num_layers": layers,
                                                                   "enable_nested_tensor": False}}
    return spec


def _sequentials(depth):
    spec = {"class": "torch.nn.ReLU", "kwargs": {}}
    for _ in range(depth):
        spec = {"class": "torch.nn.Sequential", "items": [spec]}
    return spec


def _nested(depth):
    value = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize("what, change, problem", [
    ("unknown op", lambda d: d["nodes"][3].update(op="call_python"), "nodes[3] 'mul': unknown op 'call_python'"),
    ("reference to nothing", lambda d: d["nodes"][3].update(args={"tuple": [{"node": "ghost"}, 1]}),
     "nodes[3] 'mul': refers to node 'ghost', which no earlier node defines"),
    ("reference to a later node", lambda d: d["nodes"][2].update(args={"tuple": [{"node": "add"}]}),
     "nodes[2] 'scale': refers to node 'add', which no earlier node defines"),
    ("args of the wrong type", lambda d: d["nodes"][3].update(args="x"), "nodes[3] 'mul': args are not a tuple or kwargs not a mapping of names"),
    # a dead node computing 10 ** 10**8 kept `fxsurgery inspect` running for ever; so did factorials and chains
    ("integer power of literals", lambda d: d["nodes"][3].update(target="operator.pow", args={"tuple": [10, 10**8]}),
     "nodes[3] 'mul': pow on literals alone, which tracing evaluates; a graph computes on its inputs"),
    ("factorial of a literal", lambda d: d["nodes"][3].update(target="math.factorial", args={"tuple": [10**8]}),
     "nodes[3] 'mul': factorial on literals alone, which tracing evaluates; a graph computes on its inputs"),
    ("length of a literal", lambda d: d["nodes"][3].update(target="builtins.len", args={"tuple": [[1, 2]]}),
     "nodes[3] 'mul': len on literals alone, which tracing evaluates; a graph computes on its inputs"),
    ("private method", lambda d: _node(d, "call_function").update(op="call_method", target="__class__"),
     "nodes[3] 'mul': method '__class__' is not a tensor method"),
    ("private getattr", lambda d: d["nodes"][3].update(target="builtins.getattr", args={"tuple": [{"node": "x"}, "__class__"]}),
     "nodes[3] 'mul': getattr reads an attribute that is not a plain public name"),
    ("module class outside the allowlist", lambda d: d["attributes"][0]["module"].update({"class": "os.system"}),
     "attributes[0] 'fc': module class 'os.system' is outside the allowed packages (torch.nn, torchvision); pass allow=('os',) "
     "(--allow-module os) if you trust it"),
    ("module class reached through an allowed package", lambda d: d["attributes"][0]["module"].update(
        {"class": "torchvision.torch.fx.GraphModule"}),
     "attributes[0] 'fc': module class 'torchvision.torch.fx.GraphModule' does not name a torch.nn.Module class defined in torch.nn, torchvision"),
    ("module dtype no module takes", lambda d: d["attributes"][0].update(dtype="int64"),
     "attributes[0] 'fc': dtype 'int64' is not a floating-point or complex dtype, which a module takes"),
    ("tie to a layer without that parameter", lambda d: d.update(ties={"fc.gain": "fc.weight"}),
     "ties 'fc.gain': Linear at 'fc' has no parameter 'gain'"),
    ("path with code", lambda d: d["attributes"][0].update(path="fc; import os"),
     "attributes[0] 'fc; import os': path 'fc; import os' is not a dotted path of plain names"),
    ("stay_eval of the wrong type", lambda d: d.update(stay_eval="fc"), "ties, frozen, eval or stay_eval: is not a list of names"),
    ("stay_eval naming no module", lambda d: d.update(stay_eval=["ghost"]), "stay_eval: names no module ('ghost')"),
    # device= would build real tensors past the meta device: a Linear(30000, 30000) took 3.9 GB
    ("module built on a device", lambda d: d["attributes"][0]["module"]["kwargs"].update(device={"device": "cpu"}),
     "attributes[0] 'fc': module kwargs name device, which save() never writes"),
    ("module layers beyond any model's", lambda d: d["attributes"].insert(0, {"path": "big", "dtype": None, "module": {
        "class": "torch.nn.Transformer", "kwargs": {"d_model": 8, "nhead": 1, "num_encoder_layers": 20000}}}),
     "attributes[0] 'big': torch.nn.Transformer(num_encoder_layers=20000) declares more than 1024 layers"),
    # a declared size no name gives away: Python work per layer on the meta device too (20000 MLP layers took 9 s)
    ("module building more than its entries declare", lambda d: d["attributes"].insert(0, {"path": "big", "dtype": None, "module": {
        "class": "torchvision.ops.MLP", "kwargs": {"in_channels": 4, "hidden_channels": [1] * 20000}}}),
     "attributes[0] 'big': builds more than 14000 modules, parameters and buffers, more than its entries declare"),
    # names become code of the generated forward: a keyword, stars or self would only fail at the first call
    ("placeholder named by a keyword", lambda d: _node(d, "placeholder").update(target="lambda"),
     "nodes[0] 'x': placeholder target 'lambda' is not a plain name"),
    ("placeholder with three stars", lambda d: _node(d, "placeholder").update(target="***x"),
     "nodes[0] 'x': placeholder target '***x' is not a plain name"),
    ("placeholder named self", lambda d: _node(d, "placeholder").update(target="self"),
     "nodes[0] 'x': placeholder target 'self' is not a plain name"),
    ("keyword argument named by a keyword", lambda d: _node(d, "call_function").update(kwargs={"dict": [["if", 1]]}),
     "nodes[3] 'mul': args are not a tuple or kwargs not a mapping of names"),
    # each of these was an 'internal error' (RecursionError, KeyError, AttributeError) instead of naming the entry
    ("arguments nested past Python's recursion", lambda d: _node(d, "call_function")["args"]["tuple"].append(_nested(150)),
     "nodes[3] 'mul': nests values more than 100 levels deep"),
    ("modules nested past any layer's", lambda d: d["attributes"].insert(0, {"path": "deep", "dtype": None, "module": _sequentials(10)}),
     "attributes[0] 'deep': modules nest more than 8 levels deep"),
    # each level's layer deep-copied num_layers times, past the registrations the budget counts: 27,000 layers from 542 bytes
    ("encoders nested in encoders", lambda d: d["attributes"].insert(0, {"path": "deep", "dtype": None, "module": _encoders(3, 30)}),
     "attributes[0] 'deep': torch.nn.TransformerEncoder(...) would copy its layer argument into 595860 modules and tensors, more than 100000"),
    # torch's size arithmetic overflowed: a raw RuntimeError (or TypeError) and the CLI's 'internal error'
    ("a parameter whose bytes overflow", lambda d: d["attributes"].append(
        {"path": "p", "parameter": {"shape": [1 << 62, 1 << 62], "dtype": "float32", "requires_grad": True}}),
     "attributes[3] 'p': shape [4611686018427387904, 4611686018427387904] declares more bytes than any file holds"),
    ("a huge dim beside a zero one", lambda d: d["attributes"].append(
        {"path": "p", "buffer": {"shape": [0, 1 << 64], "dtype": "uint8", "persistent": True}}),
     "attributes[3] 'p': shape [0, 18446744073709551616] declares more bytes than any file holds"),
    ("a buffer larger than a long", lambda d: d["attributes"].append(
        {"path": "p", "buffer": {"shape": [1 << 70], "dtype": "uint8", "persistent": True}}),
     "attributes[3] 'p': shape [1180591620717411303424] declares more bytes than any file holds"),
    # torch.fx's own check raised a ValueError with the whole graph printed
    ("an output node with another target", lambda d: _node(d, "output").update(target=1.5),
     "nodes[6] 'output': output target 1.5 is not 'output'"),
    ("a module at a name every module holds", lambda d: d["attributes"].append(
        {"path": "training", "module": {"class": "torch.nn.ReLU", "kwargs": {}}, "dtype": None}),
     "attributes[3] 'training': attribute 'training' already exists"),
    ("a buffer over a layer's parameter", lambda d: d["attributes"].append(
        {"path": "fc.weight", "buffer": {"shape": [1], "dtype": "float32", "persistent": True}}),
     "attributes[3] 'fc.weight': attribute 'weight' already exists"),
    ("a tie to a parameter no node reads", lambda d: (d["attributes"].append(
        {"path": "extra", "parameter": {"shape": [4, 4], "dtype": "float32", "requires_grad": True}}), d.update(ties={"fc.weight": "extra"})),
     "ties: Model has no attribute `extra`"),
])
def test_a_tampered_description_is_refused(tmp_path, what, change, problem):
    assert _tamper(tmp_path, change) == bounded(f"{tmp_path / 'o' / 'graph.json'}: {problem}; {FIX}")


def _calls(*entries):
    """Nodes inserted before the output: (op, name, target, args, kwargs) with {"node": name} references."""
    def change(doc):
        out = doc["nodes"].pop()
        for op, name, target, args, kwargs in entries:
            doc["nodes"].append({"op": op, "name": name, "target": target, "args": {"tuple": args},
                                 "kwargs": {"dict": [list(kv) for kv in kwargs.items()]}, "type": None})
        doc["nodes"].append(out)
    return change


PAYLOAD = ("call_function", "t", "torch.tensor", [[105, 109]], {"dtype": {"dtype": "uint8"}})


@pytest.mark.parametrize("what, change, problem", [
    # the chain an attacker used: the bytes as an ndarray, its tofile method through getattr, called by max(key=)
    ("leaving torch through numpy", _calls(PAYLOAD, ("call_method", "arr", "numpy", [{"node": "t"}], {})),
     "nodes[7] 'arr': method 'numpy' is not a tensor method"),
    ("a method read by getattr", _calls(PAYLOAD, ("call_function", "m", "builtins.getattr", [{"node": "t"}, "tolist"], {})),
     "nodes[7] 'm': getattr reads 'tolist', a method, which the graph could call; a graph reads data attributes only"),
    ("a storage's from_file read by getattr", _calls(PAYLOAD, ("call_function", "m", "builtins.getattr", [{"node": "t"}, "from_file"], {})),
     "nodes[7] 'm': getattr reads 'from_file', a method, which the graph could call; a graph reads data attributes only"),
    ("a name computed at run time", _calls(PAYLOAD, ("call_function", "m", "builtins.getattr", [{"node": "t"}, {"node": "t"}], {})),
     "nodes[7] 'm': getattr reads an attribute that is not a plain public name"),
    ("max calling a graph value", _calls(PAYLOAD, ("call_function", "m", "builtins.max", [["/tmp/x"]], {"key": {"node": "t"}})),
     "nodes[7] 'm': max(..., key=...) calls a graph value; a graph compares values only"),
    ("torch's dispatch helper", _calls(PAYLOAD, ("call_function", "m", "torch.nn.functional.handle_torch_function", [], {})),
     f"nodes[7] 'm': target 'torch.nn.functional.handle_torch_function' is not allowed (allowed: {ALLOWED})"),
    # torch does not check a sparse tensor's indices: to_dense() wrote out of bounds (a segmentation fault)
    ("a sparse tensor built from indices", _calls(PAYLOAD, ("call_function", "m", "torch.sparse_coo_tensor", [[[10 ** 8]], [1.0], [4]], {})),
     f"nodes[7] 'm': target 'torch.sparse_coo_tensor' is not allowed (allowed: {ALLOWED})"),
    # a dense tensor converted: its indices() are an alias the graph could fill with 10**10
    ("a sparse tensor converted", _calls(PAYLOAD, ("call_method", "m", "to_sparse", [{"node": "t"}], {})),
     "nodes[7] 'm': method 'to_sparse' reaches memory that torch does not check (sparse indices, storages)"),
    ("a sparse layout", _calls(PAYLOAD, ("call_function", "m", "torch.zeros", [[3]], {"layout": {"layout": "sparse_coo"}})),
     "nodes[7] 'm': holds a malformed 'layout' value"),
    # a storage resized under the tensor that views it: the next read was a segmentation fault
    ("a storage resized under its tensor", _calls(PAYLOAD, ("call_method", "m", "untyped_storage", [{"node": "t"}], {})),
     "nodes[7] 'm': method 'untyped_storage' reaches memory that torch does not check (sparse indices, storages)"),
])
def test_a_graph_cannot_reach_a_callable_it_could_call(tmp_path, what, change, problem):
    assert _tamper(tmp_path, change) == bounded(f"{tmp_path / 'o' / 'graph.json'}: {problem}; {FIX}")


def test_data_attributes_still_load(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    gm = torch.fx.symbolic_trace(model)
    x = next(iter(gm.graph.find_nodes(op="placeholder")))
    with gm.graph.inserting_after(next(iter(gm.graph.find_nodes(op="call_module")))):
        shape = gm.graph.call_function(getattr, (x, "shape"))
        dtype = gm.graph.call_function(getattr, (x, "dtype"))
    out = next(iter(gm.graph.find_nodes(op="output")))
    out.args = ((out.args[0], shape, dtype),)
    gm.recompile()
    fxs.save(gm, tmp_path / "o")
    loaded = fxs.load(tmp_path / "o")
    y = torch.randn(5, 4)
    got, want = loaded(y), gm(y)
    assert torch.equal(got[0], want[0]) and got[1:] == (torch.Size([5, 4]), torch.float32)


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_graph_json_that_is_no_regular_file_is_refused_before_it_is_read(tmp_path, kind):
    torch.manual_seed(0)
    fxs.apply(Buffers(), [], example_inputs=(torch.randn(1, 4),)).save(tmp_path / "o")
    graph = tmp_path / "o" / "graph.json"
    graph.unlink()
    if kind == "device":
        graph.symlink_to("/dev/zero")  # the hash read it forever
    else:
        os.mkfifo(graph)
    for command in (["inspect", str(tmp_path / "o")], ["inspect", str(tmp_path / "o"), "--input", "1x4"]):
        proc = subprocess.run([sys.executable, "-m", "fxsurgery", *command], capture_output=True, text=True, timeout=120)
        what = "a link to /dev/zero, not a regular file" if kind == "device" else "not a regular file"
        assert (proc.returncode, proc.stderr) == (2, f"fxsurgery: error: {graph}: is {what}; fix: put the file itself there, "
                                                     "or write the directory again with save()\n")


def test_declared_shapes_are_checked_before_anything_is_allocated(tmp_path):
    def change(doc):
        doc["attributes"][0]["module"]["kwargs"] = {"in_features": 1 << 30, "out_features": 1 << 30}
    assert _tamper(tmp_path, change) == (f"{tmp_path / 'o'}: model.safetensors does not hold the tensors graph.json declares "
                                         f"(first: 'fc.weight'); {FIX}")


def test_a_directory_without_graph_json_needs_trust_code(tmp_path):
    torch.manual_seed(0)
    fxs.apply(Buffers(), [], example_inputs=(torch.randn(1, 4),)).save(tmp_path / "o")
    (tmp_path / "o" / "graph.json").unlink()
    rehash(tmp_path / "o")
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert str(err.value) == (f"{tmp_path / 'o'}: has no graph.json (written by an older fxsurgery), and loading its model.py would run its "
                              "code; fix: read model.py and load with trust_code=True (--trust-code) if you trust it, or write the directory "
                              "again with save()")
    assert fxs.load(tmp_path / "o", trust_code=True).fc.in_features == 4


@pytest.mark.parametrize("content, problem", [
    (b'{"fxsurgery": 1, "x": 1' + b"0" * 5000 + b"}", "not valid JSON (Exceeds the limit (4300 digits) for integer string conversion"),
    (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "not valid JSON (RecursionError: maximum recursion depth exceeded"),
    (b"[1, 2]", "holds a JSON list, not the record save() writes; fix: write the directory again with save()"),
    (b"\xff\xfe", "not valid JSON (UnicodeDecodeError: 'utf-8' codec can't decode byte 0xff in position 0"),
], ids=["huge integer", "deep", "a list", "not utf-8"])
def test_a_tampered_surgery_json_is_a_one_line_error(tmp_path, content, problem):
    """Each was an internal error (ValueError, RecursionError, AttributeError) from fxs.load, inspect and map-weights."""
    fxs.apply(Buffers(), [], example_inputs=(torch.randn(1, 4),)).save(tmp_path / "o")
    record = tmp_path / "o" / "surgery.json"
    record.write_bytes(content)
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert err.value.full.startswith(f"{record}: {problem}")
    with pytest.raises(fxs.SaveError) as err:
        fxs.map_weights(Buffers().state_dict(), tmp_path / "o")
    assert err.value.full.startswith(f"{record}: {problem}")
    code, stdout, stderr, raised = run_cli(["inspect", str(tmp_path / "o")])
    assert code == 2 and stderr.startswith(f"fxsurgery: error: {record}: ") and stderr.count("\n") == 1, raised


def test_a_shard_index_nested_too_deep_is_a_one_line_error(tmp_path):
    fxs.apply(Buffers(), [], example_inputs=(torch.randn(1, 4),)).save(tmp_path / "o", max_shard_size=16)
    index = tmp_path / "o" / "model.safetensors.index.json"
    index.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert str(err.value) == f"{index}: not a shard index (ValueError); fix: write the directory again with save()"


def _sharded(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    fxs.apply(model, [], example_inputs=(torch.randn(1, 4),)).save(tmp_path / "o", max_shard_size=64)
    return tmp_path / "o"


def test_a_directory_with_both_weight_layouts_is_refused(tmp_path):
    """fxs.load read model.safetensors and model.py's Model.load the shards: two loaders, two models (0.0 against 7.49)."""
    out = _sharded(tmp_path)
    from safetensors.torch import load_file, save_file
    zeros = {k: torch.zeros_like(v) for f in sorted(out.glob("model-*.safetensors")) for k, v in load_file(str(f)).items()}
    save_file(zeros, str(out / "model.safetensors"), metadata={"format": "pt"})
    for trust in (False, True):  # refused before any hash is compared: no seal fits two layouts
        with pytest.raises(fxs.SaveError) as err:
            fxs.load(out, trust_code=trust)
        assert str(err.value) == (f"{out}: holds both model.safetensors and model.safetensors.index.json, which save() never "
                                  "writes together; fix: write the directory again with save()")


def test_a_tensor_in_a_shard_the_index_does_not_put_it_in_is_refused(tmp_path):
    """A second copy of 0.weight (zeros) in another shard was read last and loaded without a word."""
    out = _sharded(tmp_path)
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    other = next(f for f in sorted(set(index.values())) if f != index["0.weight"])
    from safetensors.torch import load_file, save_file
    held = load_file(str(out / other))
    held["0.weight"] = torch.zeros(8, 4)
    save_file(held, str(out / other), metadata={"format": "pt"})
    rehash(out)  # as someone who replaced the shard would
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(out)
    assert str(err.value) == (f"{out / other}: holds '0.weight', which model.safetensors.index.json puts in "
                              f"'{index['0.weight']}'; fix: write the directory again with save()")


@pytest.mark.parametrize("name", ["model.safetensors", "model.py", "surgery.json"])
def test_a_saved_file_that_links_into_a_pseudo_file_system_is_refused_before_it_is_read(tmp_path, name):
    # /proc/self/pagemap reports a regular file of hundreds of GB: hashing it through a link hung the load
    fxs.apply(Buffers(), [], example_inputs=(torch.randn(1, 4),)).save(tmp_path / "o")
    (tmp_path / "o" / name).unlink()
    (tmp_path / "o" / name).symlink_to("/proc/self/pagemap")
    real = os.path.realpath(tmp_path / "o" / name)  # /proc/<this process>/pagemap
    message = f"{tmp_path / 'o' / name}: is a link to {real}, not a regular file; " \
              "fix: put the file itself there, or write the directory again with save()"
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert str(err.value) == bounded(message)
    assert run_cli(["inspect", str(tmp_path / "o")])[:3] == (2, "", f"fxsurgery: error: {bounded(message)}\n")


def test_a_saved_directory_laid_out_as_the_hub_cache_holds_it_loads(tmp_path):
    # a snapshot's files are links to blobs two directories up: refusing every link refused a downloaded surgery
    result = fxs.apply(Buffers(), [], example_inputs=(torch.randn(1, 4),))
    result.save(tmp_path / "o")
    snapshot, blobs = tmp_path / "models--me--surgery" / "snapshots" / "abc123", tmp_path / "models--me--surgery" / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, file in enumerate(sorted((tmp_path / "o").iterdir())):
        os.rename(file, blobs / f"blob{i}")
        (snapshot / file.name).symlink_to(f"../../blobs/blob{i}")
    x = torch.randn(3, 4)
    with torch.no_grad():
        assert torch.equal(fxs.load(snapshot)(x), result.module(x))


def test_a_checked_load_holds_its_weights_apart_from_the_file(tmp_path):
    """The module held the file's mapping: bytes changed in place after the hash check changed its weights, and
    a truncated file killed the process (SIGBUS) at the next read."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))
    fxs.apply(model, [], example_inputs=(torch.randn(2, 64),)).save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o")
    want = {k: v.clone() for k, v in loaded.state_dict().items()}
    weights = tmp_path / "o" / "model.safetensors"
    size = weights.stat().st_size
    with open(weights, "r+b") as handle:  # in place, as cp or rsync --inplace write
        handle.seek(size - 4096)
        handle.write(b"\x7f" * 4096)
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    os.truncate(weights, 1000)
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
