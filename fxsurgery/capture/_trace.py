"""Capture a model's forward as a torch.fx graph, with provenance and shapes.

torch.fx records, for every node, the stack of module calls it was made in
(`node.meta["nn_module_stack"]`, keyed `path` or `path@k` for the k-th extra
call of a module). That stack is the provenance the rest of the pipeline uses:
a module invocation is the set of nodes whose stack holds its key.
"""

from __future__ import annotations

import inspect
import keyword
import os
import traceback
import unicodedata
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.fx._lazy_graph_module import _LazyGraphModule
from torch.utils import _pytree as pytree

from .._util import first_line, get_path
from ..errors import ModelError, TraceError
from ._call_shim import CallSpec, keep_parameter_names, trace_call
from ._copying import share
from ._guards import Decision, add_decision_guards, probe, unique
from ._incremental import ShapeState
from ._shapes import Meta, PropagationError, propagate
from ._tracer import Tracer
from ._values import ValueTracer, add_shape_guards, live_messages


@dataclass
class Captured:
    """The traced original: its graph, the module it runs on, and shapes."""

    model: nn.Module
    gm: fx.GraphModule
    example_inputs: tuple | None
    shapes: dict[str, Meta] = field(default_factory=dict)
    leaf_types: tuple = ()
    leaf_paths: tuple = ()
    path: str = ""                                       # where this graph's module sits in the model
    opaque: dict[str, str] = field(default_factory=dict)  # leaves kept as Python -> why (relative paths)
    call: CallSpec | None = None                         # traced as called from opaque code (_call_shim.py)
    decisions: list[Decision] = field(default_factory=list)  # where Python took a number; each guarded (_guards.py)
    dynamic: str | None = "auto"                         # "auto": guards on decisions; None: on whole input shapes
    static: dict = field(default_factory=dict)           # input -> {dim: why}: dims a dynamic_shapes spec left static
    traced_at: tuple | None = None                       # inputs traced on, where not example_inputs (_guards.py)
    shape_state: ShapeState | None = field(default=None, repr=False)  # the shape pass, kept for later passes

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def input_names(self) -> list[str]:
        return [n.name for n in self.graph.nodes if n.op == "placeholder"]


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(invocation key, module path) pairs from the root outwards."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, value[0]) for key, value in stack.items()]


class _Traced(_LazyGraphModule):
    """torch.fx's _LazyGraphModule (its code made when first run or read) that torch.jit.script compiles
    as a GraphModule: the code is made first, and the lazy `code` property is left out (save() scripts
    a kept-class model's trace for the torchscript format)."""

    __jit_unused_properties__ = [*fx.GraphModule.__jit_unused_properties__, "code"]

    def __prepare_scriptable__(self):
        self.real_recompile()
        return self


