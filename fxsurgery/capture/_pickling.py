"""Pickling a result: `torch.save(model)`, multiprocessing, `copy.copy`.

torch.fx pickles a GraphModule as its generated code and its attributes, and
traces the code again when unpickled. What this package adds to an instance
is not data pickle can take: a call adapter is a bound method of a local
function (pickling it pickles the module again, without end), and a module
that runs other code in its other mode holds a second fx.Graph and that
graph's compiled forward (_dualgraph.py). They travel as what rebuilds them
and are put back once torch.fx has rebuilt the module, so the unpickled model
takes the same calls and follows `.train()` / `.eval()` as the pickled one.

A deep-copy hook that names the instance attributes it `installs` is such an
addition (capture/_call_shim.py's adapter): it is pickled as itself, its
attributes are left out, and it is applied again to the rebuilt module.

torch.fx's own rebuild also registers every tensor the graph reads as a
persistent buffer: a buffer the model keeps out of its state_dict (Llama's
rotary `inv_freq`, Swin's `relative_position_index`) or a constant of its
forward code (a plain attribute) would come back in it, and the original's
state_dict would no longer load. Their names travel too.
"""

from __future__ import annotations

import torch
from torch import fx
from torch.fx.graph_module import _format_import_block, reduce_graph_module
from torch.package import sys_importer


def parts(gm: fx.GraphModule, *dropped: str) -> tuple[dict, str, list, dict[str, bool]]:
    """torch.fx's own reduction of `gm` (its attributes, copied, and its code's imports) without the
    attributes `dropped` and those of the hooks applied again after unpickling; those hooks; and the
    tensors kept out of the state_dict (`hidden`)."""
    _, (body, import_block) = fx.GraphModule.__reduce__(gm)
    hooks = [hook for hook in body.get("_deepcopy_hooks", ()) if hasattr(hook, "installs")]
    if hooks:
        body["_deepcopy_hooks"] = [hook for hook in body["_deepcopy_hooks"] if hook not in hooks]
    for name in (*dropped, *(name for hook in hooks for name in hook.installs)):
        body.pop(name, None)
    return body, import_block, hooks, hidden(gm)


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


def code_of(graph: fx.Graph) -> tuple[str, str]:
    """A graph as pickle keeps it: its code and the imports that code needs (a Graph's nodes pickle one inside
    the next, deeper than pickle goes for a large model)."""
    code = graph.python_code(root_module="self")
    return code.src, _format_import_block(code.globals, sys_importer)


class Retracer(fx.Tracer):
    """Traces the generated code again with each buffer it reads as a graph input (get_attr). torch.fx's
    default tracer reads a buffer of a submodule as a value: code computed from it (Swin's
    `relative_position_index.view(-1)`) becomes a constant, out of reach of the buffer and in the state_dict."""

    proxy_buffer_attributes = True


def rebuilt(body: dict, import_block: str) -> fx.GraphModule:
    """The GraphModule torch.fx rebuilds from `parts`, before any hook is applied again."""
    return reduce_graph_module(dict(body, _tracer_cls=Retracer), import_block)


def reduce(gm: fx.GraphModule) -> tuple:
    """What pickle stores for a GraphModule this package made (`__reduce__` of its class): `pickled_parts`
    where its class has more to keep (_dualgraph.py), else `parts`."""
    special = getattr(type(gm), "pickled_parts", None)
    return special(gm) if special is not None else (_restore, parts(gm))


def _restore(body: dict, import_block: str, hooks: list, kept_out: dict[str, bool]) -> fx.GraphModule:
    gm = rebuilt(body, import_block)
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
        if self not in gm._deepcopy_hooks:
            gm._deepcopy_hooks.append(self)


def picklable(gm: fx.GraphModule) -> fx.GraphModule:
    """`gm`, pickled from now on as this module pickles (see above)."""
    Pickled()(gm)
    return gm
