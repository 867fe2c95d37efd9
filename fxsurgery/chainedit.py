"""Rewrite matched chains in a graph, and cut a graph short at a node.

A chain's replacement is what its Pattern returns: a module (called where
the chain was, on the chain's first arguments), a function, or None (the
consumers read the chain's input). A module whose class is not torch's own
(an adapter written in Python) is traced and its graph inlined, so the
result stays plain torch code: modules of the match that it reuses keep
their paths and weights, its own modules go under `<path>_<name>`.
"""

from __future__ import annotations

from typing import Any

from torch import fx, nn

from .chains import Found
from .fitting import expected_input, fit_call, snake
from .graphedit import Rewriter, Slot
from .match import Match
from .sites import Site
from .spec import New, describe


def _torch_own(module: nn.Module) -> bool:
    return type(module).__module__.split(".")[0] in ("torch", "torchvision")


def rewrite_chains(rw: Rewriter, m: Match, sites: list[Site]) -> None:
    pattern = m.rule.pattern
    made: dict[str, Any] = {}  # install path -> the replacement every site there shares
    for site in sites:
        found: Found = m.found[site]
        nodes = [rw.node(n) for n in found.nodes]
        first, last = nodes[0], nodes[-1]
        matched = [rw.captured.gm.get_submodule(n.target) if n.op == "call_module" else n for n in nodes]
        if found.install is not None and found.install in made:
            replacement = made[found.install]
        else:
            _check_values(rw, m, site, found, matched)
            replacement = pattern.rewrite(*matched)
            if isinstance(replacement, New):
                replacement = rw.build(m, replacement, rw.shape_in(site), site)
            if found.install is not None:
                made[found.install] = replacement
        if replacement is None:
            _drop(rw, m, site, first, last)
        elif isinstance(replacement, nn.Module) and not _torch_own(replacement):
            _inline(rw, m, site, found, replacement, matched, first, last)
        elif isinstance(replacement, nn.Module):
            _call(rw, m, site, found, replacement, first, last)
        elif callable(replacement):
            args, kwargs = fit_call(replacement, tuple(first.args), dict(first.kwargs))
            with rw.graph.inserting_after(last):
                _swap(rw, m, site, last, rw.added(rw.graph.call_function(replacement, args, kwargs), m, last))
        else:
            rw.fail(m, site, f"{pattern.describe()}.rewrite returned {type(replacement).__name__}",
                    "return an nn.Module, a function, or None to drop the match")
    rw.dirty = True


def _check_values(rw: Rewriter, m: Match, site: Site, found: Found, matched: list) -> None:
    """Weights computed from the match need its values: a model built without weights has none."""
    if m.rule.pattern.weights != "derived":
        return
    if any(t.is_meta for obj in matched if isinstance(obj, nn.Module) for t in [*obj.parameters(), *obj.buffers()]):
        sources = ", ".join(t for t in found.modules if t is not None)
        rw.fail(m, site, f"its weights are computed from {sources}, which have no values (the model was built without weights)",
                "load the weights into the model before this rule, or leave the rule out")


def _swap(rw: Rewriter, m: Match, site: Site, last: fx.Node, new: fx.Node) -> None:
    last.replace_all_uses_with(new)
    rw.alias[last.name] = new.name
    rw.erase(site)


def _drop(rw: Rewriter, m: Match, site: Site, first: fx.Node, last: fx.Node) -> None:
    source = first.args[0] if first.args else None
    if not isinstance(source, fx.Node):
        rw.fail(m, site, "the match has no input node whose value could pass on", "rewrite it to a module instead of None")
    for user in list(last.users):
        user.meta["fxs_rewired"] = m.index
    last.replace_all_uses_with(source)
    rw.erase(site)


def _call(rw: Rewriter, m: Match, site: Site, found: Found, module: nn.Module, first: fx.Node, last: fx.Node) -> None:
    if found.install is not None:
        path = found.install
    else:
        name = m.rule.pattern.name
        path = rw.fresh_path(f"{(found.modules[0] or first.name).replace('.', '_')}{'_' + name if name else ''}")
    if path not in rw.edited.modules or rw.edited.modules[path].value is not module:
        sources = tuple(t for t in found.modules if t is not None) if m.rule.pattern.weights == "derived" else ()
        rw.edited.modules[path] = Slot(module, found.install, m.index, sources=sources)
    args, kwargs = fit_call(module, tuple(first.args), dict(first.kwargs))
    if first.args and isinstance(first.args[0], fx.Node) and first.args[0].op == "placeholder":
        meta = rw.meta(first.args[0].name)
        if meta is not None and meta.is_tensor:  # the model's input must now fit the new module
            rw.note_input(m, first.args[0], expected_input(module, meta.shape), f"made {path} {describe(module)}")
    with rw.graph.inserting_after(last):
        new = rw.added(rw.graph.call_module(path, args, kwargs), m, last)
    _swap(rw, m, site, last, new)


def _inline(rw: Rewriter, m: Match, site: Site, found: Found, module: nn.Module, matched: list, first: fx.Node,
            last: fx.Node) -> None:
    try:
        graph = fx.Tracer().trace(module)
    except Exception as exc:
        rw.fail(m, site, f"{type(module).__name__} returned by {m.rule.pattern.describe()} cannot be traced: "
                f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", "return a torch.nn module or a traceable one")
    reused = {id(obj): n.target for obj, n in zip(matched, [rw.node(x) for x in found.nodes]) if isinstance(obj, nn.Module)}
    base = found.modules[0] or first.name
    prefix = rw.fresh_path(f"{base.replace('.', '_') if found.install is None else base}_{getattr(m.rule.pattern, 'name', '') or snake(type(module).__name__)}")
    if m.rule.pattern.freeze_matched:
        rw.edited.frozen.update({t: m.index for t in found.modules if t is not None})
    for node in graph.nodes:
        if node.op == "call_module":
            obj = module.get_submodule(node.target)
            if id(obj) in reused:
                node.target = reused[id(obj)]
            else:
                node.target = f"{prefix}.{node.target}"
                rw.edited.modules[node.target] = Slot(obj, None, m.index)
        elif node.op == "get_attr":
            obj = module
            for part in node.target.split("."):
                obj = getattr(obj, part)
            node.target = f"{prefix}.{node.target}"
            rw.edited.tensors[node.target] = Slot(obj, None, m.index)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(first.args) or first.kwargs:
        rw.fail(m, site, f"{type(module).__name__}.forward takes {len(placeholders)} inputs, the match passes {len(first.args)}",
                "make its forward take what the matched call takes")
    values = dict(zip(placeholders, first.args))
    before = set(rw.graph.nodes)
    with rw.graph.inserting_before(last.next):
        out = rw.graph.graph_copy(graph, values)
    for node in [n for n in rw.graph.nodes if n not in before]:
        rw.added(node, m, last)
    if not isinstance(out, fx.Node):
        rw.fail(m, site, f"{type(module).__name__}.forward returns {type(out).__name__}", "return one tensor")
    _swap(rw, m, site, last, out)


def cut_output(rw: Rewriter, m: Match, sites: list[Site]) -> None:
    """The graph returns the site's value; what only fed later nodes is removed by validation."""
    site = sites[0]
    if rw.captured.path or rw.captured.call is not None:
        rw.fail(m, site, f"the output of the graph at '{rw.captured.path}' goes back into opaque code that expects it",
                "select a module of the model's own graph")
    value = rw.one_output(m, site)
    output = next(n for n in rw.graph.nodes if n.op == "output")
    output.args = (value,)
    output.meta["fxs_rule"] = m.index
    rw.dirty = True
