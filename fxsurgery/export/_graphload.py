"""Rebuild a module from graph.json against an allowlist: no code from the directory runs.

Functions resolve only inside torch's operator namespaces, `operator`, `math`
and a few builtins; methods are tensor method names; module classes come
from torch.nn, torchvision and the packages the caller allows. Everything
else in the file is data: checked for type, and refused with the entry named.
"""

from __future__ import annotations

import builtins
import collections
import importlib
import json
import keyword
import math
import operator
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional
from torch import fx, nn
from torch.fx._symbolic_trace import _wrapped_fns_to_patch
from torch.utils import _pytree as pytree

from .._util import BuildBudget as _Budget
from ..errors import SaveError
from ._composites import is_nested
from ._graphdata import GRAPH

OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
MODULE_PACKAGES = ("torch.nn", "torchvision")
# libraries whose output types torch reads once a module of theirs, imported lazily, registered them: their
# import by the user is their consent (any other package, os or unittest imported by someone, needs allow=)
_OUTPUT_LIBRARIES = {"transformers": re.compile(r"transformers\.(modeling_outputs|models\.\w+\.modeling_\w+)")}
_OPERATOR = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "neg", "pos", "abs", "invert", "and_", "or_",
             "xor", "lshift", "rshift", "eq", "ne", "lt", "le", "gt", "ge", "getitem", "setitem", "not_", "is_", "is_not",
             "contains", "truth", "index", "iadd", "isub", "imul", "itruediv", "ifloordiv", "imod", "ipow", "imatmul", "iand",
             "ior", "ixor", "ilshift", "irshift"}
_BUILTINS = {"getattr", "len", "int", "float", "bool", "tuple", "list", "slice", "range", "min", "max", "abs", "round", "sum", "all", "any"}
# Kernels that trust their arguments about memory: a sparse tensor's indices are not checked (to_dense() then
# writes out of bounds; a converted one's indices() is an alias a graph could fill), nor is a storage resized
# under the tensors that view it. No graph makes a sparse tensor or reaches a storage; reading the layout is safe.
_UNCHECKED = {n for n in {*dir(torch.Tensor), *dir(torch._C._VariableFunctions)} if ("sparse" in n or "storage" in n)
              and not n.startswith(("is_sparse", "_")) and n not in ("sparse_dim", "storage_offset")} | {
    "indices", "crow_indices", "col_indices", "ccol_indices", "row_indices"}
_TORCH_DENIED = {"load", "save", "from_file", "compile", "manual_seed", "seed", "set_num_threads", "set_num_interop_threads"} | _UNCHECKED
# `numpy` leaves torch for an object whose methods no allowlist covers (`ndarray.tofile` writes a file)
_METHODS_DENIED = {"apply_", "map_", "map2_", "register_hook", "register_post_accumulate_grad_hook", "set_", "share_memory_",
                   "numpy"} | _UNCHECKED
# functions of the allowed namespaces that are not operations: dispatch helpers and imports
_FOREIGN = ("torch.overrides", "torch._jit_internal", "torch._C", "typing")
# Values a graph reaches: getattr may read their data (`x.shape`, `out.logits`), never a method or other
# callable, which the graph could then call (`max(..., key=...)`): the names of every callable attribute
_CALLABLE_NAMES = frozenset(n for kind in (torch.Tensor, torch.UntypedStorage, torch.TypedStorage, torch.Size, nn.Module,
                                            list, tuple, dict, str, bytes, int, float, complex, object)
                            for n in dir(kind) if callable(getattr(kind, n, None))) | {"grad_fn"}
