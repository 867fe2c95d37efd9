"""save/load: bit-identical, standalone, tied, safe names, atomic, no pickle."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import fxsurgery as fxs
import fxsurgery.export._shards as weights_module
from fxsurgery import Freeze, Insert, Replace
from fxsurgery.capture import trace

X = torch.randn(2, 3, 64, 64)


@pytest.fixture
def result(resnet18):
    return fxs.apply(resnet18, [Replace("fc", fxs.new(nn.Linear, out_features=10)),
                                Freeze("*", exclude=["layer4.*", "fc"]),
                                Insert(nn.Dropout(0.2), after="avgpool")], example_inputs=(X[:1],))


def test_round_trip_is_bit_identical(result, tmp_path):
    result.save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o")
    result.module.eval(), loaded.eval()
    assert torch.equal(loaded(X), result.module(X))
    a, b = result.module.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {n: p.requires_grad for n, p in loaded.named_parameters()} == {n: p.requires_grad for n, p in result.module.named_parameters()}
    record = json.loads((tmp_path / "o" / "surgery.json").read_text())
    assert record["report"]["counts"] == result.report.counts()
    assert [r["text"] for r in record["rules"]] == [str(r) for r in result.rules]
    assert record["inputs"] == {"before": [[1, 3, 64, 64]], "after": [[1, 3, 64, 64]], "changes": []}


def test_training_modes_survive(result, tmp_path):
    result.module.train()
    result.module.get_submodule("layer1").eval()
    result.save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o")
    assert {p: m.training for p, m in loaded.named_modules()} == {p: m.training for p, m in result.module.named_modules()}


def test_model_py_runs_without_fxsurgery(result, tmp_path):
    out = tmp_path / "o"
    result.save(out)
    result.module.eval()
    assert_runs_without_fxsurgery(out, X, result.module(X).detach(), tmp_path)


def assert_runs_without_fxsurgery(out, x, y, tmp_path, grad=True):
    """model.py in `out`, in a process where importing fxsurgery raises, computes `y` from `x` in eval mode."""
    save_file({"x": x, "y": y}, str(tmp_path / "io.safetensors"))
    script = (
        "import sys; sys.modules['fxsurgery'] = None\n"  # importing fxsurgery now raises
        "import torch; from safetensors.torch import load_file\n"
        f"sys.path.insert(0, {str(out)!r}); from model import Model\n"
        f"m = Model.load({str(out)!r}).eval(); io = load_file({str(tmp_path / 'io.safetensors')!r})\n"
        # the input cloned: a tensor safetensors maps at an unaligned address takes other CPU kernels (1.8e-7 away)
        f"with torch.set_grad_enabled({grad}): assert torch.equal(m(io['x'].clone()), io['y']); print('identical')\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert proc.stdout == "identical\n", proc.stderr


def test_save_load_save_is_byte_identical(result, tmp_path):
    result.save(tmp_path / "a")
    again = trace(fxs.load(tmp_path / "a")).gm
    fxs.save(again, tmp_path / "b")
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.body(self.embed(ids))))


def test_tied_weights_stay_one_tensor(tmp_path):
    torch.manual_seed(0)
    model = Tied()
    ids = torch.tensor([[1, 2, 3]])
    result = fxs.apply(model, [Freeze("body")], example_inputs=(ids,))
    m = result.module
    assert m.head.weight is m.embed.weight
    assert result.report.transferred == ["embed.weight", "body.weight", "body.bias", "head.weight"]
    result.save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o")
    assert loaded.head.weight is loaded.embed.weight
    assert torch.equal(loaded(ids), m(ids))
    opt = torch.optim.SGD(loaded.parameters(), lr=0.1)
    before = loaded.embed.weight.detach().clone()
    loaded(ids).sum().backward()
    grad = loaded.embed.weight.grad.clone()
    opt.step()
    assert torch.equal(loaded.embed.weight, before.add(grad, alpha=-0.1))  # one update, not two


def hostile(name):
    class Hostile(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module(name, nn.Linear(2, 2))

        def forward(self, x):
            return getattr(self, name)(x)
    torch.manual_seed(0)
    return Hostile()


def test_a_module_name_that_would_break_out_of_quotes_is_refused(tmp_path):
    canary = tmp_path / "PWNED"
    name = f'x"); open({str(canary)!r}, "w"); ("'
    with pytest.raises(fxs.TraceError) as err:
        trace(hostile(name))
    assert str(err.value) == (f"module path {name!r} contains a quote, backslash or line break, which torch.fx would "
                              "write into generated code unescaped; fix: rename that submodule")
    assert not canary.exists()


def test_odd_module_names_become_identifiers_in_model_py(tmp_path):
    name = "x; import os; os_remove('model_py')"
    model = hostile(name)
    fxs.save(trace(model).gm, tmp_path / "o")
    source = (tmp_path / "o" / "model.py").read_text()
    assert name not in source and "import os;" not in source
    loaded = fxs.load(tmp_path / "o")
    assert (tmp_path / "o" / "model.py").exists()
    x = torch.randn(1, 2)
    assert torch.equal(loaded(x), model(x))
    record = json.loads((tmp_path / "o" / "surgery.json").read_text())
    assert record["renamed"] == {name: "x_import_os_os_remove_model_py"}


def test_existing_directory_is_kept(result, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    with pytest.raises(fxs.SaveError) as err:
        result.save(out)
    assert str(err.value) == f"{out}: already exists; fix: choose another output directory or pass --force (force=True)"
    with pytest.raises(fxs.SaveError) as err:
        result.save(out, force=True)
    assert str(err.value) == f"{out}: exists and is not an fxsurgery output, refusing to replace it; fix: choose another output directory"
    assert os.listdir(out) == ["mine.txt"]


def test_failure_between_files_leaves_nothing(result, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(weights_module, "write_file", boom)
    with pytest.raises(fxs.SaveError, match="cannot write: disk full"):  # one line, no traceback
        result.save(tmp_path / "o")
    assert os.listdir(tmp_path) == []


def test_failure_while_replacing_keeps_the_old_output(result, tmp_path, monkeypatch):
    result.save(tmp_path / "o")
    before = (tmp_path / "o" / "model.safetensors").read_bytes()
    monkeypatch.setattr(weights_module, "write_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(fxs.SaveError, match="cannot write: disk full"):
        result.save(tmp_path / "o", force=True)
    assert os.listdir(tmp_path) == ["o"]
    assert (tmp_path / "o" / "model.safetensors").read_bytes() == before


CHANGED = "changed since it was written (hash mismatch); fix: write the directory again with save()"


def test_load_refuses_changed_files_and_names_them(result, tmp_path, monkeypatch):
    import fxsurgery.export._filehash as filehash
    monkeypatch.setattr(filehash, "SMALL", 1 << 30)  # resnet18's 45 MB of weights hashed on their own too
    result.save(tmp_path / "o")
    record = json.loads((tmp_path / "o" / "surgery.json").read_text())
    assert record["sha256"] == {name: "sha256:" + __import__("hashlib").sha256((tmp_path / "o" / name).read_bytes()).hexdigest()
                                for name in ("graph.json", "model.py", "model.safetensors")}
    with open(tmp_path / "o" / "model.py", "a") as handle:
        handle.write("\nprint('hello')\n")
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert str(err.value) == f"{tmp_path / 'o'}: model.py {CHANGED}"
    weights = tmp_path / "o" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x01")
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert str(err.value) == f"{tmp_path / 'o'}: model.py and model.safetensors {CHANGED}"


def test_a_changed_record_or_a_large_weights_file_is_named_with_what_cannot_be_told_apart(result, tmp_path, monkeypatch):
    import fxsurgery.export._filehash as filehash

    def edit_record(directory, change):
        record = json.loads((directory / "surgery.json").read_text())
        change(record)
        (directory / "surgery.json").write_text(json.dumps(record))
    result.save(tmp_path / "big")  # resnet18's 45 MB of weights: above SMALL, hashed only with the rest (not read twice)
    assert sorted(json.loads((tmp_path / "big" / "surgery.json").read_text())["sha256"]) == ["graph.json", "model.py"]
    edit_record(tmp_path / "big", lambda r: r["report"]["entries"][0].update(status="new"))
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "big")
    assert str(err.value) == f"{tmp_path / 'big'}: model.safetensors or surgery.json {CHANGED}"
    monkeypatch.setattr(filehash, "SMALL", 1 << 30)
    result.save(tmp_path / "o")
    edit_record(tmp_path / "o", lambda r: r["report"]["entries"][0].update(status="new"))
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert str(err.value) == f"{tmp_path / 'o'}: surgery.json {CHANGED}"
    edit_record(tmp_path / "o", lambda r: r.pop("sha256"))  # a record written before per-file hashes: every file the hash covers
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert str(err.value) == f"{tmp_path / 'o'}: model.py, model.safetensors, graph.json or surgery.json {CHANGED}"

def test_force_does_not_replace_an_output_someone_edited(result, tmp_path):
    from conftest import cli
    out = tmp_path / "o"
    result.save(out)
    edited = (out / "model.py").read_text().replace("class ", "# tuned by hand\nclass ", 1)
    (out / "model.py").write_text(edited)
    message = (f"{out}: model.py changed since fxsurgery wrote it, so replacing the output would lose that edit; "
               "fix: move the edited files out of the directory or choose another output directory")
    with pytest.raises(fxs.SaveError) as err:
        result.save(out, force=True)
    assert str(err.value) == message
    code, _, stderr = cli("apply", "torchvision.models:resnet18", "freeze-backbone", "--input", "1x3x64x64", "-o", out, "--force")
    assert (code, stderr) == (2, f"fxsurgery: error: {message}\n")
    assert (out / "model.py").read_text() == edited and sorted(os.listdir(tmp_path)) == ["o"]
    os.unlink(out / "model.py")  # moved out, as the fix says: the rest is fxsurgery's own
    result.save(out, force=True)
    assert torch.equal(fxs.load(out).eval()(X), result.module.eval()(X))

def test_load_unpickles_nothing(result, tmp_path, monkeypatch):
    result.save(tmp_path / "o")
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("unpickling")
    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            return refuse(module, name)

    monkeypatch.setattr(pickle, "Unpickler", Recording)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    loaded = fxs.load(tmp_path / "o")
    assert calls == [] and loaded.fc.out_features == 10


def test_dtype_survives_the_round_trip(two, tmp_path):
    model = two.double()
    result = fxs.apply(model, [Freeze("liner1")], example_inputs=(torch.randn(1, 3, dtype=torch.float64),))
    result.save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o")
    assert {t.dtype for t in loaded.state_dict().values()} == {torch.float64}
    x = torch.randn(4, 3, dtype=torch.float64)
    assert torch.equal(loaded(x), model(x))
    assert "torch.nn.Linear(in_features=3, out_features=2).to(torch.float64)" in (tmp_path / "o" / "model.py").read_text()


def test_weights_are_aligned_safetensors_hashed_while_written(result, tmp_path, monkeypatch):
    import hashlib
    import importlib
    writer = importlib.import_module("fxsurgery.export._writer")
    record = importlib.import_module("fxsurgery.export._record")
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i, dtype in enumerate([torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                               torch.int16, torch.int8, torch.uint8, torch.bool]):
        tensors[f"layer.{i}.weight"] = (torch.randn(3, 5, generator=generator) * 9).to(dtype)
        tensors[f"a{i}"] = (torch.randn(7, generator=generator) * 9).to(dtype)
    tensors.update({"scalar": torch.tensor(3.0), "empty": torch.zeros(0, 4), 'q"uo\\te\n\u00e9': torch.ones(2),
                    "t": torch.randn(4, 6, generator=generator).t().contiguous()})
    tensors.update({"odd": torch.ones(3, dtype=torch.int8), "big": torch.randn(16, 4, generator=generator)})
    for metadata in (None, {"format": "pt"}):
        got = writer.write_file(tmp_path / "mine.safetensors", tensors, metadata)
        data = (tmp_path / "mine.safetensors").read_bytes()
        assert got == "sha256:" + hashlib.sha256(data).hexdigest()
        # a safetensors file: the same tensors, bit for bit, and the same metadata as save_file's
        with safe_open(str(tmp_path / "mine.safetensors"), "pt") as f:
            assert f.metadata() == metadata and sorted(f.keys()) == sorted(tensors)
            assert all(torch.equal(f.get_tensor(k), t) and f.get_tensor(k).dtype == t.dtype for k, t in tensors.items())
        # the data starts 64-byte aligned, and so does every tensor whose size is a multiple of 64 bytes
        head = 8 + int.from_bytes(data[:8], "little")
        assert head % 64 == 0 and set(data[8 + len(data[8:head].rstrip(b" ")):head]) <= {ord(" ")}
        loaded = load_file(str(tmp_path / "mine.safetensors"))
        whole = [k for k, t in tensors.items() if t.numel() and t.numel() * t.element_size() % 64 == 0]
        assert whole == ["big"] and loaded["big"].data_ptr() % 64 == 0
    # the record's hash, fed while the file was written, is the one read back from the files
    reads = []
    real_open = open
    monkeypatch.setattr("builtins.open", lambda f, *a, **k: reads.append(os.path.basename(str(f))) or real_open(f, *a, **k))
    result.save(tmp_path / "o")
    monkeypatch.undo()
    assert "model.safetensors" in reads and reads.count("model.safetensors") == 1  # written once, never read back
    written = json.loads((tmp_path / "o" / "surgery.json").read_text())
    assert written["hash"] == record.digest(tmp_path / "o", written)


def test_load_uses_the_mapped_weights_without_copying_them(tmp_path, monkeypatch):
    torch.manual_seed(0)
    # 0.weight, 0.bias, 2.weight are whole 64-byte blocks and come first; of the rest, 2.bias (40 bytes)
    # starts aligned, and 4.bias, 4.weight after it do not
    model = nn.Sequential(nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 10), nn.ReLU(), nn.Linear(10, 7)).eval()
    result = fxs.apply(model, [], example_inputs=(torch.randn(2, 48),))
    result.save(tmp_path / "o")
    copies = []
    real = torch.Tensor.clone
    monkeypatch.setattr(torch.Tensor, "clone", lambda t, *a, **k: copies.append(tuple(t.shape)) or real(t, *a, **k))
    loaded = fxs.load(tmp_path / "o", verify=False)  # unchecked: mapped, as safetensors maps them
    monkeypatch.undo()
    assert sorted(copies) == [(7,), (7, 10)]
    assert all(p.data_ptr() % 64 == 0 for p in loaded.parameters())
    x = torch.randn(5, 48)
    assert torch.equal(loaded(x), result.module(x)) and torch.equal(loaded(x), model(x))
    # checked (the default): copied out of the mapping (tests/test_trust_load.py: apart from the file)
    checked = fxs.load(tmp_path / "o")
    assert all(p.data_ptr() % 64 == 0 for p in checked.parameters()) and torch.equal(checked(x), model(x))


def test_loaded_code_is_generated_at_first_use_and_behaves_as_generated_at_load(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    result = fxs.apply(model, [], example_inputs=(torch.randn(2, 8),))
    result.save(tmp_path / "o")
    import torch.fx.graph_module as graph_module
    generated = []
    real = graph_module._forward_from_src
    monkeypatch.setattr(graph_module, "_forward_from_src", lambda *a, **k: generated.append(1) or real(*a, **k))
    loaded = fxs.load(tmp_path / "o", verify=False)
    assert generated == []  # loading generates no code
    calls = []
    loaded.register_forward_pre_hook(lambda m, args: calls.append(len(args)))
    x = torch.randn(4, 8)
    assert torch.equal(loaded(x), model(x)) and calls == [1] and generated == [1]  # the first call: hooks run once
    assert torch.equal(loaded(x), model(x)) and calls == [1, 1] and generated == [1]  # generated once
    monkeypatch.undo()
    # read before any call: the code, the class's forward (as a tracer or torch.jit reads it), str()
    assert fxs.load(tmp_path / "o").code == loaded.code == torch.fx.GraphModule(loaded, loaded.graph).code
    traced = torch.fx.symbolic_trace(fxs.load(tmp_path / "o"))
    assert [n.target for n in traced.graph.nodes if n.op == "placeholder"] == ["input"] and torch.equal(traced(x), model(x))
    assert torch.equal(torch.jit.script(fxs.load(tmp_path / "o"))(x), model(x))
    assert "def forward(self, input)" in str(fxs.load(tmp_path / "o"))
    for copy in (pickle.loads(pickle.dumps(fxs.load(tmp_path / "o"))), __import__("copy").deepcopy(fxs.load(tmp_path / "o"))):
        assert torch.equal(copy(x), model(x))
    # an edited graph is generated again on recompile, as GraphModule's is
    edited = fxs.load(tmp_path / "o")
    out = next(n for n in edited.graph.nodes if n.op == "output")
    with edited.graph.inserting_before(out):
        neg = edited.graph.call_function(torch.neg, (out.args[0],))
    out.args = (neg,)
    assert "torch.neg" in edited.recompile().src and torch.equal(edited(x), -model(x))


def test_initialisers_skip_meta_tensors_only():
    from fxsurgery.export._rebuild import _MetaBuild
    with _MetaBuild():
        linear = nn.Linear(3, 4)
        real = torch.zeros(3, device="cpu")
        nn.init.ones_(real)
        real[1:].fill_(2.0)
    assert linear.weight.is_meta and linear.weight.shape == (4, 3) and isinstance(linear.weight, nn.Parameter)
    assert real.tolist() == [1.0, 2.0, 2.0]  # a tensor with data is initialised as ever
    assert torch.empty(2).device.type == "cpu"  # the mode ends with the block


@pytest.mark.parametrize("norm", [nn.LayerNorm, nn.BatchNorm1d])  # BatchNorm loads through its own _load_from_state_dict
def test_loaded_parameters_keep_their_kind_grad_and_bits(tmp_path, norm):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6, padding_idx=0), nn.Flatten(), nn.Linear(18, 8), norm(8), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].weight[0] = 5.0  # the padding row as trained, not as the constructor zeroes it
        for b in model.buffers():
            b.add_(3) if b.is_floating_point() else b.fill_(7)
    ids = torch.tensor([[0, 1, 2], [3, 4, 5]])
    result = fxs.apply(model.eval(), [Freeze("0"), Freeze("3")], example_inputs=(ids,))
    result.save(tmp_path / "o")
    loaded = fxs.load(tmp_path / "o", verify=False)
    a, b = result.module.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    assert {n: (type(p), p.requires_grad) for n, p in loaded.named_parameters()} == \
        {n: (type(p), p.requires_grad) for n, p in result.module.named_parameters()}
    assert loaded.get_parameter("0.weight")[0].tolist() == [5.0] * 6
    assert torch.equal(loaded(ids), result.module(ids))


class Transformers(nn.Module):
    """Each of torch's composite layers, which keep their constructor arguments only in their children."""

    def __init__(self):
        super().__init__()
        self.enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True, activation="gelu"), 2,
                                         norm=nn.LayerNorm(16), enable_nested_tensor=False)
        self.dec = nn.TransformerDecoder(nn.TransformerDecoderLayer(16, 2, 32, batch_first=True, norm_first=True), 1)
        self.both = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True, bias=False)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.both(self.dec(self.enc(x), x), x))


