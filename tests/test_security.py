"""Hostile input: rule files stay data, names stay names, files never run code, headers never allocate.

- A rule file imports and names nothing outside the allowlist (torch, torchvision
  and what --allow-module names); YAML tags that build Python objects are
  refused without running anything; YAML aliases do not multiply work.
- Module paths that are not plain names never reach model.py unescaped, and a
  name that collides after sanitising never silently swaps weights.
- torch.load runs with weights_only=True everywhere but the one --trust-pickle
  path; a malicious pickle passed to every entry point that reads a file is
  refused with a typed error and runs nothing.
- Malformed safetensors headers fail fast, without large allocations.

Every payload writes a canary file when it runs; the tests check the payload
is live (unpickled plainly, it does write the canary) and that the canary
never appears through fxsurgery.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import time
import tokenize
import tracemalloc
import unicodedata
from pathlib import Path

import pytest
import torch
import yaml
from conftest import cli, rehash
from safetensors.torch import save_file
from test_bad_inputs import run_cli as bad_inputs_cli
from torch import nn

import fxsurgery as fxs
from fxsurgery import Freeze
from fxsurgery.transfer import read_state_dict

PACKAGE = Path(fxs.__file__).resolve().parent
HEAD = "fxsurgery: 1\nrules:\n"
FIX = re.compile(r"; fix: \S")


def write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def run_cli(*argv):
    """(exit status, stdout, stderr, the exception the command raised or None), in-process."""
    return bad_inputs_cli([str(a) for a in argv])


def assert_refused(result, error=fxs.FxsError):
    """Exit status 2, one line on stderr, a typed error with a fix."""
    code, _, stderr, exc = result
    assert isinstance(exc, error), f"{type(exc).__name__}: {exc}"
    assert code == 2 and stderr == f"fxsurgery: error: {exc}\n", stderr
    assert "\n" not in str(exc) and FIX.search(str(exc)), str(exc)
    assert "Traceback" not in stderr


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


SMALL = f"{Path(__file__).resolve().parent / 'bad_inputs' / 'models.py'}:Small"


# -- rule files are data ------------------------------------------------------------------------

CANARY_MODULE = "fxs_canary_mod"


@pytest.fixture
def canary_package(tmp_path, monkeypatch):
    """A module on sys.path that writes a canary file when it is imported."""
    canary = tmp_path / "IMPORTED"
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / f"{CANARY_MODULE}.py").write_text(
        f"open({str(canary)!r}, 'w').write('imported')\n"
        "from torch import nn\n\n\nclass Net(nn.Identity):\n    pass\n\n\ndef boom(x):\n    return x\n")
    monkeypatch.syspath_prepend(str(lib))
    sys.modules.pop(CANARY_MODULE, None)
    yield canary
    sys.modules.pop(CANARY_MODULE, None)


@pytest.mark.parametrize("rule", [
    "  - replace: fc\n    with: {module: fxs_canary_mod.Net}\n",
    "  - replace: {function: torch.flatten}\n    with: {function: fxs_canary_mod.boom}\n",
    "  - delete: {type: fxs_canary_mod.Net}\n",
    "  - insert: {after: fc, module: fxs_canary_mod.Net}\n",
    "  - freeze: '*'\n    except: [{type: fxs_canary_mod.Net}]\n",
], ids=["module", "function", "type selector", "insert", "except selector"])
@pytest.mark.parametrize("allow", [[], ["fxs_canary"]], ids=["no allow", "allow a prefix only"])
def test_a_rule_file_imports_nothing_outside_the_allowlist(tmp_path, canary_package, rule, allow):
    path = write(tmp_path / "r.yaml", HEAD + rule)
    with pytest.raises(fxs.RuleError) as err:
        fxs.load_rules(path, allow=allow)
    assert str(err.value).startswith(f"{path}:") and "'fxs_canary_mod." in str(err.value) and "outside the allowlist" in str(err.value)
    assert not canary_package.exists() and CANARY_MODULE not in sys.modules
    args = ["check", path] + [a for name in allow for a in ("--allow-module", name)]
    assert_refused(run_cli(*args), fxs.RuleError)
    assert not canary_package.exists()


def test_allowing_the_package_is_what_imports_it(tmp_path, canary_package):
    path = write(tmp_path / "r.yaml", HEAD + "  - replace: fc\n    with: {module: fxs_canary_mod.Net}\n")
    rules = fxs.load_rules(path, allow=[CANARY_MODULE])
    assert canary_package.exists() and rules.rules[0].replacement.cls.__name__ == "Net"


@pytest.mark.parametrize("dotted", [
    "torch.serialization.os.system",
    "torch.os.system",
    "torch.serialization.pickle.loads",
    "torch.hub.sys.exit",
    "torchvision.datasets.utils.urllib.request.urlopen",
    "torch.utils.data.dataloader.multiprocessing.Process",
    "torch.hub.sys.modules",
    "torch.nn.Module.__subclasses__",
    "torch.__builtins__",
    "torch.sys.path.append",       # a method bound to an object has no __module__: it was taken for torch's own, and called
    "torch.sys.modules.clear",
    "torch.sys.stdout.close",
    "torch.hub.sys.meta_path.append",
], ids=lambda d: d)
@pytest.mark.parametrize("kind", ["module", "function"])
def test_an_allowed_prefix_does_not_reach_other_packages(tmp_path, dotted, kind):
    path = write(tmp_path / "r.yaml", HEAD + f"  - replace: {{function: torch.flatten}}\n    with: {{{kind}: {dotted}}}\n")
    with pytest.raises(fxs.RuleError) as err:
        fxs.load_rules(path)
    assert str(err.value).startswith(f"{path}:4: '{dotted}' ") and FIX.search(str(err.value))


@pytest.mark.parametrize("dotted", ["torch.hub.load", "torch.save", "torch.load", "torch.set_default_dtype", "torch.manual_seed",
                                    "torch.utils.cpp_extension.load_inline", "torch.compile", "torch.jit.save", "torchvision.io.write_png"])
def test_a_rule_cannot_put_a_function_that_is_not_an_operation_in_a_model(tmp_path, dotted):
    """torch.hub.load was called by the shape pass of `apply` (it failed only on its arguments' shape)."""
    path = write(tmp_path / "r.yaml", HEAD + f"  - replace: {{type: torch.nn.ReLU}}\n    with: {{function: {dotted}}}\n")
    with pytest.raises(fxs.RuleError) as err:
        fxs.load_rules(path)
    assert str(err.value) == (f"{path}:4: '{dotted}' is not an operation on tensors (it reads or writes files, processes or global state), "
                              "which a rule cannot put in a model; fix: name a function such as torch.nn.functional.gelu")
    kept = write(tmp_path / "ok.yaml", HEAD + "  - replace: {type: torch.nn.ReLU}\n    with: {function: torch.nn.functional.gelu}\n")
    assert list(fxs.load_rules(kept))[0].replacement is torch.nn.functional.gelu


TAGS = [
    ("object/apply", "  - delete: !!python/object/apply:os.system ['touch {canary}']\n", 3),
    ("object/new", "  - delete: !!python/object/new:subprocess.Popen [['touch', '{canary}']]\n", 3),
    ("name", "  - replace: {{function: torch.flatten}}\n    with: {{function: !!python/name:os.system }}\n", 4),
    ("module", "  - delete: !!python/module:os\n", 3),
    ("object", "  - delete: !!python/object:argparse.Namespace {{x: 1}}\n", 3),
    ("in params", "params: {{n: !!python/object/apply:os.system ['touch {canary}']}}\n", 1),
    ("in a key", "  - ? !!python/object/apply:os.system ['touch {canary}']\n    : fc\n", 3),
    ("in with", "  - replace: fc\n    with: {{module: torch.nn.Linear, out_features: !!python/object/apply:os.system ['touch {canary}']}}\n", 4),
    ("local tag", "  - delete: !Evil fc\n", 3),
]


@pytest.mark.parametrize("text, line", [t[1:] for t in TAGS], ids=[t[0] for t in TAGS])
def test_yaml_tags_that_build_objects_are_refused(tmp_path, text, line):
    canary = tmp_path / "PWNED"
    body = text.format(canary=canary)
    doc = ("fxsurgery: 1\n" + body + "rules:\n  - delete: fc\n") if body.startswith("params") else HEAD + body
    path = write(tmp_path / "r.yaml", doc)
    line = line + 1 if body.startswith("params") else line
    with pytest.raises(fxs.RuleError) as err:
        fxs.load_rules(path)
    assert str(err.value).startswith(f"{path}:{line}: tag ") and "is not allowed" in str(err.value)
    assert_refused(run_cli("check", path), fxs.RuleError)
    assert not canary.exists()


def test_a_set_value_with_a_tag_stays_text(tmp_path):
    canary = tmp_path / "PWNED"
    path = write(tmp_path / "r.yaml", "fxsurgery: 1\nparams: {n: 10}\nrules:\n  - replace: fc\n"
                                      "    with: {module: torch.nn.Linear, out_features: ${n}}\n")
    code, _, _, exc = run_cli("check", path, "--set", f"n=!!python/object/apply:os.system ['touch {canary}']")
    assert code in (0, 2) and (exc is None or isinstance(exc, fxs.FxsError))
    assert not canary.exists()


def _refused_measured(path: str):
    """(the RuleError loading `path` raises, peak bytes allocated, seconds taken)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(fxs.RuleError) as err:
            fxs.load_rules(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return err, peak, time.perf_counter() - start


def test_params_do_not_multiply_work_either(tmp_path):
    """${p} 5,000 times over a 20,000-character param: 0.1 MB of file, 100 MB of selector (quadratic in the file's size)."""
    path = write(tmp_path / "r.yaml", f"fxsurgery: 1\nparams: {{p: {'A' * 20_000}}}\nrules:\n  - delete: \"{'${p}' * 5_000}\"\n")
    err, peak, _ = _refused_measured(path)
    assert str(err.value) == (f"{path}:4: ${{p}} and the other params expand the file by more than 1048576 characters; "
                              "fix: refer to a long param fewer times")
    assert peak < 16 * 2**20, f"loading allocated {peak / 2**20:.0f} MiB"
    assert_refused(run_cli("check", path), fxs.RuleError)
    key = write(tmp_path / "k.yaml", "fxsurgery: 1\nparams: {k: p}\nrules:\n  - insert: {after: fc, module: torch.nn.Dropout, ${k}: 0.5}\n")
    with pytest.raises(fxs.RuleError) as err:   # it said: Dropout does not take '__fxsparam_6b__'
        fxs.load_rules(key)
    assert str(err.value) == f"{key}:4: '${{k}}' is a key; params fill values only; fix: write the key itself"


@pytest.mark.parametrize("kind", ["fifo", "device", "directory", "huge"])
def test_a_rule_file_that_is_not_a_file_is_refused_before_it_is_read(tmp_path, kind):
    """A FIFO hung the loader, /dev/zero grew without end (6.4 GB in 20 s)."""
    path = tmp_path / "r.yaml"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "huge":
        path.write_text(HEAD + "  - delete: fc\n" + "# padding\n" * 900_000)
    path = "/dev/zero" if kind == "device" else str(path)
    with pytest.raises(fxs.RuleError) as err:
        fxs.load_rules(path)
    assert str(err.value) == (f"{path}: a rule file of more than 8388608 bytes; fix: pass a rule file, not data" if kind == "huge"
                              else f"{path}: not a regular file; fix: pass a rule file (.yaml)")
    assert_refused(run_cli("check", path), fxs.RuleError)


def _bomb(depth: int, place: str) -> str:
    """A YAML 'billion laughs': depth levels of ten aliases each (10**depth leaves)."""
    anchors = ["      - &a0 [x, x, x, x, x, x, x, x, x, x]"]
    anchors += [f"      - &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, depth + 1)]
    if place == "unknown key":
        return HEAD + "  - delete: fc\n    bomb:\n" + "\n".join(anchors) + "\n"
    return HEAD + "  - delete:\n" + "\n".join(anchors) + "\n"


@pytest.mark.parametrize("place", ["unknown key", "selector"])
def test_yaml_aliases_do_not_multiply_work(tmp_path, place):
    """100,000 leaves by alias in about 400 bytes: the loader must refuse or share them, never expand them."""
    path = write(tmp_path / "r.yaml", _bomb(5, place))
    assert os.path.getsize(path) < 1000
    err, peak, elapsed = _refused_measured(path)
    assert len(str(err.value)) < 2000, f"the message is {len(str(err.value))} characters"
    assert peak < 8 * 2**20, f"loading a {os.path.getsize(path)}-byte rule file allocated {peak / 2**20:.0f} MiB"
    assert elapsed < 1.0, f"loading a {os.path.getsize(path)}-byte rule file took {elapsed:.2f} s"


# -- module names never reach model.py unescaped ---------------------------------------------------

def _named(names, inject=False):
    class Hostile(nn.Module):
        def __init__(self):
            super().__init__()
            for n in names:
                if inject:  # names nn.Module.add_module refuses (attributes of the class)
                    self._modules[n] = nn.Linear(2, 2)
                else:
                    self.add_module(n, nn.Linear(2, 2))

        def forward(self, x):
            for n in names:
                x = self._modules[n](x)
            return x
    torch.manual_seed(0)
    return Hostile()


def _unsafe(name: str) -> bool:
    """Not a plain name, and not one Python reads back as itself (not an identifier, or changed by NFKC)."""
    plain = re.fullmatch(r"[A-Za-z0-9_]+", name) is not None
    return not plain and (not name.isidentifier() or unicodedata.normalize("NFKC", name) != name)


def _code(source: str) -> str:
    """The source with string literals and comments taken out: what Python reads as code."""
    skip = {tokenize.STRING, tokenize.COMMENT} | {getattr(tokenize, t) for t in ("FSTRING_MIDDLE",) if hasattr(tokenize, t)}
    return " ".join(t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in skip)


HOSTILE = [
    ("newline", ["a\nb"], False),
    ("carriage return", ["a\rb"], False),
    ("backslash", ["a\\nb"], False),
    ("unicode ligature", ["\ufb01"], False),               # NFKC: 'fi'
    ("fullwidth twin", ["x", "\uff58"], False),             # NFKC: 'x', the other module's name
    ("accented", ["h\u00e9llo"], False),
    ("emoji then m", ["\U0001f642", "m"], False),
    ("right-to-left override", ["a\u202eb"], False),
    ("keyword import", ["import"], False),
    ("keyword None", ["None"], False),
    ("Model.load", ["load"], False),
    ("dunder __init__", ["__init__"], True),
    ("dunder forward", ["forward"], True),
    ("dunder name", ["__weird__"], False),
    ("a-b then a_b", ["a-b", "a_b"], False),
    ("a_b then a-b", ["a_b", "a-b"], False),
    ("a b, a_b_1, a_b", ["a b", "a_b_1", "a_b"], False),
    ("digits", ["0", "1"], False),
]


@pytest.mark.parametrize("names, inject", [h[1:] for h in HOSTILE], ids=[h[0] for h in HOSTILE])
def test_hostile_module_names(tmp_path, names, inject):
    """Either a typed refusal with nothing written, or model.py with safe names and bit-identical outputs."""
    model = _named(names, inject)
    x = torch.randn(3, 2)
    expected = model(x)
    out = tmp_path / "o"
    try:
        result = fxs.apply(model, [], example_inputs=(x[:1],))
    except fxs.FxsError as exc:
        assert "\n" not in str(exc) and FIX.search(str(exc)), str(exc)
        return
    assert torch.equal(result.module(x), expected), "the result computes something else"
    try:
        result.save(out)
    except fxs.FxsError as exc:
        assert "\n" not in str(exc) and FIX.search(str(exc)), str(exc)
        assert not out.exists() and os.listdir(tmp_path) == []
        return
    source = (out / "model.py").read_text(encoding="utf-8")
    ast.parse(source)
    code = _code(source)
    for name in names:
        if _unsafe(name):
            assert name not in code, f"{name!r} reached model.py outside a string literal"
    loaded = fxs.load(out)
    assert torch.equal(loaded(x), expected), "the loaded model computes something else"
    renamed = json.loads((out / "surgery.json").read_text())["renamed"]
    original = model.state_dict()
    state = loaded.state_dict()
    assert len(state) == len(original)
    for key, value in original.items():
        module, _, leaf = key.rpartition(".")
        assert torch.equal(state[f"{renamed.get(module, module)}.{leaf}"], value), key


# -- torch.load and pickle ---------------------------------------------------------------------------

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


def test_torch_load_is_weights_only_except_the_trust_pickle_path():
    unsafe, unmarked = [], []
    for path in sorted(PACKAGE.rglob("*.py")):  # every stage's modules
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in ("torch", "torch.serialization"):
                assert "load" not in [a.name for a in node.names], f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno} imports load by name"
        for call in _calls(tree):
            if _dotted(call.func) not in ("torch.load", "torch.serialization.load"):
                continue
            flag = next((k.value for k in call.keywords if k.arg == "weights_only"), None)
            where = f"{path.relative_to(PACKAGE).as_posix()}:{call.lineno}"
            if isinstance(flag, ast.Constant) and flag.value is True:
                continue
            if isinstance(flag, ast.Constant) and flag.value is False:
                unsafe.append(where)
            else:
                unmarked.append(where)
    assert unmarked == [], f"torch.load without an explicit weights_only=True: {unmarked}"
    assert len(unsafe) == 1 and unsafe[0].startswith("cli/_modelref.py:"), f"torch.load(weights_only=False) at {unsafe}"
    source = (PACKAGE / "cli" / "_modelref.py").read_text(encoding="utf-8")
    lines = source.splitlines()
    line = int(unsafe[0].split(":")[1])
    guard = "\n".join(lines[max(0, line - 6):line])
    assert "trust_pickle" in guard, f"cli/_modelref.py:{line} is not behind the --trust-pickle check"


def test_no_other_deserialiser_that_runs_code():
    banned_modules = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "jsonpickle"}
    banned_calls = {"yaml.load", "yaml.load_all", "yaml.unsafe_load", "yaml.full_load", "yaml.unsafe_load_all",
                    "yaml.full_load_all", "numpy.load", "np.load", "eval", "exec"}
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):  # every stage's modules
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found += [f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno} import {a.name}" for a in node.names if a.name.split(".")[0] in banned_modules]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in banned_modules:
                found.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno} from {node.module}")
            elif isinstance(node, ast.Call) and _dotted(node.func) in banned_calls:
                found.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno} {_dotted(node.func)}(...)")
            elif isinstance(node, ast.Attribute) and node.attr in ("FullLoader", "UnsafeLoader", "Loader") and _dotted(node.value) == "yaml":
                found.append(f"{path.relative_to(PACKAGE).as_posix()}:{node.lineno} yaml.{node.attr}")
    # one pickle reader: DCP's .metadata (a pickle by DCP's design), through an Unpickler whose find_class is an allowlist
    assert [f.split(":")[0] + " " + f.split(" ", 1)[1] for f in found] == ["transfer/_dcp.py import pickle"]
    from fxsurgery.transfer._dcp import _Unpickler
    assert _Unpickler.find_class is not pickle.Unpickler.find_class
    for module, name in (("os", "system"), ("builtins", "eval"), ("torch", "load"), ("subprocess", "Popen"),
                         ("torch.distributed.checkpoint.metadata", "os.system"), ("torch", "serialization.load")):
        with pytest.raises(pickle.UnpicklingError, match=f"refused global {module}.{name}"):
            _Unpickler(io.BytesIO(b"")).find_class(module, name)
    from fxsurgery.spec._yaml import LineLoader
    assert issubclass(LineLoader, yaml.SafeLoader)
    assert not issubclass(LineLoader, (yaml.FullLoader, yaml.UnsafeLoader))