# ...except the fields of torch's result tuples (`h.max(dim=1).values`, `topk(...).indices`): data there, and on
# a tensor or a dict the same names are tensor and container methods, which compute and call nothing else
_CALLABLE_NAMES -= {n for kind in torch.return_types.all_return_types for n in getattr(kind, "__match_args__", ())}
_CONTAINER_METHODS = {"items", "keys", "values", "get"}
_NAMESPACES = {
    "torch": torch, "torch.functional": torch.functional, "torch.nn.functional": torch.nn.functional,
    "torch.fft": torch.fft, "torch.linalg": torch.linalg, "torch.special": torch.special,
    "torch._C._nn": torch._C._nn, "torch._C._fft": torch._C._fft, "torch._C._linalg": torch._C._linalg,
    "torch._C._special": torch._C._special, "math": math, "operator": operator,
}
ALLOWED = ("torch, torch.nn.functional, torch.fft, torch.linalg, torch.special, operator, math, collections.OrderedDict, "
           "the torch.fx leaf functions of torchvision and of allowed packages, and builtins " + ", ".join(sorted(_BUILTINS)))
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PART = re.compile(r"[A-Za-z0-9_]+")
FIX = "fix: write the directory again with save(), or read model.py and load with trust_code=True (--trust-code) if you trust it"


class Bad(Exception):
    """A malformed entry; the loader adds the file and the entry."""


def identifier(name: Any) -> bool:
    """A plain ASCII name that Python code can hold as a variable or keyword (not a keyword itself)."""
    return isinstance(name, str) and _IDENT.fullmatch(name) is not None and not keyword.iskeyword(name)


def function(name: Any, allow: tuple[str, ...] = ()) -> Any:
    """The callable a call_function target names, if the allowlist holds it: torch's operations, and the
    functions torchvision or an allowed package (`allow`) declares torch.fx leaves."""
    if not isinstance(name, str):
        raise Bad(f"target is a {type(name).__name__}, not a name")
    space, _, attr = name.rpartition(".")
    refused = Bad(f"target {name!r} is not allowed (allowed: {ALLOWED})")
    if name == "collections.OrderedDict":  # the one container type torch.fx keeps as a node (capture/_tracer.py)
        return collections.OrderedDict
    if space == "builtins":
        if attr not in _BUILTINS:
            raise refused
        return getattr(builtins, attr)
    if space not in _NAMESPACES and identifier(space.split(".")[0]) and (space.startswith("torchvision.") or space.split(".")[0] in allow):
        value = _declared_leaf(space, attr)
        if value is None:
            raise refused
        return value
    module = _NAMESPACES.get(space)
    top = space.split(".")[0]
    if module is None and top not in allow and _is_leaf(sys.modules.get(space), attr):  # a package's own (timm's), imported
        raise Bad(f"target {name!r} is of {top}, not allowed; pass allow=({top!r},) (--allow-module {top}) if you trust it")
    if module is None or not identifier(attr) or (attr.startswith("_") and name != "torch._assert"):
        raise refused
    if space == "operator" and attr not in _OPERATOR:
        raise refused
    if space == "torch" and name != "torch._assert" and (attr in _TORCH_DENIED or not hasattr(torch._C._VariableFunctions, attr)):
        raise refused
    value = getattr(module, attr, None)
    if value is None or not callable(value) or isinstance(value, type) or getattr(value, "__module__", None) in _FOREIGN:
        raise refused
    return value


def _declared_leaf(space: str, attr: str) -> Any:
    """A function its package declares a torch.fx leaf (`torch.fx.wrap`: torchvision's stochastic_depth and Swin's
    attention, timm's resample_abs_pos_embed), which a graph calls as one node; looked up among the modules that
    importing the package loaded (torchvision always; another package only when allowed), nothing more."""
    top = space.split(".")[0]
    try:
        importlib.import_module(top)  # where it registers them; allowed, as for its module classes
    except ImportError:
        return None
    module = sys.modules.get(space)
    return vars(module).get(attr) if _is_leaf(module, attr) else None


def _is_leaf(module: Any, attr: str) -> bool:
    """`module.attr` is registered with torch.fx.wrap: a function its package declares a torch.fx leaf."""
    return module is not None and identifier(attr) and (id(vars(module)), attr) in _wrapped_fns_to_patch


