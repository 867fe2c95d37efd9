"""Capture a model's forward as a torch.fx graph, with provenance and shapes.

torch.fx records, for every node, the stack of module calls it was made in
(`node.meta["nn_module_stack"]`, keyed `path` or `path@k` for the k-th extra
call of a module). That stack is the provenance the rest of the pipeline uses:
a module invocation is the set of nodes whose stack holds its key.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import ModelError, TraceError
from .shapes import Meta, PropagationError, propagate, shape_text


class Tracer(fx.Tracer):
    """torch.fx's tracer with a leaf policy the user can extend.

    Leaves are torch.nn's own modules (torch.fx's default), instances of
    `leaf_types`, and modules whose path matches a glob in `leaf_paths`.
    """

    def __init__(self, leaf_types=(), leaf_paths=()):
        super().__init__()
        self.leaf_types = tuple(leaf_types)
        self.leaf_paths = tuple(leaf_paths)
        self.failed_in: str | None = None
        self._open: list[str] = []

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if any(fnmatch.fnmatchcase(qualname, p) for p in self.leaf_paths):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        self._open.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module open when tracing failed is the one to make a leaf.
            if self.failed_in is None:
                self.failed_in = self._open[-1]
            raise
        finally:
            self._open.pop()


@dataclass
class Captured:
    """The traced original: its graph, the module it runs on, and shapes."""

    model: nn.Module
    gm: fx.GraphModule
    example_inputs: tuple | None
    shapes: dict[str, Meta] = field(default_factory=dict)
    leaf_types: tuple = ()
    leaf_paths: tuple = ()

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def input_names(self) -> list[str]:
        return [n.name for n in self.graph.nodes if n.op == "placeholder"]


def module_stack(node: fx.Node) -> list[tuple[str, str]]:
    """(invocation key, module path) pairs from the root outwards."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, value[0]) for key, value in stack.items()]


def path_of(node: fx.Node) -> str:
    """The path of the innermost module a node was made in ('' for the root)."""
    if node.op == "call_module":
        return node.target
    stack = module_stack(node)
    return stack[-1][1] if stack else ""


def trace(model: nn.Module, example_inputs: tuple | None = None, *, leaf_types=(), leaf_paths=()) -> Captured:
    """Trace `model` (never modified); with example inputs, give every node a shape."""
    if not isinstance(model, nn.Module):
        raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}; fix: pass the model instance")
    tracer = Tracer(leaf_types, leaf_paths)
    try:
        graph = tracer.trace(model)
    except Exception as exc:
        where = f"module '{tracer.failed_in}'" if tracer.failed_in else f"{type(model).__name__}.forward"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        fix = f"leaf_paths=['{tracer.failed_in}'] (--leaf {tracer.failed_in})" if tracer.failed_in else "make the untraceable part a leaf module"
        raise TraceError(f"cannot trace {where}: {type(exc).__name__}: {reason}; fix: {fix}") from None
    _refuse_unquotable(graph)
    gm = fx.GraphModule(model, graph, class_name=type(model).__name__)
    captured = Captured(model, gm, None, {}, tuple(leaf_types), tuple(leaf_paths))
    if example_inputs is not None:
        captured.example_inputs = check_inputs(example_inputs, captured.input_names())
        try:
            captured.shapes = propagate(gm, graph, captured.example_inputs)
        except PropagationError as err:
            shapes = ", ".join(shape_text(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in captured.example_inputs)
            raise ModelError(f"the original model fails on example inputs {shapes} at node '{err.node.name}': {type(err.exc).__name__}: {str(err.exc).splitlines()[0] if str(err.exc) else ''}; fix: pass inputs the original model accepts") from None
    return captured


def check_inputs(example_inputs: Any, names: list[str]) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if not isinstance(example_inputs, (tuple, list)):
        raise ModelError(f"example_inputs must be a tuple of inputs, got {type(example_inputs).__name__}; fix: pass (torch.randn(1, 3, 224, 224),)")
    if len(example_inputs) > len(names):
        raise ModelError(f"{len(example_inputs)} example inputs for a forward that takes {len(names)} ({', '.join(names)}); fix: pass one input per argument")
    return tuple(example_inputs)


def _refuse_unquotable(graph: fx.Graph) -> None:
    """torch.fx pastes module paths into generated code inside double quotes,
    unescaped; a path holding a quote, backslash or line break would run as code."""
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and any(c in node.target for c in '"\\\n\r'):
            raise TraceError(f"module path {node.target!r} contains a quote, backslash or line break, which torch.fx would write into generated code unescaped; fix: rename that submodule")