def test_check_shows_a_rule_file_s_control_characters_escaped(tmp_path):
    # apply's errors escaped them; check printed the rules as they were, terminal escapes and carriage returns included
    rules = tmp_path / "r\x1b[2J.yaml"
    rules.write_text('fxsurgery: 1\nrules:\n  - delete: "\\e[2J\\e[31mfc2"\n  - freeze: "fc1\\rOK"\n')
    code, stdout, stderr = cli("check", rules)
    assert (code, stderr) == (0, "")
    assert stdout == (f"'{tmp_path}/r\\x1b[2J.yaml': ok, 2 rules\n"
                      "  1. 'delete \\x1b[2J\\x1b[31mfc2'\n  2. 'freeze fc1\\rOK'\n")


_CLASS = b"cpathlib\nPosixPath\n"


@pytest.mark.parametrize("payload, target", [
    # slot state on an allowed class: setattr(PosixPath, "exists", PosixPath) for the whole process
    (_CLASS + b"(N}S'exists'\n" + _CLASS + b"stb.", "the class pathlib.PosixPath"),
    (b"ctorch\nfloat32\n(N}S'is_floating_point'\nctorch\nSize\nstb.", "a torch.dtype"),
    (b"ctorch.serialization\n_get_layout\n(N}S'x'\nI1\nstb.", "a builtins.function"),
    # an allowed enum called with a value returns its shared member: contiguous tensors were saved as channels_last after
    (b"ctorch.distributed.checkpoint.metadata\n_MEM_FORMAT_ENCODING\n(I0\ntR(N}S'_value_'\nI1\nstb.",
     "a torch.distributed.checkpoint.metadata._MEM_FORMAT_ENCODING"),
], ids=["a class", "a dtype", "a function", "an enum member"])
def test_dcp_metadata_may_not_set_attributes_on_what_it_did_not_construct(tmp_path, payload, target):
    import pathlib

    from torch.distributed.checkpoint.metadata import _MEM_FORMAT_ENCODING
    (tmp_path / "dcp").mkdir()
    (tmp_path / "dcp" / ".metadata").write_bytes(payload)
    exists, is_float = pathlib.PosixPath.exists, torch.float32.is_floating_point
    with pytest.raises(fxs.ModelError) as err:
        fxs.map_weights(tmp_path / "dcp", tmp_path / "nowhere")
    assert str(err.value) == (f"{tmp_path / 'dcp'}: cannot read the torch.distributed.checkpoint metadata: UnpicklingError: "
                              f"refused setting attributes of {target}; fix: pass a complete checkpoint directory written by dcp.save")
    assert pathlib.PosixPath.exists is exists and torch.float32.is_floating_point == is_float
    assert _MEM_FORMAT_ENCODING(0).value == 0 and _MEM_FORMAT_ENCODING(0).name == "TORCH_CONTIGUOUS_FORMAT"


