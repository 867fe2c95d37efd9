"""Names never become code: model.py keeps its fixed structure whatever the model calls its class and parts.

A hostile class name or submodule name (quotes, triple quotes, backslashes,
newlines, NUL, NFKC twins, keywords, dunders) either makes save() refuse with
a one-line SaveError, or gives a model.py whose syntax tree holds only the
expected statements and which loads back to the same outputs.
"""

from __future__ import annotations

import ast
import os
import re

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from torch import nn

import fxsurgery as fxs

FIX = re.compile(r"; fix: ")
PIECES = ['"""', "'''", '"', "'", "\\", "\n", "\r", "\x00", "\ufb01", "\uff58", "\u202e", "import os", "os.system('x')",
          "exec", "eval", "__init__", "__class__", "forward", "load", "None", "import", "class", "def", "_put",
          "x", "a b", "#", ";", "(", ")", "{", "}", "\t", "\\N{BULLET}", "\\x22", "é", "\U0001f642", "\ud800"]
NAME = st.lists(st.one_of(st.sampled_from(PIECES), st.text(min_size=1, max_size=4)), min_size=1, max_size=4).map("".join)
TOP_LEVEL = (ast.Import, ast.ImportFrom, ast.Assign, ast.FunctionDef, ast.ClassDef)
FORBIDDEN = {"exec", "eval", "compile", "__import__", "open", "system", "popen", "breakpoint", "input", "globals"}


def _hostile(class_name: str, names: list[str]) -> nn.Module:
    def __init__(self):
        nn.Module.__init__(self)
        for n in names:
            self._modules[n] = nn.Linear(2, 2)

    def forward(self, x):
        for n in names:
            x = self._modules[n](x)
        return x
    # type() refuses NUL and surrogates; save() takes the full name from _fxsurgery_class (see _check)
    cls = type(re.sub(r"[\x00-\x1f\ud800-\udfff]", "", class_name), (nn.Module,), {"__init__": __init__, "forward": forward})
    torch.manual_seed(0)
    return cls()


def _names_used(tree: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}


def assert_expected_structure(source: str) -> None:
    """Docstring, imports, constants, _put and class Model: nothing else at the top level, nothing that runs code."""
    tree = ast.parse(source)
    first, *rest = tree.body
    assert isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)
    for stmt in rest:
        assert isinstance(stmt, TOP_LEVEL), ast.dump(stmt)[:200]
        if isinstance(stmt, ast.Assign):
            assert [type(t) for t in stmt.targets] == [ast.Name], ast.dump(stmt)[:200]
            ast.literal_eval(stmt.value)  # only constants: FROZEN, TIES, NON_PERSISTENT, EVAL
        if isinstance(stmt, ast.FunctionDef):
            assert stmt.name == "_put"
        if isinstance(stmt, ast.ClassDef):
            assert stmt.name == "Model"
            assert [type(s).__name__ for s in stmt.body] == ["Assign", "FunctionDef", "FunctionDef", "FunctionDef"]
            assert [s.name for s in stmt.body[1:]] == ["__init__", "load", "forward"]
            assert isinstance(stmt.body[0].value, ast.Constant) and isinstance(stmt.body[0].value.value, str)
    assert [type(s).__name__ for s in rest].count("ClassDef") == 1
    assert not _names_used(tree) & FORBIDDEN, _names_used(tree) & FORBIDDEN


def _check(tmp_path, class_name: str, names: list[str]) -> str:
    """'refused' or 'saved', after asserting what each must satisfy."""
    for leftover in tmp_path.iterdir():
        for f in leftover.iterdir():
            f.unlink()
        leftover.rmdir()
    model = _hostile(class_name, names)
    x = torch.randn(3, 2)
    expected = model(x)
    try:
        result = fxs.apply(model, [], example_inputs=(x[:1],))
    except fxs.FxsError as exc:
        assert "\n" not in str(exc) and FIX.search(str(exc)), str(exc)
        return "refused"
    result.module._fxsurgery_class = class_name  # the name save() writes, NUL included
    out = tmp_path / "o"
    try:
        result.save(out)
    except fxs.SaveError as exc:
        assert "\n" not in str(exc) and FIX.search(str(exc)), str(exc)
        assert not out.exists() and os.listdir(tmp_path) == []
        return "refused"
    assert_expected_structure((out / "model.py").read_text(encoding="utf-8"))
    loaded = fxs.load(out)
    assert torch.equal(loaded(x), expected)
    return "saved"


