"""Rewrite matched chains in a graph, and cut a graph short at a node.

A chain's replacement is what its Pattern returns: a module (called where
the chain was, on the chain's first arguments), a function, or None (the
consumers read the chain's input). A module whose class is not torch's own
(an adapter written in Python) is traced and its graph inlined, so the
result stays plain torch code: modules of the match that it reuses keep
their paths and weights, its own modules go under `<path>_<name>`.
"""

from __future__ import annotations

import copy
import inspect
import operator
from typing import Any

from torch import fx, nn

from .._util import first_line, get_path
from ..capture import cut_of
from ..match import TWO_STEPS, Constant, Found, Match, Site
from ..spec import New, describe
from ._derivation import Derivation, WroteSource
from ._edited import Slot
from ._editor import Rewriter
from ._fitting import build, expected_input, fit_call, snake


def _torch_own(thing: Any) -> bool:
    """torch's or torchvision's own module or function: model.py can name it."""
    owner = type(thing) if isinstance(thing, nn.Module) else thing
    return (getattr(owner, "__module__", None) or "torch").split(".")[0] in ("torch", "torchvision", "_operator", "builtins")


def _call_args(rw: Rewriter, found: Found, first: fx.Node) -> tuple[tuple, dict]:
    """What the replacement is called with: the DAG's inputs, or the chain's first call's arguments."""
    if found.inputs is not None:
        return tuple(n.value if isinstance(n, Constant) else rw.node(n) for n in found.inputs), {}
    return tuple(first.args), dict(first.kwargs)


def rewrite_chains(rw: Rewriter, m: Match, sites: list[Site]) -> None:
    pattern = m.rule.pattern
    made: dict[str, Any] = {}  # install path -> the replacement every site there shares
    prefixes: dict[int, str] = {}  # id(inlined replacement) -> where its own modules live, once for all its sites
    resized: list[tuple[str, Match]] = []
    derivations: dict[int, Derivation] = {}  # id(replacement) -> what its rewrite computed from the match
    for site in sites:
        found: Found = m.found[site]
        nodes = [rw.node(n) for n in found.nodes]
        changed = _changed(nodes, set(found.outputs or ()))
        if changed:  # an earlier rule of this run rewired the match since it was planned
            m.skipped.append(f"{site.where}: {changed}")
            continue
        earlier = _remade_by(rw, m, nodes)
        if earlier is not None:  # a pattern computes from the original modules: it would undo what that rule made
            m.skipped.append(f"{site.where} (changed by {earlier.label})")
            resized.append((site.where, earlier))
            continue
        first, last = nodes[0], nodes[-1]
        matched = [rw.captured.gm.get_submodule(n.target) if n.op == "call_module" else n for n in nodes]
        if found.install is not None and found.install in made:
            replacement = made[found.install]
        else:
            planned = _check_values(rw, m, site, found, matched)
            following = Derivation([x for x in matched if isinstance(x, nn.Module)])  # planned (on meta): not followed
            try:
                with following:
                    replacement = pattern.rewrite(*([_on_meta(x) for x in matched] if planned else matched))
            except ValueError as err:  # a pattern refusing this match (LoRA's rank above a layer's size)
                rw.fail(m, site, f"{pattern.describe()}: {first_line(err)}", "change the rule's params, or select other layers")
            except WroteSource as wrote:
                rw.fail(m, site, f"{pattern.describe()}.rewrite writes into the matched {wrote.name}, which the "
                        "original model holds", "compute a new tensor from it (new.weight.copy_(linear.weight * 2))")
            if isinstance(replacement, New):
                replacement = build(m, replacement, rw.shape_in(site), site, rw.like(site), rw.mode(site))
            derivations[id(replacement)] = following
            if found.install is not None:
                made[found.install] = replacement
        args, kwargs = _call_args(rw, found, first)
        if replacement is None:
            _drop(rw, m, site, args, last)
        elif callable(replacement) and not _torch_own(replacement):
            _inline(rw, m, site, found, replacement, matched, args, kwargs, last, prefixes, derivations[id(replacement)])
        elif isinstance(replacement, nn.Module):
            _call(rw, m, site, found, replacement, first, args, kwargs, last, derivations[id(replacement)])
        elif callable(replacement):
            args, kwargs = fit_call(replacement, args, kwargs)
            with rw.graph.inserting_after(last):
                _swap(rw, site, last, rw.added(rw.graph.call_function(replacement, args, kwargs), m, last), m, found)
        else:
            rw.fail(m, site, f"{pattern.describe()}.rewrite returned {type(replacement).__name__}",
                    "return an nn.Module, a function, or None to drop the match")
    if resized:
        where, earlier = resized[0]
        text = (f"{m.label} left {', '.join(w for w, _ in resized[:3])}{' and more' if len(resized) > 3 else ''} as "
                f"{'it is' if len(resized) == 1 else 'they are'}: {earlier.label} changed {'it' if len(resized) == 1 else 'them'} first, "
                "and a pattern computes from the original modules")
        if len(resized) == len(sites):
            rw.fail(m, None, text.replace(f"{m.label} left", "leaves", 1), f"{TWO_STEPS}, or drop one of the two rules")
        rw.plan.warnings.append(f"{text}; fix: {TWO_STEPS}")
    rw.dirty = True