class Payload:
    """Unpickled, it writes the canary file: what a hostile checkpoint does."""

    def __init__(self, canary: Path):
        self.canary = str(canary)

    def __reduce__(self):
        return exec, (f"open({self.canary!r}, 'w').write('pwned')",)


@pytest.fixture
def hostile(tmp_path):
    """Malicious pickles in the forms a user might be handed, and a surgery directory to aim them at."""
    canary = tmp_path / "PWNED"
    files = tmp_path / "files"
    files.mkdir()
    torch.save({"fc1.weight": Payload(canary)}, files / "state.pt")
    torch.save({"fc1.weight": Payload(canary)}, files / "legacy.pt", _use_new_zipfile_serialization=False)
    (files / "raw.pkl").write_bytes(pickle.dumps(Payload(canary)))
    torch.save(Payload(canary), files / "model.pt")
    (files / "state.safetensors").write_bytes((files / "state.pt").read_bytes())
    torch.manual_seed(0)
    saved = tmp_path / "saved"
    fxs.apply(Small(), [Freeze("fc1")], example_inputs=(torch.randn(2, 4),)).save(saved)
    return canary, files, saved


def test_the_payload_is_live(hostile):
    canary, files, _ = hostile
    pickle.loads((files / "raw.pkl").read_bytes())
    assert canary.read_text() == "pwned"