def trace(model: nn.Module, example_inputs: tuple | None = None, example_kwargs: dict | None = None, *, leaf_types=(), leaf_paths=(),
          opaque=(), path: str = "", call: CallSpec | None = None, values: bool = True,
          dynamic: str | None = "auto", shapes: bool = True) -> Captured:
    """Trace `model` (never modified) as one graph; with example inputs, give every node a shape.

    Arguments that are not tensors (None, flags, sizes) are specialised to
    the values of the example call, or to their defaults: torch.fx would
    otherwise take `if mask is not None` as true for every call. The graph
    keeps torch.fx's guards, so a call with other values fails loudly.
    Raises TraceError (with `.failed_in`, the innermost module that failed).
    `values=False` traces with plain torch.fx proxies: faster, and enough for most models.
    Where Python needs a number, the example's is used and the graph asserts that decision
    (`dynamic="auto"`) or the whole example shape of every input (`dynamic=None`).
    `shapes=False` skips shape propagation, for callers that only compare graphs.
    """
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}; fix: pass the model instance")
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    _refuse_dotted_names(model)
    if example_inputs is not None and not isinstance(example_inputs, (tuple, list)):
        raise ModelError(f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}; fix: pass (torch.randn(1, 3, 224, 224),)")
    concrete, positional = {}, None
    if call is not None:
        positional = call.tensor_inputs()
    else:
        concrete, positional = specialise(model, tuple(example_inputs or ()), dict(example_kwargs or {}),
                                          complete=example_inputs is not None or bool(example_kwargs))
        example_inputs = positional if example_kwargs else example_inputs
    known = example_inputs is not None or call is not None
    work = share(model)  # traced in place of the model: forward code may write to `self`
    options = dict(leaf_types=leaf_types, leaf_paths=leaf_paths, opaque=opaque, prefix="inner." if call else "")
    # with example values, Python that reads shapes can be followed (_values.py); that costs
    # a fake run per node, so callers first try without (`values=False`)
    tracer = ValueTracer(example=positional, **options) if known and values else Tracer(**options)
    try:
        constants = {}
        if call is not None:  # traced as it was called (see _call_shim.py)
            graph, constants = trace_call(tracer, work, call)
        else:
            graph = tracer.trace(work, concrete_args=concrete or None)
            keep_parameter_names(graph, concrete, path)
        decisions = unique(getattr(tracer, "decisions", []))
        if decisions and dynamic is None:
            add_shape_guards(graph, positional, path)
        elif decisions:
            add_decision_guards(graph, decisions, path)
    except ModelError:
        raise
    except Exception as exc:
        where = f"module '{tracer.failed_in}'" if tracer.failed_in else f"{type(model).__name__}.forward"
        reason = (first_line(exc, type(exc).__name__)) + _origin(exc)
        fix = f"leaf_paths=['{tracer.failed_in}'] (--leaf {tracer.failed_in})" if tracer.failed_in else "make the untraceable part a leaf module"
        raise TraceError(f"cannot trace {where}: {type(exc).__name__}: {reason}; fix: {fix}",
                         failed_in=tracer.failed_in, reason=f"{type(exc).__name__}: {reason}") from None
    _refuse_unquotable(graph)
    root = work
    if constants:  # tensors made while tracing live beside the module's own attributes
        targets = {n.target for n in graph.nodes if n.op in ("call_module", "get_attr")}
        root = {t: constants[t] if t in constants else get_path(work, t) for t in targets}
    # its code is made when first run or read: most captures never run it; made by its class, not under
    # torch's _use_lazy_graph_module, a process-wide flag another thread may be setting meanwhile
    gm = _Traced(root, graph, class_name=type(model).__name__)
    captured = Captured(model, gm, None, {}, tuple(leaf_types), tuple(leaf_paths), path, {p: "" for p in opaque}, call,
                        decisions, dynamic)
    if example_inputs is not None or call is not None:
        captured.example_inputs = positional
    if (example_inputs is not None or call is not None) and shapes:
        try:
            captured.shape_state = ShapeState()
            captured.shapes = propagate(gm, graph, positional, captured.shape_state)
        except PropagationError as err:
            # The graph does not replay the example call (the model itself may still run:
            # capture() then finds out by running it).
            reason = f"{type(err.exc).__name__}: {first_line(err.exc)}"
            raise TraceError(f"the graph traced from {type(model).__name__} fails on the example inputs at node '{err.node.name}': {reason}; fix: "
                             f"pass inputs the model accepts, or make the failing module a leaf", reason=reason) from None
        if decisions and dynamic is not None:
            probe(gm, graph, positional, decisions, path)
            gm.recompile()
    if live_messages(graph, captured.shapes):
        gm.recompile()
    return captured


def _has_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value))