@settings(max_examples=150, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(class_name=NAME, names=st.lists(NAME, min_size=1, max_size=3, unique=True))
def test_hostile_class_and_module_names(tmp_path, class_name, names):
    _check(tmp_path, class_name, names)


@pytest.mark.parametrize("class_name", ['X"""\nimport os\nos.environ["FXS_PWNED"] = "1"\n"""', "X\\", "a\x00b", "\ufb01", "class", "__init__"])
def test_hostile_class_name_is_saved_as_data(tmp_path, class_name):
    assert _check(tmp_path, class_name, ["fc"]) == "saved"
    assert "FXS_PWNED" not in os.environ
    source = (tmp_path / "o" / "model.py").read_text(encoding="utf-8")
    assert ast.literal_eval(re.search(r"_fxsurgery_class = (.*)", source).group(1)) == class_name


def test_a_forged_method_name_is_refused(tmp_path):
    model = _hostile("M", ["fc"])
    result = fxs.apply(model, [], example_inputs=(torch.randn(1, 2),))
    graph = result.module.graph
    out_node = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out_node):
        hostile = graph.call_method('size"); import os; ("', (out_node.args[0],))
    hostile.name = "hostile"
    with pytest.raises(fxs.SaveError) as err:
        fxs.export.save(result.module, tmp_path / "o")
    assert str(err.value) == ("cannot write model.py: node 'hostile' calls the method 'size\"); import os; (\"', which is not a plain name; "
                              "fix: call methods by their Python names")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("name, message", [
    ("a\x00b", "module path 'a\\x00b' contains a NUL or a lone surrogate, which Python source cannot hold; fix: rename that submodule"),
    ("os.system('x')", "module name \"os.system('x')\" in Hostile contains a dot, which reads as a path to another module; fix: rename that submodule"),
])
def test_names_python_source_cannot_hold_are_refused_when_captured(name, message):
    from fxsurgery.capture import trace
    with pytest.raises(fxs.TraceError) as err:
        trace(_hostile("Hostile", [name]))
    assert str(err.value) == message


def test_source_outside_the_fixed_layout_is_refused():
    from fxsurgery.export._names import check_structure
    with pytest.raises(fxs.SaveError) as err:
        check_structure('"""doc"""\nimport os\nos.system("x")\nclass Model:\n    pass\n')
    assert str(err.value) == ("cannot write model.py: the generated source has statements outside its fixed layout (line 3, line 4, "
                              "a use of 'system'); fix: rename the model's classes and modules to plain Python names")


@pytest.mark.parametrize("name, why", [
    ("class", "has the Python keyword 'class' as a name, which torch.fx would write as code that does not parse"),
    ('a"b', "contains a quote, backslash or line break, which torch.fx would write into generated code unescaped"),
])
def test_a_name_no_generated_code_holds_is_refused_with_rename_as_the_fix(tmp_path, name, why):
    """The save said "part of its forward stays Python ... fix: make the model traceable (leaf_paths=)", which no
    leaf fixes: the name is the problem."""
    model = _hostile("Named", [name])
    result = fxs.apply(model, [], example_inputs=(torch.randn(1, 2),))
    with pytest.raises(fxs.SaveError) as err:
        result.save(tmp_path / "o")
    assert err.value.full == (f"cannot write model.py for Named: module path {name!r} {why}; "
                              "fix: rename that submodule to a plain Python name and apply again")
    assert os.listdir(tmp_path) == []