def test_torch_transformer_layers_are_written_and_read_back(tmp_path):
    """model.py could not rebuild nn.TransformerEncoder ('does not keep its constructor argument encoder_layer'):
    no model holding one could be saved, from Python or the CLI."""
    torch.manual_seed(0)
    model, x = Transformers().eval(), torch.randn(2, 5, 16)
    result = fxs.apply(model, [Freeze("enc")], example_inputs=(x,))
    out = tmp_path / "o"
    result.save(out)
    source = (out / "model.py").read_text()
    assert ("torch.nn.TransformerDecoder(decoder_layer=torch.nn.TransformerDecoderLayer(d_model=16, nhead=2, dim_feedforward=32, "
            "activation='relu', batch_first=True, norm_first=True), num_layers=1)") in source
    loaded = fxs.load(out)  # from graph.json, its module entries nested as {"module": ...}
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), result.module.eval()(x)) and torch.equal(loaded.eval()(x), model(x))
    assert [n for n, p in loaded.named_parameters() if not p.requires_grad] == [n for n, p in result.module.named_parameters()
                                                                                if not p.requires_grad]
    with torch.no_grad():  # torch's fast path for these layers runs under no_grad in eval mode: the same on both sides
        assert_runs_without_fxsurgery(out, x, model(x), tmp_path, grad=False)


