"""Pickling a result: `torch.save(model)`, multiprocessing, `copy.copy`.

torch.fx pickles a GraphModule as its generated code and traces that code
again when unpickled. Traced again by a plain tracer, the code of a captured
model is not the graph it came from: a guard on an argument
(`operator.is_(mask, None)`) is decided on the tracer's proxy and fails, a
size read becomes a proxy where a slice needs a number, and a buffer read of
a submodule becomes a constant. So a GraphModule this package makes pickles
its graph itself, node by node (each node's op, name, target, and arguments
naming earlier nodes), with its attributes as torch.fx keeps them, and is
rebuilt from exactly that graph.

What this package adds to an instance is not data pickle can take either: a
call adapter is a bound method of a local function (pickling it pickles the
module again, without end), and a module that runs other code in its other
mode holds a second graph and that graph's compiled forward (_dualgraph.py).
A deep-copy hook that names the instance attributes it `installs` (the
adapter) is pickled as itself, its attributes are left out, and it is applied
again to the rebuilt module; the second graph is pickled as the first.

torch.fx's rebuild registers every tensor the graph reads as a persistent
buffer: a buffer the model keeps out of its state_dict (Llama's rotary
`inv_freq`, Swin's `relative_position_index`) or a constant of its forward
code (a plain attribute) would come back in it, and the original's
state_dict would no longer load. Their names travel too.
"""

from __future__ import annotations

import copy

import torch
from torch import fx
from torch.fx.node import map_aggregate, map_arg


class _Node:
    """A node of a pickled graph where another node's arguments name it."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __reduce__(self):
        return _Node, (self.name,)


def graph_data(graph: fx.Graph) -> tuple[list, object]:
    """`graph` as pickle can keep it: a flat list of nodes (a Graph's nodes pickle one inside the next,
    deeper than pickle goes for a large model), and its code generator (pytree inputs and outputs)."""
    nodes = []
    for node in graph.nodes:
        trace = node.meta.get("stack_trace")
        nodes.append((node.op, node.name, node.target, map_arg(node.args, lambda n: _Node(n.name)),
                      map_arg(node.kwargs, lambda n: _Node(n.name)), node.type, trace if isinstance(trace, str) else None))
    return nodes, graph._codegen


def graph_of(data: tuple[list, object]) -> fx.Graph:
    nodes, codegen = data
    graph = fx.Graph()
    graph._codegen = codegen
    made: dict[str, fx.Node] = {}

    def back(value):
        return made[value.name] if isinstance(value, _Node) else value
    for op, name, target, args, kwargs, type_expr, trace in nodes:
        node = graph.create_node(op, target, map_aggregate(args, back), map_aggregate(kwargs, back), name, type_expr)
        if trace is not None:
            node.meta["stack_trace"] = trace
        made[name] = node
    return graph


def parts(gm: fx.GraphModule, *dropped: str) -> tuple[dict, tuple, list, dict[str, bool]]:
    """`gm`'s attributes (a copy, as torch.fx pickles them) without its graph, the attributes `dropped`
    and those of the hooks applied again after unpickling; its graph (`graph_data`) and class name; those
    hooks; and the tensors kept out of the state_dict (`hidden`)."""
    body = dict(gm.__dict__)
    del body["_graph"]
    hooks = [hook for hook in body.get("_deepcopy_hooks", ()) if hasattr(hook, "installs")]
    if hooks:
        body["_deepcopy_hooks"] = [hook for hook in body["_deepcopy_hooks"] if hook not in hooks]
    for name in (*dropped, *(name for hook in hooks for name in hook.installs)):
        body.pop(name, None)
    return body, (graph_data(gm.graph), type(gm).__name__), hooks, hidden(gm)


def hidden(*modules: torch.nn.Module) -> dict[str, bool]:
    """The tensors of `modules` kept out of their state_dict, by path: True for a non-persistent buffer,
    False for a plain attribute."""
    found = {}
    for module in modules:
        for path, sub in module.named_modules():
            prefix = f"{path}." if path else ""
            found.update({prefix + name: True for name in sub._non_persistent_buffers_set})
            found.update({prefix + name: False for name, value in vars(sub).items() if isinstance(value, torch.Tensor)})
    return found


def keep_hidden(gm: fx.GraphModule, kept_out: dict[str, bool]) -> None:
    """Keep the tensors `hidden` found out of the state_dict of `gm` again, where torch.fx registered them as buffers."""
    for target, buffer in kept_out.items():
        owner, _, name = target.rpartition(".")
        try:
            module = gm.get_submodule(owner)
        except AttributeError:
            continue
        if name not in module._buffers:
            continue
        if buffer:
            module._non_persistent_buffers_set.add(name)
        else:
            module._non_persistent_buffers_set.discard(name)
            module.__dict__[name] = module._buffers.pop(name)


def rebuilt(body: dict, graph: tuple) -> fx.GraphModule:
    """The GraphModule of `parts`: its graph, and the attributes that graph reads taken from `body` as
    torch.fx takes them from a root module; the rest of `body` kept as it was. Before any hook is applied again."""
    data, class_name = graph
    root = torch.nn.Module()
    root.__dict__ = dict(body)
    gm = fx.GraphModule(root, graph_of(data), class_name)
    for name, value in body.items():  # as torch.fx's own unpickling keeps them
        if not hasattr(gm, name):
            setattr(gm, name, value)
        elif "hook" in name and name != "_deepcopy_hooks":  # hooks on the module itself, which torch.fx drops
            gm.__dict__[name] = value
    return gm


def reduce(gm: fx.GraphModule) -> tuple:
    """What pickle stores for a GraphModule this package made (`__reduce__` of its class): `pickled_parts`
    where its class has more to keep (_dualgraph.py), else `parts`."""
    special = getattr(type(gm), "pickled_parts", None)
    return special(gm) if special is not None else (_restore, parts(gm))


def deep_copy(gm: fx.GraphModule, memo: dict) -> fx.GraphModule:
    """torch.fx's deep copy, which rebuilds the module keeping only its state-dict hooks, with the forward and
    backward hooks registered on the module itself too (a copy for an EMA model computed without them)."""
    res = fx.GraphModule.__deepcopy__(gm, memo)
    for name, value in gm.__dict__.items():
        if "hook" in name and name != "_deepcopy_hooks":
            res.__dict__[name] = copy.deepcopy(value, memo)
    return res


def _restore(body: dict, graph: tuple, hooks: list, kept_out: dict[str, bool]) -> fx.GraphModule:
    gm = rebuilt(body, graph)
    keep_hidden(gm, kept_out)
    for hook in hooks:
        hook(gm)
    return gm


class Pickled:
    """Gives a GraphModule this module's pickling, and again to its deep copies (a deep-copy hook:
    torch.fx makes a class per instance, and a copy gets a new one)."""

    installs = ()

    def __call__(self, gm: fx.GraphModule) -> None:
        type(gm).__reduce__ = reduce
        type(gm).__deepcopy__ = deep_copy
        if self not in gm._deepcopy_hooks:
            gm._deepcopy_hooks.append(self)


def picklable(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm`, pickled from now on as this module pickles (see above)."""
    Pickled()(gm)
    return gm
