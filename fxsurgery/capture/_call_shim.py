"""Trace a module as it is called, not as its signature reads.

Modules inside opaque code are often called with keyword arguments their
signature collects in `**kwargs`, or have decorated forwards whose code
object torch.fx cannot read ("co_varnames is too small"). Tracing a shim
that calls the module with the recorded arguments avoids both: the graph
takes the call's tensors (flattened) as inputs, every other argument is
fixed to the recorded value, and the graph returns the flattened output.
An adapter installed as the module's forward restores the call form (the
forward's own signature: positions, keywords, defaults) and refuses, naming
the argument, a call the captured one does not cover.
"""

from __future__ import annotations

import inspect
import keyword
import operator
import types
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import PH, _assert_is_none
from torch.utils import _pytree as pytree

from ..errors import TraceError
from ._pickling import reduce

_PRIMITIVE = (type(None), bool, int, float, str, torch.dtype, torch.device)


@dataclass
class CallSpec:
    """How a graph's flat inputs and outputs map back to the module's call form."""

    in_spec: Any               # the call bound to the forward's signature, defaults filled in
    constants: list            # its leaves; the tensors among them are the graph's inputs
    tensors: list[int]         # positions of the tensor leaves
    order: list[int]           # the graph's inputs, as positions among `constants`
    call_spec: Any             # the call as it was made, which the shim repeats while tracing
    call_leaves: list
    out_spec: Any = None
    signature: Any = None      # the module's forward signature: calls are compared bound to it

    def __getstate__(self) -> dict:
        # pickled with a module (capture/_pickling.py): the example's tensors and the call as it was made
        # served tracing only, and would put the example batch into every pickle of the model
        state = dict(vars(self))
        state["constants"] = [None if isinstance(v, torch.Tensor) else v for v in self.constants]
        state["call_spec"], state["call_leaves"] = None, []
        return state

    def tensor_inputs(self) -> tuple:
        return tuple(self.constants[i] for i in self.order)

    def flatten(self, args: tuple, kwargs: dict) -> tuple[list, Any]:
        return pytree.tree_flatten(normalise(self.signature, args, kwargs))