PICKLES = ["state.pt", "legacy.pt", "raw.pkl", "model.pt", "state.safetensors"]


@pytest.mark.parametrize("name", PICKLES)
def test_apply_weights_refuses_a_pickle(hostile, tmp_path, name):
    canary, files, _ = hostile
    rules = write(tmp_path / "r.yaml", HEAD + "  - freeze: fc1\n")
    result = run_cli("apply", SMALL, rules, "--input=2x4", "--weights", files / name, "-o", tmp_path / "out")
    assert_refused(result, fxs.ModelError)
    assert str(result[3]).startswith(f"{files / name}: ")
    assert not canary.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", PICKLES)
def test_inspect_refuses_a_pickled_model_without_trust(hostile, name):
    canary, files, _ = hostile
    assert_refused(run_cli("inspect", files / name), fxs.ModelError)
    assert not canary.exists()


@pytest.mark.parametrize("name", PICKLES)
def test_apply_refuses_a_pickled_model_without_trust(hostile, tmp_path, name):
    canary, files, _ = hostile
    rules = write(tmp_path / "r.yaml", HEAD + "  - freeze: fc1\n")
    assert_refused(run_cli("apply", files / name, rules, "--input=2x4", "-o", tmp_path / "out"), fxs.ModelError)
    assert not canary.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", PICKLES)