def _remade_by(rw: Rewriter, m: Match, nodes: list[fx.Node]) -> Match | None:
    """The earlier rule that made another module in place of one the match calls (Prune's narrower convolution)."""
    for node in nodes:
        slot = rw.edited.modules.get(node.target) if node.op == "call_module" else None
        if slot is not None and slot.rule is not None and slot.rule != m.index:
            return rw.edited.rule_of(slot.rule)
    return None


def _changed(nodes: list[fx.Node], outputs: set) -> str:
    """Why a planned match no longer holds in the graph as edited so far ('' when it does)."""
    inside = set(nodes)
    if len(inside) != len(nodes):
        return "an earlier rule merged its nodes"
    for node in nodes[:-1]:
        if node.name in outputs:  # one of several outputs: read outside by design
            continue
        outside = [u.name for u in node.users if u not in inside]
        if outside:
            return f"an earlier rule made {', '.join(outside[:3])} read {node.name}, inside the match"
    return ""


def _check_values(rw: Rewriter, m: Match, site: Site, found: Found, matched: list) -> bool:
    """Weights computed from the match need its values: a model built without weights has none, unless the
    pattern has a recipe the transfer stage computes them by from the checkpoint (True: rewrite on meta)."""
    if m.rule.pattern.weights != "derived":
        return False
    modules = [obj for obj in matched if isinstance(obj, nn.Module)]
    if not any(t.is_meta for obj in modules for t in [*obj.parameters(), *obj.buffers()]):
        return False
    if not _recipe_covers(m, modules):
        sources = ", ".join(t for t in found.modules if t is not None)
        rw.fail(m, site, f"its weights are computed from {sources}, which have no values (the model was built without weights)",
                "load the weights into the model before this rule, or leave the rule out")
    return True


def _on_meta(obj):
    """A matched module wholly on meta (a model built without weights keeps its buffers real, at their initial
    values): the rewrite then computes shapes alone, on one device."""
    return copy.deepcopy(obj).to("meta") if isinstance(obj, nn.Module) else obj


def _recipe_covers(m: Match, modules: list) -> bool:
    """A pattern with a recipe for the modules it matched (fold_bn) is computed from the checkpoint in the
    transfer stage, as map-weights computes it: its rewrite runs on meta tensors meanwhile."""
    if len(modules) != len(m.rule.pattern.elements()):
        return False
    try:
        return bool(m.rule.pattern.recipe(*modules))
    except Exception:
        return False


def _swap(rw: Rewriter, site: Site, last: fx.Node, new, m: Match | None = None, found: Found | None = None) -> None:
    """Consumers read the replacement; with several pattern outputs, each reads its item of it."""
    if found is None or found.outputs is None:
        last.replace_all_uses_with(new)
        rw.alias[last.name] = new.name
        rw.erase(site)
        return
    if isinstance(new, (tuple, list)) and len(new) != len(found.outputs):
        rw.fail(m, site, f"the replacement returns {len(new)} values for the pattern's {len(found.outputs)} outputs",
                "return one value per output of the pattern")
    anchor = new if isinstance(new, fx.Node) else last
    for i, name in enumerate(found.outputs):
        if isinstance(new, fx.Node):
            with rw.graph.inserting_after(anchor):
                anchor = value = rw.added(rw.graph.call_function(operator.getitem, (new, i)), m, last)
        else:
            value = new[i]
        rw.node(name).replace_all_uses_with(value)
        rw.alias[name] = value.name
    rw.erase(site)


def _drop(rw: Rewriter, m: Match, site: Site, args: tuple, last: fx.Node) -> None:
    source = args[0] if args else None
    if not isinstance(source, fx.Node) or m.found[site].outputs:
        rw.fail(m, site, "the match has no input node whose value could pass on", "rewrite it to a module instead of None")
    for user in list(last.users):
        user.meta["fxs_rewired"] = m.index
    last.replace_all_uses_with(source)
    rw.erase(site)


