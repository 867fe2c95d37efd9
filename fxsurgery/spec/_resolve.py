"""Dotted names in rule files resolved to classes and functions, only inside an allowlist.

A rule file names `torch.nn.GELU` or `torch.nn.functional.gelu`; the name is
walked only through modules of the allowlist and classes, and what it reaches
must be defined in an allowed package: `torch.sys.path.append` (the sys
module, reached through torch) is refused, not called.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Any

from torch import nn

from ..errors import RuleError
from ._pattern import Pattern

DEFAULT_ALLOW = ("torch", "torchvision")
# torch's and torchvision's functions that are not operations on tensors: files, downloads, compilers, processes
# and global state. A function a rule puts in the model is called on its values (the shape pass, every forward)
NOT_OPERATIONS = ("torch.hub", "torch.serialization", "torch.utils", "torch.distributed", "torch.multiprocessing", "torch.package",
                  "torch.jit", "torch.onnx", "torch.cuda", "torch.backends", "torch.random", "torch.compiler", "torch.export",
                  "torch.profiler", "torch.autograd.profiler", "torch.library", "torch.storage", "torch.overrides", "torch.fx",
                  "torchvision.io", "torchvision.datasets", "torchvision.utils", "torchvision.models", "torchvision.extension")
_STATEFUL = ("set_", "use_", "register_", "remove_", "manual_seed", "seed", "initial_seed", "compile", "save", "load", "from_file")


def defined_in(obj: Any) -> str:
    """The module that defines `obj`: its own `__module__`, or its class's for a method of a class
    (`torch.Tensor.add`); '' for anything else, such as a method bound to an object (`torch.sys.path.append`)."""
    module = getattr(obj, "__module__", None)
    if isinstance(module, str):
        return module
    owner = getattr(obj, "__objclass__", None)
    return owner.__module__ if isinstance(owner, type) and isinstance(owner.__module__, str) else ""


class Resolver:
    """Dotted names to objects, only inside the allowlist."""

    def __init__(self, source: str, allow):
        self.source = source
        self.allow = tuple(DEFAULT_ALLOW) + tuple(allow)

    def _allowed(self, dotted: str) -> bool:
        return any(dotted == a or dotted.startswith(a + ".") for a in self.allow)

    def __call__(self, dotted: Any, line: int, want: str) -> Any:
        where = f"{self.source}:{line}"
        if not isinstance(dotted, str) or not all(p.isidentifier() for p in dotted.split(".")):
            raise RuleError(f"{where}: {dotted!r} is not a dotted name; fix: write e.g. torch.nn.Linear")
        if any(p.startswith("_") for p in dotted.split(".")[1:]):
            raise RuleError(f"{where}: {dotted!r} is a private name, which rule files cannot reach; fix: use a public name, "
                            "e.g. torch.nn.functional.gelu")
        if not self._allowed(dotted):
            raise RuleError(f"{where}: {dotted!r} is outside the allowlist ({', '.join(self.allow)}); fix: use a public torch/torchvision name, or "
                            f"allow its package with --allow-module {dotted.split('.')[0]}")
        parts = dotted.split(".")
        obj, i = None, len(parts)
        while i > 0:
            try:
                obj = importlib.import_module(".".join(parts[:i]))
                break
            except ImportError:
                i -= 1
        if obj is None:
            raise RuleError(f"{where}: cannot import {parts[0]!r}; fix: install it or correct the name")
        for j, part in enumerate(parts[i:], start=i):
            if not hasattr(obj, part):
                close = difflib.get_close_matches(part, [n for n in dir(obj) if not n.startswith("_")], n=1)
                hint = f"did you mean {'.'.join(parts[:j] + close)}?" if close else "check the spelling"
                raise RuleError(f"{where}: {dotted!r} does not exist; fix: {hint}")
            # only through modules of the allowlist and classes: torch.sys is the sys module, torch.sys.path a list
            walkable = isinstance(obj, type) or (inspect.ismodule(obj) and self._allowed(obj.__name__))
            obj = getattr(obj, part) if walkable else None
            if obj is None:
                break
        if obj is None or inspect.ismodule(obj) or not self._allowed(defined_in(obj)):
            raise RuleError(f"{where}: {dotted!r} is not a class or function of an allowed package; fix: name a class or function defined in "
                            f"torch/torchvision or an allowed module")
        if want == "module" and not (isinstance(obj, type) and issubclass(obj, nn.Module)):
            raise RuleError(f"{where}: {dotted!r} is not a torch.nn.Module class; fix: name a Module class such as torch.nn.GELU")
        if want == "pattern" and not (isinstance(obj, Pattern) or (isinstance(obj, type) and issubclass(obj, Pattern))):
            raise RuleError(f"{where}: {dotted!r} is not a Pattern; fix: name a fxsurgery.Pattern subclass or a function decorated with "
                            f"@fxsurgery.pattern(...)")
        if want == "element" and not ((isinstance(obj, type) and issubclass(obj, nn.Module)) or (callable(obj) and not isinstance(obj, type))):
            raise RuleError(f"{where}: {dotted!r} is neither a Module class nor a function; fix: e.g. torch.nn.ReLU or torch.nn.functional.relu")
        if want == "function" and (isinstance(obj, type) or not callable(obj)):
            raise RuleError(f"{where}: {dotted!r} is not a function; fix: name a function such as torch.nn.functional.gelu, or use 'module:' for a class")
        home = defined_in(obj)
        if want == "function" and (any(home == m or home.startswith(m + ".") for m in NOT_OPERATIONS)
                                   or home.partition(".")[0] == "torch" and getattr(obj, "__name__", "").startswith(_STATEFUL)):
            raise RuleError(f"{where}: {dotted!r} is not an operation on tensors (it reads or writes files, processes or global "
                            "state), which a rule cannot put in a model; fix: name a function such as torch.nn.functional.gelu")
        return obj