def test_map_weights_refuses_a_pickle(hostile, tmp_path, name):
    canary, files, saved = hostile
    out = tmp_path / "mapped.safetensors"
    result = run_cli("map-weights", files / name, saved, "-o", out)
    assert_refused(result, fxs.ModelError)
    assert not canary.exists() and not out.exists()


@pytest.mark.parametrize("name", PICKLES)
def test_a_pickle_as_a_rule_file_is_refused(hostile, name):
    canary, files, _ = hostile
    with pytest.raises(fxs.RuleError):
        fxs.load_rules(files / name)
    with pytest.raises(fxs.RuleError):
        fxs.apply(Small(), [str(files / name)], example_inputs=(torch.randn(2, 4),))
    assert_refused(run_cli("check", files / name), fxs.RuleError)
    assert not canary.exists()



@pytest.mark.parametrize("forge", [False, True], ids=["hash kept", "hash forged"])
@pytest.mark.parametrize("target, name", [("model.safetensors", "state.pt"), ("model.safetensors", "raw.pkl"),
                                          ("surgery.json", "raw.pkl")])
def test_load_refuses_replaced_files(hostile, target, name, forge):
    canary, files, saved = hostile
    (saved / target).write_bytes((files / name).read_bytes())
    if forge and target != "surgery.json":
        rehash(saved)
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(saved)
    assert str(err.value).startswith(str(saved)) and FIX.search(str(err.value)) and "\n" not in str(err.value)
    assert not canary.exists()
    assert_refused(run_cli("inspect", saved), fxs.SaveError)
    assert not canary.exists()