def _call(rw: Rewriter, m: Match, site: Site, found: Found, module: nn.Module, first: fx.Node, args: tuple,
          kwargs: dict, last: fx.Node, following: Derivation) -> None:
    if found.install is not None:
        path = found.install
    else:
        name = m.rule.pattern.name
        path = rw.fresh_path(f"{(found.modules[0] or first.name).replace('.', '_')}{'_' + name if name else ''}")
    if path not in rw.edited.modules or rw.edited.modules[path].value is not module:
        sources = tuple(t for t in found.modules if t is not None) if m.rule.pattern.weights == "derived" else ()
        rw.edited.modules[path] = Slot(module, found.install, m.index, sources=sources, derived=following.derived(module))
    args, kwargs = fit_call(module, args, kwargs)
    if args and isinstance(args[0], fx.Node) and args[0].op == "placeholder":
        meta = rw.meta(args[0].name)
        if meta is not None and meta.is_tensor:  # the model's input must now fit the new module
            rw.note_input(m, args[0], expected_input(module, meta.shape), f"made {path} {describe(module)}")
    with rw.graph.inserting_after(last):
        new = rw.added(rw.graph.call_module(path, args, kwargs), m, last)
    _swap(rw, site, last, new, m, found)


def _inline(rw: Rewriter, m: Match, site: Site, found: Found, module: Any, matched: list, args: tuple, kwargs: dict,
            last: fx.Node, prefixes: dict[int, str], following: Derivation) -> None:
    what = type(module).__name__ if isinstance(module, nn.Module) else getattr(module, "__name__", "the function")
    reused = {id(obj): n.target for obj, n in zip(matched, [rw.node(x) for x in found.nodes]) if isinstance(obj, nn.Module)}
    tracer = _Inliner(reused)
    try:
        graph = tracer.trace(module)
    except Exception as exc:
        rw.fail(m, site, f"{what} returned by {m.rule.pattern.describe()} cannot be traced: "
                f"{first_line(exc, type(exc).__name__)}", "return a torch.nn module or a traceable one")
    root = tracer.root  # the module itself, or where tracing a function kept its constants
    base = found.modules[0] or rw.node(found.nodes[0]).name
    named = m.rule.pattern.name or snake(type(module).__name__ if isinstance(module, nn.Module) else what)
    sources = tuple(t for t in found.modules if t is not None) if m.rule.pattern.weights == "derived" else ()
    prefix = prefixes.get(id(module))
    if m.rule.pattern.freeze_matched:
        rw.edited.frozen.update({t: m.index for t in found.modules if t is not None})
    for node in graph.nodes:
        if node.op == "call_module":
            if node.target in tracer.used:
                continue  # a module of the match, called where it is
            obj = root.get_submodule(node.target)
            prefix = prefixes.setdefault(id(module), prefix or rw.fresh_path(f"{base.replace('.', '_') if found.install is None else base}_{named}"))
            node.target = f"{prefix}.{node.target}"
            rw.edited.modules[node.target] = Slot(obj, None, m.index, sources=sources, derived=following.derived(obj))
        elif node.op == "get_attr":
            obj = get_path(root, node.target)
            prefix = prefixes.setdefault(id(module), prefix or rw.fresh_path(f"{base.replace('.', '_') if found.install is None else base}_{named}"))
            node.target = f"{prefix}.{node.target}"
            rw.edited.tensors[node.target] = Slot(obj, None, m.index, sources=sources, derived=following.derived(obj))
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    bound = _bound(module, placeholders, args, kwargs)
    if bound is not None:  # a function taking the call as it was made (keywords included)
        args, kwargs = bound, {}
    elif kwargs or len(args) > len(placeholders):  # options of the old call (inplace=...) are not inputs
        args, kwargs = args[:len(placeholders)], {}
    if len(placeholders) != len(args):
        rw.fail(m, site, f"{what} takes {len(placeholders)} inputs, the match passes {len(args)}",
                "make it take what the match reads")
    values = dict(zip(placeholders, args))
    before = set(rw.graph.nodes)
    with rw.graph.inserting_before(last.next):
        out = rw.graph.graph_copy(graph, values)
    for node in [n for n in rw.graph.nodes if n not in before]:
        rw.added(node, m, last)
    if not isinstance(out, fx.Node) and not (found.outputs and isinstance(out, (tuple, list))):
        rw.fail(m, site, f"{what} returns {type(out).__name__}", "return one tensor")
    _swap(rw, site, last, out, m, found)


