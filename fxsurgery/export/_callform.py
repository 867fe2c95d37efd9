"""model.py's forward for a graph captured in call form: the original signature, and the trees its call and output are.

The graph takes the call's tensors flattened (capture/_call_shim.py); model.py
binds a call to the original signature, checks its non-tensor arguments
against the captured ones and rebuilds the output's structure. Each tree
structure is written as torch's own serialised TreeSpec where torch can
serialise it, else (a user's NamedTuple, which torch serialises only once
registered by name) as the structure of a sample value built in Python.
"""

from __future__ import annotations

import collections
import inspect
from typing import Any

from torch.utils import _pytree as pytree

from ..capture import mismatch
from ..errors import SaveError
from ._names import docstring_text, dotted, literal, render


def spec_source(spec, what: str) -> str:
    """Source for `spec`: a TreeSpec read back from torch's serialised form, or built from a sample value."""
    try:
        return f"pytree.treespec_loads({pytree.treespec_dumps(spec)!r})"
    except NotImplementedError:  # a NamedTuple torch knows by no serialised name
        return f"pytree.tree_structure({_sample(spec, what)})"


def _sample(spec, what: str) -> str:
    """A Python expression whose tree structure is `spec`, with 0 at each leaf."""
    if spec.is_leaf():
        return "0"
    kind, children = spec.type, [_sample(c, what) for c in spec.children()]
    if kind is type(None):
        return "None"
    if kind is tuple:
        return "(" + ", ".join(children) + ("," if len(children) == 1 else "") + ")"
    if kind is list:
        return "[" + ", ".join(children) + "]"
    if kind in (dict, collections.OrderedDict) and all(literal(k) for k in spec.context):
        items = ", ".join(f"{render(k)}: {v}" for k, v in zip(spec.context, children))
        return "{" + items + "}" if kind is dict else f"collections.OrderedDict({{{items}}})"
    if isinstance(spec.context, type) and pytree.is_namedtuple_class(spec.context):  # torch's type is a marker
        return f"{_importable(spec.context, what)}({', '.join(children)})"
    raise SaveError(f"cannot write model.py: {what} holds a {kind.__name__}, which model.py cannot rebuild; "
                    "fix: return a tuple, list, dict or NamedTuple")


def _importable(cls: type, what: str) -> str:
    module, qual = cls.__module__, cls.__qualname__
    if module == "__main__" or "<" in qual:
        where = "a function" if "<" in qual else "the script being run"
        raise SaveError(f"cannot write model.py: {what} is a {cls.__name__}, defined in {where}, which model.py cannot import; "
                        "fix: define it at the top level of an importable module")
    return f"{dotted(module, f'the module of {cls.__name__}')}.{dotted(qual, f'the class of {what}')}"


def spec_modules(spec) -> set[str]:
    """Modules whose classes a tree spec names (ModelOutput and NamedTuple types must be imported to load it)."""
    found, stack = set(), [spec]
    while stack:
        node = stack.pop()
        for kind in (node.type, node.context if isinstance(node.context, type) else None):
            if kind is not None and kind.__module__ not in ("builtins", "__main__"):
                found.add(kind.__module__)
        stack.extend(node.children() if callable(getattr(type(node), "children", None)) else node.children_specs)  # the latter warns
    return found


def _literal_source(value: Any, what: str) -> str:
    if not literal(value):
        raise SaveError(f"cannot write model.py: {what} is a {type(value).__name__}, not a literal; fix: save the model traced with a plain call")
    return render(value)


def adapter_source(call, class_name: str) -> tuple[str, str, list[str]]:
    """Module constants and a forward that calls the graph as the original module was called."""
    params = []
    for p in call.signature.parameters.values():
        default = "" if p.default is p.empty else f", default={_literal_source(p.default, f'the default of {p.name}')}"
        params.append(f"    inspect.Parameter({p.name!r}, inspect.Parameter.{p.kind.name}{default}),")
    fixed = {i: v for i, v in enumerate(call.constants) if i not in call.tensors}
    fixed_src = "{" + ", ".join(f"{i}: {_literal_source(v, 'a fixed argument')}" for i, v in fixed.items()) + "}"
    prelude = (
        "# How the model is called: the graph takes the call's tensors, flattened, and the\n"
        "# other arguments are fixed to the example's (a call with other values is refused).\n"
        "SIGNATURE = inspect.Signature([\n" + "\n".join(params) + "\n])\n"
        f"CALL = {spec_source(call.in_spec, 'an argument')}\n"
        f"FIXED = {fixed_src}\n"
        f"ORDER = {list(call.order)!r}\n"
        f"OUTPUT = {spec_source(call.out_spec, 'the output')}\n\n\n"
        "def _same(a, b):\n    return a is b or (type(a) is type(b) and a == b)\n\n\n" + inspect.getsource(mismatch).strip("\n"))
    method = (
        "    @lambda f: setattr(f, '__signature__', inspect.Signature([inspect.Parameter('self', 1), *SIGNATURE.parameters.values()])) or f\n"
        "    def forward(self, *args, **kwargs):\n"
        f'        """Called as {docstring_text(class_name)} was called: its parameters, by position or keyword, with their defaults."""\n'
        "        bound = SIGNATURE.bind(*args, **kwargs)\n        bound.apply_defaults()\n"
        "        leaves, spec = pytree.tree_flatten((tuple(bound.args), dict(bound.kwargs)))\n"
        "        if spec != CALL or any(not _same(leaves[i], v) for i, v in FIXED.items()) or any(not torch.is_tensor(leaves[i]) for i in ORDER):\n"
        "            raise RuntimeError(mismatch(SIGNATURE, CALL, FIXED, args, kwargs, \"\"))\n"
        "        return pytree.tree_unflatten(list(self._graph(*[leaves[i] for i in ORDER])), OUTPUT)")
    return prelude, method, sorted(spec_modules(call.in_spec) | spec_modules(call.out_spec))