@pytest.fixture
def recorded_torch_load(monkeypatch):
    calls = []
    real = torch.load

    def load(*args, **kwargs):
        calls.append(kwargs.get("weights_only", "<default>"))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "load", load)
    return calls


def test_every_torch_load_is_weights_only_at_run_time(tmp_path, hostile, recorded_torch_load):
    _, files, saved = hostile
    torch.manual_seed(0)
    small = Small()
    torch.save(small.state_dict(), files / "good.pt")
    torch.save(small, files / "whole.pt")
    rules = write(tmp_path / "r.yaml", HEAD + "  - freeze: fc1\n")
    assert run_cli("apply", SMALL, rules, "--input=2x4", "--weights", files / "good.pt", "-o", tmp_path / "o")[0] == 0
    assert run_cli("map-weights", files / "good.pt", saved, "-o", tmp_path / "m.safetensors")[0] == 0
    assert run_cli("inspect", tmp_path / "o")[0] == 0
    fxs.load(tmp_path / "o")
    assert run_cli("inspect", files / "whole.pt")[0] == 2
    assert recorded_torch_load and all(flag is True for flag in recorded_torch_load), recorded_torch_load
    count = len(recorded_torch_load)
    # the one path that unpickles a whole model: --trust-pickle, asked for by the user
    assert run_cli("inspect", files / "whole.pt", "--trust-pickle")[0] == 0
    assert recorded_torch_load[count:] == [False]