def specialise(model: nn.Module, args: tuple, kwargs: dict, complete: bool) -> tuple[dict, tuple]:
    """(concrete_args for torch.fx, the example call as one value per forward parameter).

    Tensors stay inputs; every other value of the call, and every default the
    call leaves out, is fixed. With `complete`, the call must cover every
    parameter without a default.
    """
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}, tuple(args)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        if complete and kwargs:
            raise TraceError(f"cannot trace {type(model).__name__}.forward: it takes *args/**kwargs; fix: make it a leaf")
        return {}, tuple(args)  # torch.fx decides; positional inputs are all we know
    try:
        bound, problem = inspect.signature(model.forward).bind_partial(*args, **kwargs), ""
    except TypeError as exc:
        bound, problem = _per_parameter(params, args, kwargs), str(exc)  # a captured call handed back?
    if bound is None:
        names = ", ".join(p.name for p in params)
        raise ModelError(f"example inputs do not fit {type(model).__name__}.forward({names}): {problem}; fix: pass one input per argument") from None
    concrete, positional = {}, []
    for p in params:
        value = bound.arguments.get(p.name, p.default)
        if value is p.empty:
            if complete:
                raise ModelError(f"example inputs leave out '{p.name}' of {type(model).__name__}.forward; fix: pass one input per argument")
            positional.append(None)
            continue
        positional.append(value)
        if not _has_tensor(value) and not _is_number_input(value, p):
            concrete[p.name] = value
    return concrete, tuple(positional)


def _is_number_input(value: Any, param: inspect.Parameter) -> bool:
    """A float (a scale, a temperature) stays an input of the graph: the call decides it, not the example.

    An int or a flag stays fixed: such values pick branches, sizes and loop counts far more often
    than they scale a tensor, and the graph guards them with a message naming the argument.
    """
    return isinstance(value, float) and param.kind is not param.VAR_KEYWORD

def _per_parameter(params: list, args: tuple, kwargs: dict):
    """`args` as one value per parameter in order (what trace keeps as a graph's example inputs,
    keyword-only ones included), or None when they are not that."""
    if kwargs or len(args) > len(params):
        return None
    return inspect.BoundArguments(inspect.Signature(params), dict(zip((p.name for p in params), args)))


def _refuse_dotted_names(model: nn.Module) -> None:
    """A submodule name holding a dot reads as a path to another module everywhere a path is used."""
    for module in model.modules():
        for name in module._modules:
            if not isinstance(name, str) or "." in name:
                raise TraceError(f"module name {name!r} in {type(module).__name__} contains a dot, which reads as a path to another module; "
                                 "fix: rename that submodule")


def _refuse_unquotable(graph: fx.Graph) -> None:
    """Refuse module paths torch.fx would turn into wrong code.

    torch.fx pastes a path into its generated code: a part that reads as an
    identifier goes in bare (`self.import` does not parse; `self.ﬁ` is read by
    Python as `self.fi`, another attribute), and any other part goes inside
    double quotes unescaped (a quote in the name would run as code).
    """
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr"):
            continue
        for part in node.target.split("."):
            if part.isascii() and (part.isdigit() or (part.isidentifier() and not keyword.iskeyword(part))):
                continue  # nearly every part: quoted safely, or bare and read back as written
            if any(c in part for c in '"\\\n\r'):
                why = "contains a quote, backslash or line break, which torch.fx would write into generated code unescaped"
            elif "\x00" in part or any("\ud800" <= c <= "\udfff" for c in part):
                why = "contains a NUL or a lone surrogate, which Python source cannot hold"
            elif part.isidentifier() and keyword.iskeyword(part):
                why = f"has the Python keyword '{part}' as a name, which torch.fx would write as code that does not parse"
            elif part.isidentifier() and unicodedata.normalize("NFKC", part) != part:
                why = f"has '{part}', which Python reads as '{unicodedata.normalize('NFKC', part)}' in code torch.fx writes"
            else:
                continue
            raise TraceError(f"module path {node.target!r} {why}; fix: rename that submodule")



_OWN = (os.path.dirname(torch.__file__), os.path.dirname(os.path.abspath(__file__)))


def _origin(exc: BaseException) -> str:
    """' (at file.py:123)': the model's own line that tracing could not follow."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith(_OWN)]
    if not frames:
        return ""
    frame = frames[-1]
    short = os.path.join(*frame.filename.split(os.sep)[-2:])
    return f" (at {short}:{frame.lineno})"
