"""Children whose other methods or attributes the Python code around them reads stay modules of their class.

Where a module's forward stays Python, its children are traced one by one,
and a traced child is a GraphModule of its forward alone. RetinaNet's and
FCOS's forward call `self.head.compute_loss(...)` in train mode: after any
surgery, training failed on "'RetinaNetHead' object has no attribute
'compute_loss'" (eval, which never calls it, ran). The Python code's class is
read for `self.<child>.<name>` where `<name>` is a method or an attribute of
the child's own (not torch's `nn.Module`), and such a child stays Python, its
own children traced as before.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap

from torch import nn

# what every module, or every container, has: a ModuleDict's items() reads nothing a graph loses
_MODULE = frozenset(dir(nn.Module)) | frozenset(dir(nn.ModuleDict)) | frozenset(dir(nn.ModuleList)) | frozenset(dir(nn.Sequential))


@functools.lru_cache(maxsize=None)
def _methods(cls: type) -> dict[str, list[ast.AST]]:
    """The parsed methods and properties of `cls` and its bases but torch's, each name with every definition the
    bases give it (a `super().forward(x)` runs the base's too)."""
    found: dict[str, list[ast.AST]] = {}
    for base in cls.__mro__:
        if base is object or base.__module__.startswith("torch."):
            continue
        for name, fn in vars(base).items():
            fn = fn.fget if isinstance(fn, property) else fn
            if not inspect.isfunction(fn):
                continue
            try:
                found.setdefault(name, []).append(ast.parse(textwrap.dedent(inspect.getsource(fn))))
            except (OSError, TypeError, SyntaxError):
                continue
    return found


def _child_read(node: ast.AST) -> tuple[str, str] | None:
    """(child, name) for `self.<child>.<name>`, or `getattr(self.<child>, "<name>")`."""
    if isinstance(node, ast.Attribute):
        inner = node.value
        if isinstance(inner, ast.Attribute) and isinstance(inner.value, ast.Name) and inner.value.id == "self":
            return inner.attr, node.attr
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr" and len(node.args) >= 2:
        held, name = node.args[:2]
        if isinstance(held, ast.Attribute) and isinstance(held.value, ast.Name) and held.value.id == "self" \
                and isinstance(name, ast.Constant) and isinstance(name.value, str):
            return held.attr, name.value
    return None


@functools.lru_cache(maxsize=None)
def _reads(cls: type, entries: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(child, name) for each `self.<child>.<name>` in the methods `entries` and those they call on self, transitively
    (what runs with the model; __init__ and reset_classifier read other things of their children)."""
    methods = _methods(cls)
    found, seen, todo = [], set(), list(entries)
    while todo:
        name = todo.pop()
        if name in seen or name not in methods:
            continue
        seen.add(name)
        for node in (n for tree in methods[name] for n in ast.walk(tree)):
            read = _child_read(node)
            if read is not None:
                found.append(read)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                todo.append(node.attr)  # a method or property of its own it may call
    return tuple(dict.fromkeys(found))


def read_beyond_forward(module: nn.Module, entries: tuple[str, ...] = ()) -> dict[str, tuple[str, ...]]:
    """child name -> the methods and attributes of it (other than nn.Module's) that `module`'s forward reads, and
    the methods `entries` of it that code around it calls."""
    found: dict[str, tuple[str, ...]] = {}
    for child, name in _reads(type(module), ("forward", *entries)):
        sub = module._modules.get(child)
        if sub is None or name in _MODULE or name.startswith("__"):
            continue
        if hasattr(type(sub), name) or (name in vars(sub) and not name.startswith("_")):  # a method, property, constant
            found[child] = (*found.get(child, ()), name)
    return found