# -- malformed safetensors headers ------------------------------------------------------------------

def craft(header, data: bytes = b"", length: int | None = None) -> bytes:
    """safetensors by hand: 8-byte little-endian header length, JSON header, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def f32(shape, offsets):
    return {"dtype": "F32", "shape": shape, "data_offsets": offsets}


MALFORMED = {
    "header length 2**63": craft({"a": f32([2], [0, 8])}, bytes(8), length=2**63),
    "header length past the end": craft({"a": f32([2], [0, 8])}, bytes(8), length=10_000),
    "header length 99 MB": craft({"a": f32([2], [0, 8])}, bytes(8), length=99_000_000),
    "overlapping offsets": craft({"a": f32([4], [0, 16]), "b": f32([4], [8, 24])}, bytes(24)),
    "offset out of range": craft({"a": f32([2], [0, 1 << 40])}, bytes(8)),
    "offsets reversed": craft({"a": f32([2], [8, 0])}, bytes(8)),
    "gap between tensors": craft({"a": f32([2], [0, 8]), "b": f32([2], [16, 24])}, bytes(24)),
    "shape larger than its bytes": craft({"a": f32([1000, 1000], [0, 16])}, bytes(16)),
    "shape of 2**124 elements": craft({"a": f32([2**62, 2**62], [0, 16])}, bytes(16)),
    "shape and offsets both huge": craft({"a": f32([2**31, 2**31], [0, 2**64 - 1])}, bytes(16)),
    "dtype wider than its bytes": craft({"a": {"dtype": "F64", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
    "unknown dtype": craft({"a": {"dtype": "F99", "shape": [4], "data_offsets": [0, 16]}}, bytes(16)),
    "truncated data": craft({"a": f32([4], [0, 16])}, bytes(8)),
    "header not JSON": craft(b"{not json"),
    "header not UTF-8": craft(b'{"a\xff": 1}'),
    "negative offset": craft(b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [-8, 0]}}', bytes(8)),
    "empty header": craft(b""),
    "metadata not text": craft({"__metadata__": {"k": 1}, "a": f32([2], [0, 8])}, bytes(8)),
    "header is a list": craft([1, 2, 3]),
    "header nested 100,000 deep": craft(b"[" * 100_000 + b"]" * 100_000),
    "only 4 bytes": b"\x10\x00\x00\x00",
}


def test_a_crafted_file_is_well_formed_when_it_should_be(tmp_path):
    path = tmp_path / "ok.safetensors"
    path.write_bytes(craft({"a": f32([2, 2], [0, 16])}, struct.pack("<4f", 1, 2, 3, 4)))
    assert torch.equal(read_state_dict(path)["a"], torch.tensor([[1.0, 2.0], [3.0, 4.0]]))


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_safetensors_is_refused(tmp_path, name):
    path = tmp_path / "w.safetensors"
    path.write_bytes(MALFORMED[name])
    start = time.perf_counter()
    with pytest.raises(fxs.ModelError) as err:
        read_state_dict(path)
    assert time.perf_counter() - start < 1.0
    assert str(err.value).startswith(f"{path}: ") and FIX.search(str(err.value)) and "\n" not in str(err.value)
    rules = write(tmp_path / "r.yaml", HEAD + "  - freeze: fc1\n")
    assert_refused(run_cli("apply", SMALL, rules, "--input=2x4", "--weights", path, "-o", tmp_path / "out"), fxs.ModelError)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["header length 2**63", "shape of 2**124 elements", "truncated data", "overlapping offsets"])
def test_malformed_weights_in_a_saved_directory(tmp_path, name):
    torch.manual_seed(0)
    saved = tmp_path / "saved"
    fxs.apply(Small(), [Freeze("fc1")], example_inputs=(torch.randn(2, 4),)).save(saved)
    (saved / "model.safetensors").write_bytes(MALFORMED[name])
    rehash(saved)
    with pytest.raises(fxs.SaveError) as err:
        fxs.load(saved)
    assert FIX.search(str(err.value)) and "\n" not in str(err.value)
    out = tmp_path / "mapped.safetensors"
    checkpoint = tmp_path / "w.safetensors"
    checkpoint.write_bytes(MALFORMED[name])
    assert_refused(run_cli("map-weights", checkpoint, saved, "-o", out), fxs.ModelError)
    assert not out.exists()


def test_malformed_safetensors_allocate_nothing_large(tmp_path):
    """In a fresh process (so the peak resident size is its own), no crafted file raises it by more than 64 MiB."""
    for i, data in enumerate(MALFORMED.values()):
        (tmp_path / f"{i}.safetensors").write_bytes(data)
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(good))
    script = (
        "import json, resource, sys, time\n"
        "from fxsurgery.transfer._checkpoint import read_state_dict\n"
        "from fxsurgery.errors import FxsError\n"
        "read_state_dict(sys.argv[1])\n"
        "out = []\n"
        "for path in sys.argv[2:]:\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "    start = time.perf_counter()\n"
        "    try:\n"
        "        read_state_dict(path); kind = 'accepted'\n"
        "    except FxsError as exc:\n"
        "        kind = type(exc).__name__\n"
        "    out.append([path, kind, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, time.perf_counter() - start])\n"
        "print(json.dumps(out))\n")
    paths = [str(tmp_path / f"{i}.safetensors") for i in range(len(MALFORMED))]
    proc = subprocess.run([sys.executable, "-c", script, str(good), *paths], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    names = dict(zip(paths, MALFORMED))
    assert [(names[p], kind) for p, kind, _, _ in rows if kind != "ModelError"] == []
    grown = [(names[p], kib // 1024) for p, _, kib, _ in rows if kib > 64 * 1024]
    assert grown == [], f"peak resident size grew (MiB): {grown}"
    slow = [(names[p], round(s, 2)) for p, _, _, s in rows if s > 1.0]
    assert slow == []


def test_a_submodule_named_self_does_not_shadow_the_forwards_self(tmp_path):
    """`self = self.self(x); fc = self.fc(self)`: the result failed when called, apply exited 0, and the saved
    directory did not load ("method 'fc' is not a tensor method")."""
    class Selfish(nn.Module):
        def __init__(self):
            super().__init__()
            self.add_module("self", nn.Linear(4, 4))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(self._modules["self"](x))

    torch.manual_seed(0)
    model, x = Selfish(), torch.randn(2, 4)
    for n, rules in enumerate(([], [fxs.Replace("self", nn.Linear(4, 4))], [fxs.Insert(nn.ReLU(), after="self")])):
        result = fxs.apply(model, rules, example_inputs=(x,))
        got = result.module(x)
        inner = model._modules["self"](x)
        want = model.fc([inner, rules[0].replacement(x) if n == 1 else None, torch.relu(inner)][n])
        assert torch.equal(got, want)
        result.save(tmp_path / str(n))
        assert torch.equal(fxs.load(tmp_path / str(n))(x), got)
        assert torch.equal(fxs.load(tmp_path / str(n), trust_code=True)(x), got)
