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
"""

from __future__ import annotations

from torch import fx
from torch.fx.graph_module import _format_import_block, reduce_graph_module
from torch.package import sys_importer


def parts(gm: fx.GraphModule, *dropped: str) -> tuple[dict, str, list]:
    """torch.fx's own reduction of `gm` (its attributes, copied, and its code's imports) without the
    attributes `dropped` and those of the hooks applied again after unpickling, and those hooks."""
    _, (body, import_block) = fx.GraphModule.__reduce__(gm)
    hooks = [hook for hook in body.get("_deepcopy_hooks", ()) if hasattr(hook, "installs")]
    if hooks:
        body["_deepcopy_hooks"] = [hook for hook in body["_deepcopy_hooks"] if hook not in hooks]
    for name in (*dropped, *(name for hook in hooks for name in hook.installs)):
        body.pop(name, None)
    return body, import_block, hooks


def code_of(graph: fx.Graph) -> tuple[str, str]:
    """A graph as pickle keeps it: its code and the imports that code needs (a Graph's nodes pickle one inside
    the next, deeper than pickle goes for a large model)."""
    code = graph.python_code(root_module="self")
    return code.src, _format_import_block(code.globals, sys_importer)


def rebuilt(body: dict, import_block: str) -> fx.GraphModule:
    """The GraphModule torch.fx rebuilds from `parts`, before any hook is applied again."""
    return reduce_graph_module(dict(body), import_block)


def reduce(gm: fx.GraphModule) -> tuple:
    """What pickle stores for a GraphModule of one graph that hooks of this package adapted."""
    return _restore, parts(gm)


def _restore(body: dict, import_block: str, hooks: list) -> fx.GraphModule:
    gm = rebuilt(body, import_block)
    for hook in hooks:
        hook(gm)
    return gm