def normalise(signature, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call as (args, kwargs) with every default filled in: `m(x)` and `m(x, mask=None)` compare equal."""
    if signature is None:
        return tuple(args), dict(kwargs)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return tuple(args), dict(kwargs)
    bound.apply_defaults()
    return tuple(bound.args), dict(bound.kwargs)


def signature_of(module: nn.Module):
    try:
        return inspect.signature(module.forward)
    except (TypeError, ValueError):
        return None


class _Shim(nn.Module):
    def __init__(self, inner: nn.Module, spec: CallSpec):
        super().__init__()
        self.inner = inner
        self.spec = spec

    def forward(self, *tensors):
        # the call exactly as it was made: decorated forwards may add keywords of their own
        leaves = list(self.spec.call_leaves)
        positions = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
        for i, t in zip(positions, tensors):
            leaves[i] = t
        args, kwargs = pytree.tree_unflatten(leaves, self.spec.call_spec)
        flat, self.spec.out_spec = pytree.tree_flatten(self.inner(*args, **kwargs))
        return flat


def call_spec(module: nn.Module, args: tuple, kwargs: dict) -> CallSpec:
    signature = signature_of(module)
    leaves, spec = pytree.tree_flatten(normalise(signature, args, kwargs))
    call_leaves, call_in_spec = pytree.tree_flatten((tuple(args), dict(kwargs)))
    for leaf in leaves:
        if not isinstance(leaf, (torch.Tensor,) + _PRIMITIVE):
            raise TraceError(f"called with a {type(leaf).__name__}, which a graph cannot take as an input")
    # Where each tensor of the call lands once bound: each is replaced by a slot of its own and the call
    # bound again. Matching the tensors themselves cannot tell apart one tensor given twice (m(x, y=x)),
    # and a later call gives two.
    slots = [_Slot(k) if isinstance(v, torch.Tensor) else v for k, v in enumerate(call_leaves)]
    bound, _ = pytree.tree_flatten(normalise(signature, *pytree.tree_unflatten(slots, call_in_spec)))
    landed = {leaf.k: i for i, leaf in enumerate(bound) if isinstance(leaf, _Slot)}
    order = [landed[k] for k, v in enumerate(call_leaves) if isinstance(v, torch.Tensor)]
    tensors = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    return CallSpec(spec, leaves, tensors, order, call_in_spec, call_leaves, signature=signature)


class _Slot:
    """A stand-in for the call's k-th leaf while the call is bound to the forward's signature."""

    __slots__ = ("k",)

    def __init__(self, k: int):
        self.k = k


def input_names(spec: CallSpec) -> list[str]:
    """Per graph input, the forward parameter it is (`input_ids`), an item of one `name_0`; [] where unsigned."""
    if spec.signature is None:
        return []
    params = list(spec.signature.parameters.values())
    star = next((i for i, p in enumerate(params) if p.kind is p.VAR_POSITIONAL), None)
    paths = [path for path, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.in_spec.num_leaves)),
                                                                                        spec.in_spec))[0]]
    names = []
    for k in spec.order:
        path = paths[k]
        head = getattr(path[1], "idx", getattr(path[1], "key", None)) if len(path) > 1 else None
        if path and getattr(path[0], "idx", None) == 0 and isinstance(head, int):  # bound positionally
            base = params[head].name if star is None or head < star else f"{params[star].name}_{head - star}"
        else:
            base = str(head)
        name = "_".join([base, *(str(getattr(p, "idx", getattr(p, "key", ""))) for p in path[2:])])
        names.append(name if name.isidentifier() and name.isascii() and not keyword.iskeyword(name) else None)
    return names


def trace_call(tracer: fx.Tracer, module: nn.Module, spec: CallSpec) -> tuple[fx.Graph, dict]:
    """The graph of `module` called as `spec` says, with paths relative to `module`,
    and the constants tracing attached to the shim (target -> tensor)."""
    shim = _Shim(module, spec)
    graph = tracer.trace(shim, concrete_args=tuple(PH for _ in spec.order))
    names = iter(input_names(spec))
    for node in [n for n in graph.nodes if n.op == "placeholder"]:  # the forward's own names, not input_0
        name = next(names, None)
        if name is not None and name != node.name:
            node._rename(name)
            node.target = node.name
    constants = {}
    for node in graph.nodes:
        if node.op == "get_attr" and not node.target.startswith("inner."):
            constants[node.target] = getattr(shim, node.target)
        elif node.op in ("call_module", "get_attr") and node.target.startswith("inner."):
            node.target = node.target[len("inner."):]
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k[len("inner."):]: (v[0][len("inner."):], v[1])
                                            for k, v in stack.items() if k.startswith("inner.")}
    return graph, constants


def mismatch_unsigned(where: str) -> str:
    return (f"'{where or 'the model'}' was captured for calls like the example's and this call differs in its "
            "non-tensor arguments; fix: capture with example inputs that call it this way")


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and a == b)


def mismatch(signature, call, fixed: dict, args: tuple, kwargs: dict, where: str) -> str:
    """Why a call (args, kwargs) is not the captured one (`call`: its tree spec, `fixed`: its non-tensor
    leaves by position): one line naming the argument and the fix.

    Self-contained (torch and pytree only): model.py carries a copy of this function.
    """
    def bound(a, k):
        call = signature.bind(*a, **k)
        call.apply_defaults()
        named = {}
        for name, value in call.arguments.items():
            kind = signature.parameters[name].kind
            if kind == kind.VAR_KEYWORD:
                named.update(value)
            else:
                named[name] = value
        return named

    absent = object()

    def shown(value):
        if value is absent:
            return "nothing"
        if isinstance(value, torch.Tensor):
            return "a tensor"
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, torch.Tensor) for v in value):
            return f"a {type(value).__name__} of {len(value)} tensor{'s' if len(value) > 1 else ''}"  # lengths differ
        if any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value)):
            return f"a {type(value).__name__} holding tensors"
        return repr(value)

    captured = pytree.tree_unflatten([fixed.get(i, torch.empty(0)) for i in range(call.num_leaves)], call)
    then, now = bound(*captured), bound(args, kwargs)
    who = f"'{where}'" if where else "the model"
    for name in list(then) + [n for n in now if n not in then]:
        old, new = then.get(name, absent), now.get(name, absent)
        old_leaves, old_spec = pytree.tree_flatten(old)
        new_leaves, new_spec = pytree.tree_flatten(new)
        if old_spec == new_spec and all(isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                                        or a is b or (type(a) is type(b) and a == b) for a, b in zip(old_leaves, new_leaves)):
            continue
        if where:
            fix = "capture with example inputs that make the model call it this way"
        elif (new is None or new is absent) and any(isinstance(v, torch.Tensor) for v in old_leaves):
            fix = f"give {name} as at capture, or capture without it"
        elif new is None or new is absent:
            fix = f"pass {name}={old!r} as at capture, or capture without it"
        elif any(isinstance(v, torch.Tensor) for v in new_leaves):
            fix = f"capture with {name} given, e.g. example_kwargs={{'{name}': ...}} (--input {name}=SHAPE:DTYPE)"
        else:
            fix = f"capture with example_kwargs={{'{name}': {new!r}}}"
        return f"{who} was captured with {name}={shown(old)} and this call gives {name}={shown(new)}; fix: {fix}"
    return f"{who} was captured for calls like the example's; fix: capture with example inputs that call it this way"


# The adapter's call form travels with the GraphModule (deep copies included);
# the export stage reads it through `adapter_call`, never by attribute name.
_CALL_ATTR = "_fxsurgery_call"


class _Adapter:
    """Makes a graph module callable as the module it stands for; re-applied to deep copies
    (torch.fx rebuilds a GraphModule when copying it and keeps no instance attributes)."""

    installs = ("forward", _CALL_ATTR)  # left out of a pickle, put back by applying the adapter again

    def __init__(self, spec: CallSpec, where: str, attributes: dict):
        self.spec, self.where, self.attributes = spec, where, attributes

    def __call__(self, gm: fx.GraphModule) -> None:
        spec, where = self.spec, self.where
        graph_forward = type(gm).forward
        fixed = [i for i in range(len(spec.constants)) if i not in spec.tensors]

        def forward(self, *args, **kwargs):
            leaves, got = spec.flatten(args, kwargs)
            if (got != spec.in_spec or any(not _same(leaves[i], spec.constants[i]) for i in fixed)
                    or any(not isinstance(leaves[i], torch.Tensor) for i in spec.tensors)):
                if spec.signature is None:
                    raise RuntimeError(mismatch_unsigned(where))
                spec.signature.bind(*args, **kwargs)  # a call the forward itself refuses: Python's own TypeError
                raise RuntimeError(mismatch(spec.signature, spec.in_spec, {i: spec.constants[i] for i in fixed},
                                            args, kwargs, where))
            flat = graph_forward(self, *[leaves[i] for i in spec.order])
            return pytree.tree_unflatten(list(flat), spec.out_spec)

        if spec.signature is not None:  # help() and inspect show the original's parameters
            own = inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)
            forward.__signature__ = spec.signature.replace(parameters=[own, *spec.signature.parameters.values()])
        gm.forward = types.MethodType(forward, gm)
        type(gm).__reduce__ = reduce  # torch.fx makes a class per instance: this one's pickling keeps the adapter
        setattr(gm, _CALL_ATTR, spec)
        for name, value in self.attributes.items():
            setattr(gm, name, value)
        if self not in gm._deepcopy_hooks:
            gm._deepcopy_hooks.append(self)


def adapter_call(gm: nn.Module) -> CallSpec | None:
    """The call form an adapter installed on `gm` restores, or None for a plain graph."""
    return getattr(gm, _CALL_ATTR, None)


def install_adapter(gm: fx.GraphModule, spec: CallSpec, where: str, attributes: dict | None = None) -> None:
    """Make `gm` callable as the original module was: same arguments, same output structure,
    and the plain attributes opaque callers read from it."""
    _Adapter(spec, where, dict(attributes or {}))(gm)


def keep_parameter_names(graph: fx.Graph, concrete: dict, path: str) -> None:
    """Give fixed arguments their own names back, and their guards a message that says how to capture;
    an argument given a tensor at capture becomes required.

    torch.fx names the placeholder of a fixed argument `flag_1` (so `m(x, flag=True)`
    would be refused) and guards it with "flag has been specialized to have value
    True but got another value".
    """
    taken = {n.target for n in graph.nodes if n.op == "placeholder"}
    fixed = {n.target for n in graph.nodes if n.op == "placeholder"
             and any(n.target.startswith(f"{name}_") and n.target[len(name) + 1:].isdigit() for name in concrete)}
    for node in graph.nodes:
        if node.op == "placeholder" and node.target not in fixed and node.args and not isinstance(node.args[0], float):
            # given a tensor at capture: the default (often None) is not the graph's to take; a float's
            # default is (a float input stays an input of the graph, _trace.py)
            node.args = ()
    who = f"'{path}'" if path else "the model"  # as the adapter says it; a saved model.py is re-traced under another class name
    messages = {}
    for name, value in concrete.items():
        if isinstance(value, (tuple, list, dict)):
            continue  # one placeholder per leaf: no single name to give back
        placeholder = next((n for n in graph.nodes if n.op == "placeholder" and n.target == f"{name}_1"), None)
        if placeholder is not None and name not in taken:
            placeholder.target = name
        if value is None:
            fix = f"capture with {name} given, e.g. example_kwargs={{'{name}': ...}} (--input {name}=SHAPE:DTYPE)"
        else:
            fix = f"capture with {name} set as you will call it, e.g. example_kwargs={{'{name}': ...}}"
        messages[f"{name} has been specialized to have value {value} but got another value"] = (
            f"{who} was captured with {name}={value!r} and this call gives another {name}; fix: {fix}")
    for node in list(graph.nodes):
        if node.op != "call_function" or len(node.args) != 2 or not isinstance(node.args[1], str) or node.args[1] not in messages:
            continue
        node.args = (node.args[0], messages[node.args[1]])
        if node.target is _assert_is_none:
            # torch.fx's guard has no side effect to dead-code elimination (a tensor given there would be
            # silently ignored) and model.py cannot call it: the same check with torch._assert
            with graph.inserting_before(node):
                check = graph.call_function(operator.is_, (node.args[0], None))
            node.target, node.args = torch._assert, (check, node.args[1])