def attribute(args: tuple, kwargs: dict) -> None:
    """A getattr call reads a public data attribute by a literal name."""
    name = args[1] if len(args) == 2 and not kwargs else None
    if not (identifier(name) and not name.startswith("_")):
        raise Bad("getattr reads an attribute that is not a plain public name")
    if name in _CALLABLE_NAMES:
        raise Bad(f"getattr reads {name!r}, a method, which the graph could call; a graph reads data attributes only")


_PYTHON = {"operator", "_operator", "math", "builtins"}


def checked_call(target: Any, args: tuple, kwargs: dict) -> None:
    """Refuse the Python calls a traced graph never holds and a hostile one uses to compute for ever.

    Builtins that call what they are given (min/max key=) take no graph value to
    call. A Python function (operator, math, builtins) on literals alone: tracing
    evaluated such code and kept its value, so a node like 10 ** 10**8 or
    math.factorial(10**8) is no model's (it kept `fxsurgery inspect` computing);
    refusing each node whose inputs are all literals refuses their chains too.
    (A power of a size by a literal is a model's, `x.size(0) ** 2`, or a tensor's:
    left alone, as running a graph is not sandboxed, only loading it.)
    """
    if target in (min, max) and "key" in kwargs:
        raise Bad(f"{target.__name__}(..., key=...) calls a graph value; a graph compares values only")
    if getattr(target, "__module__", None) in _PYTHON and target is not collections.OrderedDict \
            and not any(isinstance(v, fx.Node) for v in pytree.tree_leaves((args, kwargs))):
        raise Bad(f"{getattr(target, '__name__', target)} on literals alone, which tracing evaluates; a graph computes on its inputs")


def method(name: Any) -> str:
    if name in _UNCHECKED:
        raise Bad(f"method {name!r} reaches memory that torch does not check (sparse indices, storages)")
    if not (identifier(name) and not name.startswith("_") and name not in _METHODS_DENIED
            and (hasattr(torch.Tensor, name) or name in _CONTAINER_METHODS)):
        raise Bad(f"method {name!r} is not a tensor method")
    return name


def path(value: Any) -> str:
    parts = value.split(".") if isinstance(value, str) else [None]
    if not all(isinstance(p, str) and _PART.fullmatch(p) and not keyword.iskeyword(p) and not hasattr(nn.Module, p) for p in parts):
        raise Bad(f"path {value!r} is not a dotted path of plain names")
    return value