def test_a_transformer_whose_layers_differ_from_their_first_is_refused(tmp_path):
    """Read from the first layer alone, these saved without a word and reloaded computing something else (0.15 away):
    a custom decoder in nn.Transformer, a second layer's own activation, an attention dropout of its own."""
    import torch.nn.functional as F

    def custom_decoder():
        decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(8, 2, 16, norm_first=True, activation="gelu"), 1, norm=nn.LayerNorm(8))
        return nn.Transformer(8, 2, 1, custom_decoder=decoder, dim_feedforward=16)

    def second_layer():
        encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16), 2, enable_nested_tensor=False)
        encoder.layers[1].activation = F.gelu
        return encoder

    def attention_dropout():
        layer = nn.TransformerEncoderLayer(8, 2, 16)
        layer.self_attn.dropout = 0.5
        return layer

    class Wrap(nn.Module):
        def __init__(self, core):
            super().__init__()
            self.core = core

        def forward(self, x):
            return self.core(x, x) if isinstance(self.core, nn.Transformer) else self.core(x)

    x = torch.randn(5, 2, 8)
    for make, kind in ((custom_decoder, "Transformer"), (second_layer, "TransformerEncoder"), (attention_dropout, "TransformerEncoderLayer")):
        result = fxs.apply(Wrap(make()), [], example_inputs=(x,))
        with pytest.raises(fxs.SaveError) as err:
            result.save(tmp_path / make.__name__)
        assert str(err.value).startswith(f"cannot write model.py: module 'core' (torch.nn.{kind}) rebuilt from its attributes differs "
                                         "from the original; fix: ")
        assert not (tmp_path / make.__name__).exists()