def _bound(function, placeholders: list[fx.Node], args: tuple, kwargs: dict) -> tuple | None:
    """A function's inputs for the call (args, kwargs), by its parameters' names, defaults filled in; None where
    the replacement is a module or does not take the call as made."""
    if isinstance(function, nn.Module):
        return None
    try:
        call = inspect.signature(function).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    call.apply_defaults()
    if [p.target for p in placeholders] != list(call.arguments):
        return None
    return tuple(call.arguments.values())


class _Inliner(fx.Tracer):
    """Traces a replacement; modules of the match it calls stay calls of their paths in the graph."""

    def __init__(self, reused: dict[int, str]):
        super().__init__()
        self.reused, self.used = reused, set()

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return id(m) in self.reused or super().is_leaf_module(m, qualname)

    def path_of_module(self, mod: nn.Module) -> str:
        if id(mod) in self.reused:
            self.used.add(self.reused[id(mod)])
            return self.reused[id(mod)]
        return super().path_of_module(mod)


def cut_output(rw: Rewriter, m: Match, sites: list[Site]) -> None:
    """The graph returns the sites' values: the value itself for one `Output(sel)` at one place,
    otherwise a dict keyed as the Output rules name them (later rules add to it). What only fed
    later nodes is removed by validation."""
    if rw.captured.path or rw.captured.call is not None:
        rw.fail(m, sites[0], f"the output of the graph at '{rw.captured.path}' goes back into opaque code that expects it",
                "select a module of the model's own graph")
    values = {}
    for site in sites:
        value = cut_of(rw.one_output(m, site))
        if value is None:  # its tensors leave a no_grad region through detaches, each on its own
            rw.fail(m, site, "its value is a tuple made with gradients off (torch.no_grad), which would leave with the "
                    "gradients the region cuts", "select a tensor of it instead (its getitem nodes: fxsurgery inspect)")
        values[m.names.get(site, site.where)] = _kept_as_made(rw, value)
    output = next(n for n in rw.graph.nodes if n.op == "output")
    if rw.cut_keys is None:   # the first Output rule: what the model returned before is gone
        entries = {}
    elif isinstance(output.args[0], dict):
        entries = dict(output.args[0])
    else:                     # an earlier Output returned one value: it keeps its name in the dict
        entries = {rw.cut_keys[0]: output.args[0]}
    twice = next((k for k in values if k in entries), None)
    if twice is not None:
        rw.fail(m, None, f"an earlier Output rule already returns {twice!r}", "give this output another name")
    entries.update(values)
    plain = rw.cut_keys is None and not m.rule.keyed and len(values) == 1
    rw.cut_keys = list(entries)
    output.args = (next(iter(entries.values())),) if plain else (entries,)
    output.meta["fxs_rule"] = m.index
    rw.dirty = True


def _writes_into(rw: Rewriter, user: fx.Node, node: fx.Node) -> bool:
    """`user` writes into `node`'s tensor in place: a layer built with inplace=True (ReLU), a function called with
    inplace=True or named with a trailing underscore (relu_), a method add_, an augmented assignment (x += y), an
    item assignment (y[:, 0] = 0); or a view of it does (y.flatten(1).relu_())."""
    if not user.args or user.args[0] is not node:
        return False
    if (user.op == "call_method" and user.target in _VIEWS) or (user.op == "call_function" and user.target is operator.getitem):
        return any(_writes_into(rw, further, user) for further in user.users)
    if user.op == "call_module":
        slot = rw.edited.modules.get(user.target)
        return getattr(slot.value if slot is not None else None, "inplace", False) is True
    name = getattr(user.target, "__name__", user.target) if user.op == "call_function" else user.target
    underscored = isinstance(name, str) and name.endswith("_") and not name.startswith("_")
    augmented = user.op == "call_function" and user.target in _AUGMENTED
    return (user.op in ("call_function", "call_method") and (underscored or user.kwargs.get("inplace") is True)) or augmented


_AUGMENTED = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow,
              operator.imatmul, operator.iand, operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.setitem}
_VIEWS = {"view", "view_as", "flatten", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "narrow", "select",
          "expand", "expand_as", "t", "unflatten", "as_strided", "diagonal", "movedim", "swapaxes", "unfold", "split", "chunk"}


def _kept_as_made(rw: Rewriter, node: fx.Node) -> fx.Node:
    """The value `node` makes, as made: a copy where a later node writes into it in place (resnet's bn1 and
    relu(inplace=True) overwriting it: Output of bn1 returned relu's values once another output kept relu)."""
    if not any(_writes_into(rw, user, node) for user in node.users):
        return node
    with rw.graph.inserting_after(node):
        made = rw.graph.call_method("clone", (node,))
    made.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
    return made

