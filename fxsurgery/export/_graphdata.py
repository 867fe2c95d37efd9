"""graph.json: the saved module as data, so that loading it runs no code from the directory.

For every graph attribute: its path and either a module (class as a dotted
name and the constructor arguments model.py uses, or a Sequential of such),
a parameter or a buffer (shape, dtype, requires_grad / persistent). Then the
ties, frozen parameters, training modes, and every node of the graph: op,
name, target (a function as its dotted name) and arguments as JSON, where
`{"node": name}` refers to an earlier node and other objects are tagged
values (`{"tuple": [...]}`, `{"dtype": "float32"}`, `{"float": "inf"}` ...).
A model that runs other code in train and eval mode has a second node list,
`other`, with the mode it runs in (`training`); both call the same attributes.
A graph taking its call's tensors flattened (captured in call form) has `call`:
the forward's parameters, the call's and the output's tree structures (as torch
serialises them) and the arguments fixed at capture.
"""

from __future__ import annotations

import builtins
import math
from typing import Any

import torch
from torch import fx, nn
from torch.fx.immutable_collections import immutable_dict
from torch.fx.node import _get_qualified_name
from torch.utils import _pytree as pytree

from ..capture import other_graph
from ._codegen import constructor_spec, module_dtype
from ._composites import is_nested

GRAPH = "graph.json"
VERSION = 1


class Unsupported(Exception):
    """Something graph.json cannot describe: loading then needs model.py (trust_code=True)."""


def function_name(target: Any) -> str:
    """`torch.flatten`, `operator.add`, `builtins.getattr`: the dotted name a loader resolves."""
    if getattr(builtins, getattr(target, "__name__", ""), None) is target:
        return f"builtins.{target.__name__}"
    name = _get_qualified_name(target)
    return "operator." + name[len("_operator."):] if name.startswith("_operator.") else name


def encode(value: Any) -> Any:
    """A node argument as JSON: plain values as themselves, the rest tagged."""
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, torch.Size):
        return {"size": [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, tuple) and type(value) is tuple:
        return {"tuple": [encode(v) for v in value]}
    if type(value) in (dict, immutable_dict):
        return {"dict": [[encode(k), encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"slice": [encode(value.start), encode(value.stop), encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": None}
    for kind in (torch.dtype, torch.memory_format, torch.layout):
        if isinstance(value, kind):
            return {kind.__name__: str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise Unsupported(f"a {type(value).__name__} argument")


def _tensor(value: torch.Tensor) -> dict:
    return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}


def _spec(spec: dict) -> dict:
    if "items" in spec:
        return {"class": spec["class"], "items": [_spec(s) for s in spec["items"]]}
    return {"class": spec["class"], "kwargs": {k: {"module": _spec(v["module"])} if is_nested(v) else encode(v)
                                               for k, v in spec["kwargs"].items()}}


def _attribute(path: str, old: str, value: Any, persistent: bool) -> dict:
    if isinstance(value, nn.Module):
        dtype = module_dtype(value, old)
        return {"path": path, "module": _spec(constructor_spec(value, old)),
                "dtype": None if dtype is None else str(dtype).removeprefix("torch.")}
    if isinstance(value, nn.Parameter):
        return {"path": path, "parameter": {**_tensor(value), "requires_grad": value.requires_grad}}
    return {"path": path, "buffer": {**_tensor(value), "persistent": persistent}}


def _node(node: fx.Node) -> dict:
    target = function_name(node.target) if node.op == "call_function" else node.target
    if not isinstance(target, str):
        raise Unsupported(f"node '{node.name}' has a {type(target).__name__} target")
    return {"op": node.op, "name": node.name, "target": target, "args": encode(node.args), "kwargs": encode(node.kwargs),
            "type": "torch.Tensor" if node.type is torch.Tensor else None}  # the one annotation model.py's forward shows


def _tree(spec) -> str:
    try:
        return pytree.treespec_dumps(spec)
    except NotImplementedError:  # a user's NamedTuple: only its module can name it, and only model.py imports
        raise Unsupported("its call or output holds a NamedTuple, which model.py imports") from None


def _call_form(call) -> dict:
    """The call form an adapter restores (capture/_call_shim.py), as data."""
    if call.signature is None:
        raise Unsupported("its call form has no signature")
    parameters = [{"name": p.name, "kind": p.kind.name, **({} if p.default is p.empty else {"default": encode(p.default)})}
                  for p in call.signature.parameters.values()]
    fixed = [[i, encode(v)] for i, v in enumerate(call.constants) if i not in call.tensors]
    return {"parameters": parameters, "call": _tree(call.in_spec), "fixed": fixed, "order": list(call.order),
            "output": _tree(call.out_spec)}


def describe(gm: fx.GraphModule, entries: list, *, class_name: str, frozen: list[str], ties: dict[str, str],
             non_persistent: list[str], modes: dict[str, bool], graph: fx.Graph | None = None, call=None,
             stay_eval=(), containers=None) -> dict:
    """graph.json's content for `gm` (as model.py's `Model` is traced, or `graph`: its own with codegen's
    renames, and the `call` form its adapter restores), from codegen's entries."""
    del non_persistent  # carried by each buffer entry
    other = other_graph(gm)
    unique: dict = {}
    for entry in entries:  # both modes' graphs list the attributes they share
        unique.setdefault(entry[0], entry)
    try:
        return {"fxsurgery_graph": VERSION, "class": class_name,
                "attributes": [_attribute(*entry) for entry in unique.values()],
                "ties": dict(ties), "frozen": list(frozen),
                "eval": sorted(p for p, training in modes.items() if not training),
                # Freeze(..., bn="eval"): these stay in eval mode whatever .train() says
                **({"stay_eval": sorted(stay_eval)} if stay_eval else {}),
                # the original's containers among the parents: result.features[0] as on the original
                **({"containers": containers} if containers else {}),
                "modes": len(modes),
                "nodes": [_node(n) for n in (graph or gm.graph).nodes],
                **({"call": _call_form(call)} if call is not None else {}),
                **({"other": {"training": other[1], "nodes": [_node(n) for n in other[0].nodes]}} if other else {})}
    except Unsupported as exc:
        return {"fxsurgery_graph": VERSION, "class": class_name, "unsupported": str(exc)}