def test_a_removed_graph_json_or_an_edit_behind_a_link_is_named(tmp_path):
    # graph.json removed read "surgery.json changed"; so did an edit to the blob a hub-cache-style link points to
    import shutil
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    result = fxs.apply(model, [Freeze("0")], example_inputs=(torch.randn(2, 4),))
    result.save(tmp_path / "o")
    (tmp_path / "o" / "graph.json").unlink()
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o", trust_code=True)
    assert str(err.value) == f"{tmp_path / 'o'}: graph.json was removed {CHANGED.removeprefix('changed ')}"
    result.save(tmp_path / "linked")
    (tmp_path / "blobs").mkdir()
    for name in ("graph.json", "model.py", "model.safetensors", "surgery.json"):
        shutil.move(tmp_path / "linked" / name, tmp_path / "blobs" / name)
        os.symlink(tmp_path / "blobs" / name, tmp_path / "linked" / name)
    x = torch.randn(3, 4)
    assert torch.equal(fxs.load(tmp_path / "linked")(x), result.module(x))
    with open(tmp_path / "blobs" / "graph.json", "a") as handle:
        handle.write(" ")
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "linked")
    assert str(err.value) == f"{tmp_path / 'linked'}: graph.json {CHANGED}"


@pytest.mark.parametrize("key", ["sha256", "files"])
def test_a_record_naming_a_file_too_long_for_the_system_is_no_traceback(tmp_path, key):
    # "File name too long" came out of --force (and of load, for a save_pretrained record) as a raw OSError
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    result = fxs.apply(model, [Freeze("0")], example_inputs=(torch.randn(2, 4),))
    result.save(tmp_path / "o")
    record = json.loads((tmp_path / "o" / "surgery.json").read_text())
    record[key] = {**record[key], "a" * 300: "sha256:00"} if key == "sha256" else [*record[key], "a" * 300]
    (tmp_path / "o" / "surgery.json").write_text(json.dumps(record))
    result.save(tmp_path / "o", force=True)  # the long name is no file of the output: nothing to lose
    assert json.loads((tmp_path / "o" / "surgery.json").read_text())[key] != record[key]
    record = json.loads((tmp_path / "o" / "surgery.json").read_text())
    record["saved_by"] = "save_pretrained"
    (tmp_path / "o" / "surgery.json").write_text(json.dumps({**record, "files": [*record["files"], "b" * 300]}))
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(tmp_path / "o")
    assert str(err.value).startswith(f"{tmp_path / 'o' / 'surgery.json'}: lists 'bbbb")
    assert str(err.value).endswith("not a file name; fix: write the directory again with save()")
