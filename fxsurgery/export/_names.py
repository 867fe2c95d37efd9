"""What generated source may hold: escaped text, plain dotted names, and a fixed top-level structure.

Every name model.py takes from the model (its class, its submodules' classes,
the functions and methods its forward calls) is either checked to be a plain
ASCII dotted name or written as escaped text; `check_structure` then parses
the whole file and refuses anything beyond the docstring, imports, constants,
helper functions and `class Model`, before the file is ever imported.
"""

from __future__ import annotations

import ast
import keyword
import re
from typing import Any

import torch

from ..errors import SaveError

_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_HELPERS = {"_put", "_same", "mismatch", "stay_eval", "container"}
_METHODS = {"__init__", "load", "forward", "_graph", "train", "_forward_train", "_forward_eval"}  # train: STAY_EVAL
PLAIN = (bool, int, float, str, type(None))
_FORBIDDEN = {"exec", "eval", "compile", "__import__", "breakpoint", "globals", "locals", "vars", "system", "popen"}


def docstring_text(text: str) -> str:
    """`text` for inside a triple-quoted docstring: plain ASCII escapes, no quote can end it."""
    if re.fullmatch(r"[A-Za-z0-9_ .,:()-]*", text):
        return text
    return ascii(text).replace('"', "\\x22")


def is_dotted(name: object) -> bool:
    """A plain ASCII dotted name of non-keywords: `torch.nn.Linear`."""
    return isinstance(name, str) and _DOTTED.fullmatch(name) is not None and not any(keyword.iskeyword(p) for p in name.split("."))


def dotted(name: object, what: str) -> str:
    if not is_dotted(name):
        raise SaveError(f"cannot write model.py: {what} {name!r} is not a plain dotted name; fix: define it in an importable module under a Python name")
    return name


def method_name(node_name: str, target: object) -> str:
    if not (isinstance(target, str) and target.isascii() and target.isidentifier() and not keyword.iskeyword(target)):
        raise SaveError(f"cannot write model.py: node '{node_name}' calls the method {target!r}, which is not a plain name; "
                        "fix: call methods by their Python names")
    return target


def check_structure(source: str) -> None:
    """Refuse generated source with any statement outside model.py's fixed layout."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as exc:
        raise SaveError(f"cannot write model.py: the generated source does not parse ({exc}); fix: report this with the model's "
                        "class and module names") from None
    problems = []
    for stmt in tree.body[1:]:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
            continue
        if isinstance(stmt, ast.FunctionDef) and stmt.name in _HELPERS:
            continue
        if isinstance(stmt, ast.ClassDef) and stmt.name in ("InlineSequential", "InlineBlock", "PositionalModuleList"):  # as capture/_containers.py has them
            continue
        if isinstance(stmt, ast.ClassDef) and stmt.name == "Model" and all(
                (isinstance(s, ast.FunctionDef) and s.name in _METHODS)
                or (isinstance(s, ast.Assign) and (isinstance(s.value, ast.Constant) or (isinstance(s.value, ast.Tuple) and all(
                    isinstance(e, ast.Constant) for e in s.value.elts)))) for s in stmt.body):
            continue
        problems.append(f"line {stmt.lineno}")
    first = tree.body[0] if tree.body else None
    if not (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)):
        problems.insert(0, "line 1 (no docstring)")
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    problems += [f"a use of {n!r}" for n in sorted(names & _FORBIDDEN)]
    if problems:
        raise SaveError(f"cannot write model.py: the generated source has statements outside its fixed layout ({', '.join(problems[:3])}); "
                        "fix: rename the model's classes and modules to plain Python names")


def without_wraps(source: str) -> str:
    """torch.fx's code for a graph calling a wrapped function (`math.sqrt` of a size) registers it with
    `torch.fx._symbolic_trace.wrap("math_sqrt")` for re-tracing; model.py only imports it."""
    return "\n".join(line for line in source.splitlines() if not line.startswith("torch.fx._symbolic_trace.wrap("))


def literal(value: Any) -> bool:
    if isinstance(value, PLAIN):
        return not (isinstance(value, float) and value != value)
    if isinstance(value, (tuple, list)):
        return all(literal(v) for v in value)
    return isinstance(value, torch.dtype)


def render(value: Any) -> str:
    if isinstance(value, torch.dtype):
        return str(value)
    if isinstance(value, float) and value in (float("inf"), float("-inf")):
        return f"float({str(value)!r})"
    return repr(value)
