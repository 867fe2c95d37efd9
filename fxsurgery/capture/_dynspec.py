"""A torch.export-style dynamic_shapes spec checked against the capture's decisions.

`dynamic_shapes={"input_ids": {0: "batch", 1: "seq"}}` keeps the declared dims
dynamic: a decision of the code that pins one is refused, naming the dim, the
condition and the line; every other dim is guarded static in the graph itself.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from ..errors import ModelError
from ._guards import GUARD, SPEC, Decision, unique


def _dims(key, dims) -> list[int]:
    """The dims a torch.export-style entry declares dynamic ({dim: name or Dim}, or one entry per dim)."""
    if isinstance(dims, dict):
        return [int(d) for d in dims]
    if isinstance(dims, (list, tuple)):
        return [i for i, d in enumerate(dims) if d is not None]
    raise ModelError(f"dynamic_shapes[{key!r}] is a {type(dims).__name__}; fix: give {{dim: name}}, e.g. {{0: 'batch'}}")


def _placeholder(key, names: list[str], values: list, example: tuple, params: list[str]) -> str:
    """The graph input a dynamic_shapes key means: a position or a parameter name of the call, or an input name."""
    if isinstance(key, str) and key in names:
        return key
    index = params.index(key) if isinstance(key, str) and key in params else key
    if isinstance(index, int) and 0 <= index < len(example):
        for name, value in zip(names, values):
            if value is example[index] and isinstance(value, torch.Tensor):
                return name
    raise ModelError(f"dynamic_shapes names input {key!r}, which is no tensor input of the call (inputs: "
                     f"{', '.join(params or names)}); fix: name a tensor input by position or name")


def apply_spec(gm: fx.GraphModule, decisions: list[Decision], spec, values: tuple, example: tuple,
               params: list[str], where: str) -> dict[str, dict[int, str]]:
    """Check a torch.export-style spec against the decisions; guard every undeclared dim static.

    `values` are the graph's example inputs, `example` the call as the user gave it (positions
    and `params`, the forward's parameter names, name its inputs). Returns {input: {dim: why}}
    for the static dims."""
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    names = [p.name for p in placeholders]
    declared = {}
    for key, dims in dict(spec).items():
        name = _placeholder(key, names, values, example, params)
        declared[name] = set(_dims(key, dims))
    for d in unique(decisions):
        for name, dim in d.forces:
            if dim in declared.get(name, ()):
                raise ModelError(f"dynamic_shapes declares dim {dim} of input '{name}' dynamic, but the code decides "
                                 f"{d.describe()}, which holds only for its example size {d.example[name][dim]}; fix: "
                                 f"leave that dim out of dynamic_shapes (it is then static), or change that line")
    static: dict[str, dict[int, str]] = {}
    anchor = placeholders[-1] if placeholders else None
    for node, value in zip(placeholders, values):
        if not isinstance(value, torch.Tensor):
            continue
        for dim, size in enumerate(value.shape):
            if dim in declared.get(node.name, ()):
                continue
            static.setdefault(node.name, {})[dim] = "left out of dynamic_shapes"
            text = (f"'{where or 'the model'}': dim {dim} of input '{node.name}' is static (dynamic_shapes leaves it "
                    f"out) and was {int(size)} at capture; fix: declare it in dynamic_shapes")
            with graph.inserting_after(anchor):
                shape = graph.call_function(getattr, (node, "shape"))
            with graph.inserting_after(shape):
                read = graph.call_function(operator.getitem, (shape, dim))
            with graph.inserting_after(read):
                same = graph.call_function(operator.eq, (read, int(size)))
            with graph.inserting_after(same):
                anchor = graph.call_function(torch._assert, (same, text))
            for made in (shape, read, same, anchor):
                made.meta[GUARD] = made.meta[SPEC] = True
    gm.recompile()
    return static