def decode(value: Any, env: dict[str, fx.Node], depth: int = 0) -> Any:
    """A JSON argument back to its Python value; `{"node": name}` only for names in `env`."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > 100:  # Python's recursion ends near 1000: a model's arguments nest a few levels
        raise Bad("nests values more than 100 levels deep")
    if isinstance(value, list):
        return [decode(v, env, depth + 1) for v in value]
    if not (isinstance(value, dict) and len(value) == 1):
        raise Bad(f"holds a {type(value).__name__} that is not a tagged value")
    (tag, x), = value.items()
    if tag == "node":
        if not isinstance(x, str) or x not in env:
            raise Bad(f"refers to node {x!r}, which no earlier node defines")
        return env[x]
    if tag in ("tuple", "size", "slice", "dict") and not isinstance(x, list):
        raise Bad(f"{tag} is a {type(x).__name__}, not a list")
    if tag == "tuple":
        return tuple(decode(v, env, depth + 1) for v in x)
    if tag == "size" and all(type(v) is int for v in x):
        return torch.Size(x)
    if tag == "slice" and len(x) == 3:
        return slice(*(decode(v, env, depth + 1) for v in x))
    if tag == "dict" and all(isinstance(kv, list) and len(kv) == 2 and isinstance(kv[0], (str, int)) for kv in x):
        return {k: decode(v, env, depth + 1) for k, v in x}
    if tag == "ellipsis" and x is None:
        return Ellipsis
    if tag == "float" and x in ("inf", "-inf", "nan"):
        return float(x)
    if tag == "device" and isinstance(x, str) and re.fullmatch(r"[a-z]+(:\d+)?", x):
        return torch.device(x)
    if tag in ("dtype", "memory_format", "layout") and identifier(x) and isinstance(getattr(torch, x, None), getattr(torch, tag)) \
            and (tag != "layout" or x == "strided"):  # a sparse layout (torch.zeros(..., layout=torch.sparse_coo)): see _UNCHECKED
        return getattr(torch, x)
    raise Bad(f"holds a malformed {tag!r} value")


def module_class(name: Any, allow: tuple[str, ...]) -> type:
    packages = MODULE_PACKAGES + tuple(allow)
    if not (isinstance(name, str) and all(identifier(p) for p in name.split("."))):
        raise Bad(f"module class {name!r} is not a dotted name")
    if not any(name.startswith(p + ".") for p in packages):
        raise Bad(f"module class {name!r} is outside the allowed packages ({', '.join(packages)}); pass allow=({name.split('.')[0]!r},) "
                  f"(--allow-module {name.split('.')[0]}) if you trust it")
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            found = getattr(found, attr, None)
        home = getattr(found, "__module__", "") or ""
        if isinstance(found, type) and issubclass(found, nn.Module) and any(home == p or home.startswith(p + ".") for p in packages):
            return found  # defined in an allowed package, not only reached through one (torchvision.torch.fx...)
        break
    raise Bad(f"module class {name!r} does not name a torch.nn.Module class defined in {', '.join(packages)}")


def tree_structure(text: Any) -> pytree.TreeSpec:
    """torch's tree-structure format, read with nothing imported: torch's reader imports whatever module an
    "__enum__" context names (any installed module, a directory's own model.py too), so one is refused first."""
    try:
        doc = json.loads(text) if isinstance(text, str) else None
    except (ValueError, RecursionError):
        doc = None
    stack = [doc[1]] if isinstance(doc, list) and len(doc) == 2 else None
    if stack is None:
        raise Bad("holds a tree structure that is not [protocol, structure] JSON")
    while stack:
        node = stack.pop()
        if not (isinstance(node, dict) and set(node) == {"type", "context", "children_spec"} and isinstance(node["children_spec"], list)):
            raise Bad("holds a malformed tree structure")
        if node["type"] == "collections.defaultdict":  # torch's reader imports its factory's module and calls it on a missing key
            context = node["context"] if isinstance(node["context"], dict) else {}
            if context.get("default_factory_module") != "builtins" or context.get("default_factory_name") not in _FACTORIES:
                raise Bad("holds a defaultdict of a factory torch would import")
        elif node["context"] is not None and not isinstance(node["context"], str):
            raise Bad(f"holds a {node['type']} node whose context torch reads by code of its own")
        try:
            context = json.loads(node["context"]) if isinstance(node["context"], str) else None
        except (ValueError, RecursionError):
            context = None  # not JSON: torch's reader refuses it, or a registered type reads it in its own way
        if _enum_in(context):
            raise Bad("holds an enum in a tree structure, which torch would import a module to read")
        stack.extend(node["children_spec"])
    return pytree.treespec_loads(text)


_FACTORIES = {"dict", "list", "set", "tuple", "int", "float", "str", "bool"}


def _enum_in(value: Any) -> bool:
    stack = [value]
    while stack:
        value = stack.pop()
        if isinstance(value, dict):
            if "__enum__" in value:
                return True
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return False


def output_type_home(name: str, allow: tuple[str, ...], imported: set[str]) -> str:
    """Import the module that defines an output type a tree structure names (transformers' CausalLMOutput...): pytree
    reads such a type once that module registered it, and a library imports its modules lazily. Only from a package
    the caller imported or allowed: loading a graph.json runs no module the user did not choose."""
    home, _, _ = name.rpartition(".")
    top = home.split(".")[0]
    if not (home and all(identifier(p) and not p.startswith("_") for p in home.split("."))):
        raise Bad("names no module a library defines a type in; fix: write the directory again with save()")
    if top not in allow and top not in _OUTPUT_LIBRARIES:
        raise Bad(f"is read once its library is imported; fix: pass --allow-module {top} (allow=({top!r},)) if you trust it")
    if top not in allow and top not in sys.modules:
        raise Bad(f"is read once its library is imported; fix: import {top} first, or pass --allow-module {top} (allow=({top!r},))")
    if top not in allow and not _OUTPUT_LIBRARIES[top].fullmatch(home):  # not a module of scripts or tests
        raise Bad(f"is not in a module {top} defines output types in; fix: pass --allow-module {top} (allow=({top!r},)) if you trust it")
    if home in imported:
        raise Bad(f"is not registered with torch's pytree by importing {home}; fix: register it before loading")
    try:
        importlib.import_module(home)
    except Exception as exc:
        raise Bad(f"cannot be read: importing {home} fails ({type(exc).__name__}: {exc}); fix: install the library that defines it") from None
    return home


class BuildBudget(_Budget):
    """At most `limit` modules, parameters and buffers registered while a graph.json is built (_util.BuildBudget)."""

    def __init__(self, limit: int):
        super().__init__(limit, lambda text: Bad(f"{text}, more than its entries declare"))


# a layer count a load builds (RNN num_layers, nn.Transformer num_encoder_layers): the deepest models have ~100
_LAYERS = re.compile(r"num_\w*layers")
MAX_LAYERS = 1024
MAX_COPIED = 100_000  # modules and tensors a layer argument's copies make (a 1024-layer encoder of 40 each: 41k)


def build_module(spec: Any, allow: tuple[str, ...], depth: int = 0) -> nn.Module:
    if not isinstance(spec, dict) or set(spec) not in ({"class", "kwargs"}, {"class", "items"}):
        raise Bad("module is not {class, kwargs} or {class, items}")
    if depth > 8:  # a Sequential in a Transformer's layer goes 3 deep
        raise Bad("modules nest more than 8 levels deep")
    cls = module_class(spec["class"], allow)
    if "items" in spec:
        if cls is not nn.Sequential or not isinstance(spec["items"], list):
            raise Bad("items are for a torch.nn.Sequential only")
        return nn.Sequential(*(build_module(s, allow, depth + 1) for s in spec["items"]))
    kwargs = spec["kwargs"]
    if not isinstance(kwargs, dict) or not all(identifier(k) and not k.startswith("_") for k in kwargs):
        raise Bad("module kwargs are not a mapping of plain argument names")
    placed = sorted(set(kwargs) & {"device", "dtype"})
    if placed:  # save() never writes them: device= would build real tensors past the meta device the load builds on
        raise Bad(f"module kwargs name {' and '.join(placed)}, which save() never writes")
    try:
        # a layer given as an argument (nn.TransformerEncoder's encoder_layer) is a module entry of its own
        values = {k: build_module(v["module"], allow, depth + 1) if is_nested(v) else decode(v, {}) for k, v in kwargs.items()}
        deep = next((k for k, v in values.items() if _LAYERS.fullmatch(k) and type(v) is int and v > MAX_LAYERS), None)
        if deep is not None:  # on the meta device too, each layer costs Python work (nn.Transformer deep-copies them)
            raise Bad(f"{spec['class']}({deep}={values[deep]}) declares more than {MAX_LAYERS} layers")
        # a layer given as an argument is deep-copied per layer, past the registrations the build budget counts
        copies = max([v for k, v in values.items() if _LAYERS.fullmatch(k) and type(v) is int] or [1])
        made = sum(copies * sum(1 for _ in (*v.modules(), *v.parameters(), *v.buffers())) for v in values.values() if isinstance(v, nn.Module))
        if made > MAX_COPIED:
            raise Bad(f"{spec['class']}(...) would copy its layer argument into {made} modules and tensors, more than {MAX_COPIED}")
        return cls(**values)
    except Bad:
        raise
    except Exception as exc:
        raise Bad(f"{spec['class']}(...) fails: {type(exc).__name__}: {exc}") from None


def entry_error(directory: Path, what: str, exc: Exception) -> SaveError:
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)  # a KeyError's str() quotes its text
    return SaveError(f"{directory / GRAPH}: {what}: {text.splitlines()[0] if text else type(exc).__name__}; {FIX}")
