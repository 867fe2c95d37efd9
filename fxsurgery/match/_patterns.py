"""Find the matches of pattern rules: chains of calls, through an index by (op, target).

Candidates for a chain's first element come from an index of each graph's
calls by module type, function or method name, built once per graph; a
chain is then followed user by user. So matching costs one pass to index
and then work proportional to the matches, never a scan per match.

A match is rewritten only when it is safe: an inner value used outside the
chain, or a module also called somewhere the rule does not rewrite the same
way, leaves the match alone with a reason (per_site: each match gets its
own copy instead). Near misses are kept for `--explain`.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .._util import get_path
from ..spec import Pattern, Rewrite, calls, dag_graph, element_text
from ._sites import GraphIndex, Locator, Site, join


@dataclass(frozen=True)
class Found:
    """One chain in one graph: its nodes, the modules they call, where its replacement goes."""

    site: Site
    nodes: tuple[str, ...]
    modules: tuple[str | None, ...]   # module target per element (relative to the graph), None for calls
    install: str | None               # the path the replacement takes; None: a fresh path for this match
    inputs: tuple | None = None       # DAG patterns: what the pattern's inputs bind, in order: node names or Constants
    outputs: tuple[str, ...] | None = None  # DAG patterns with several outputs: the node of each, in the pattern's order


@dataclass(frozen=True)
class Constant:
    """A pattern input bound to a value written in the model's code (`torch.add(x, 2)` binds 2)."""

    value: Any


class CallIndex:
    """A graph's call nodes by (op, key): module type, function, method name."""

    def __init__(self, index: GraphIndex):
        self.index = index
        self.gm = index.captured.gm
        self.position: dict[fx.Node, int] = {}
        self.by: dict[tuple, list[fx.Node]] = defaultdict(list)
        self.calls: dict[str, int] = defaultdict(int)   # module target -> number of call sites
        for i, n in enumerate(index.nodes.values()):
            self.position[n] = i
            if n.op == "call_module":
                self.by[("module", type(self.gm.get_submodule(n.target)))].append(n)
                self.calls[n.target] += 1
            elif n.op == "call_function":
                self.by[("function", n.target)].append(n)
            elif n.op == "call_method":
                self.by[("method", n.target)].append(n)

    @classmethod
    def of(cls, index: GraphIndex) -> "CallIndex":
        """The index of a graph, built once however many pattern rules read it."""
        if getattr(index, "calls_index", None) is None:
            index.calls_index = cls(index)
        return index.calls_index

    def hits(self, node: fx.Node, alternatives: tuple) -> bool:
        for a in alternatives:
            if isinstance(a, str):
                if node.op == "call_method" and node.target == a[len("method:"):]:
                    return True
            elif isinstance(a, type):
                if node.op == "call_module" and isinstance(self.gm.get_submodule(node.target), a):
                    return True
            elif node.op == "call_function" and node.target is a:
                return True
        return False

    def candidates(self, alternatives: tuple) -> list[fx.Node]:
        found: list[fx.Node] = []
        for a in alternatives:
            if isinstance(a, str):
                found += self.by.get(("method", a[len("method:"):]), [])
            elif isinstance(a, type):
                found += [n for (op, t), nodes in self.by.items() if op == "module" and issubclass(t, a) for n in nodes]
            else:
                found += self.by.get(("function", a), [])
        return sorted(set(found), key=self.position.__getitem__)

    def module(self, node: fx.Node):
        return self.gm.get_submodule(node.target) if node.op == "call_module" else node

    def text(self, node: fx.Node) -> str:
        where = join(self.index.region, node.target) if node.op == "call_module" else join(self.index.region, node.name)
        kind = type(self.gm.get_submodule(node.target)).__name__ if node.op == "call_module" else (
            getattr(node.target, "__name__", str(node.target)))
        return f"{where} ({kind})"


def _follow(ix: CallIndex, start: fx.Node, elements: list[tuple]) -> tuple[list[fx.Node], str]:
    """The chain from `start`, or the nodes so far and why it stops."""
    chain = [start]
    for alternatives in elements[1:]:
        prev = chain[-1]
        users = list(prev.users)
        if len(users) != 1:
            shown = ", ".join(u.name for u in users[:3])
            return chain, f"{ix.text(prev)} is read by {len(users)} nodes ({shown}): its value is used outside the pattern"
        user = users[0]
        if not ix.hits(user, alternatives):
            return chain, f"{ix.text(prev)} is followed by {ix.text(user)}, not {element_text(alternatives)}"
        if not user.args or user.args[0] is not prev:
            return chain, f"{ix.text(user)} reads {ix.text(prev)} but not as its first argument"
        others = [a.name for a in user.all_input_nodes if a is not prev]
        if others:  # a replacement takes the chain's input only: `add(fc(x), x)` would lose x
            return chain, f"{ix.text(user)} also reads {', '.join(others[:3])}, which the chain does not pass on"
        chain.append(user)
    return chain, ""


def find(locator: Locator, rule: Rewrite) -> tuple[list[Found], list[str], list[str]]:
    """(matches, skipped with reasons, near misses) of a pattern rule over every graph."""
    pattern: Pattern = rule.pattern
    if pattern.is_dag:
        return find_dag(locator, rule)
    elements = pattern.elements()
    found: list[Found] = []
    skipped: list[str] = []
    near: list[str] = []
    regions = sorted(locator.indexes, key=lambda ix: (bool(ix.region), ix.region.count(".")))  # the model's graph first
    for index in regions:
        ix = CallIndex.of(index)
        chains = []
        for start in ix.candidates(elements[0]):
            name = join(index.region, start.target if start.op == "call_module" else start.name)
            if rule.select is not None and not rule.select.matches_name(name):
                continue
            chain, why = _follow(ix, start, elements)
            if why:
                near.append(why)
                continue
            matched = [ix.module(n) for n in chain]
            shapes = [getattr(index.captured.shapes.get(n.name), "shape", None) for n in chain]
            problem = pattern.check(*matched) or pattern.check_shapes(*shapes)
            if problem:
                skipped.append(f"{' + '.join(ix.text(n) for n in chain)}: {problem}")
                if pattern.first_only:  # the first in graph order, or none
                    break
                continue
            chains.append(chain)
            if pattern.first_only:
                break
        found += _placed(ix, chains, rule, skipped, locator.capture.calls)
        if pattern.first_only and (found or skipped):
            break
    if len(elements) == 1 and not (pattern.first_only and (found or skipped)):
        found += _in_opaque_code(locator, rule, skipped)
    return found, skipped, near


def _in_opaque_code(locator: Locator, rule: Rewrite, skipped: list[str]) -> list[Found]:
    """A one-module pattern also reaches modules that opaque code calls: the module itself is swapped."""
    kinds = tuple(a for a in rule.pattern.elements()[0] if isinstance(a, type))
    out = []
    for path in locator.capture.calls:
        module = locator.modules.get(path)
        if not kinds or not isinstance(module, kinds) or (rule.select is not None and not rule.select.matches_name(path)):
            continue
        sites = [s for s in locator.module_sites(path, boundary=False) if s.region is None]
        if not sites or any(ix.region == path for ix in locator.indexes):
            continue  # it sits in a graph, or is one (a traced nn.TransformerEncoder as the model): matched there
        problem = rule.pattern.check(module)
        if problem:
            skipped.append(f"{path} ({type(module).__name__}): {problem}")
            if rule.pattern.first_only:
                break
            continue
        out.append(Found(sites[0], (), (path,), path))
        if rule.pattern.first_only:
            break
    return out


def _key(pnode: fx.Node) -> tuple:
    """What a pattern node must call, as an index key element."""
    if pnode.op == "call_method":
        return (f"method:{pnode.target}",)
    if pnode.op == "get_attr":
        return ()
    if isinstance(pnode.target, calls):
        return (pnode.target.cls,)
    return (pnode.target,)


def _bind(ix: CallIndex, pnode: fx.Node, gnode: Any, mapping: dict, inputs: dict) -> str:
    """Match the pattern's `pnode` at `gnode`, backwards through arguments; '' or why not."""
    if pnode.op == "get_attr":  # as torch.fx's matcher: a tensor attribute of the pattern matches any the model reads
        if not (isinstance(gnode, fx.Node) and gnode.op == "get_attr" and isinstance(get_path(ix.gm, gnode.target), torch.Tensor)):
            return f"{ix.text(gnode) if isinstance(gnode, fx.Node) else repr(gnode)} is not a tensor attribute of the model"
    if pnode.op in ("placeholder", "get_attr"):
        if inputs.setdefault(pnode, gnode) is not gnode:
            return f"{pnode.name} would be two different values"
        return ""
    if not isinstance(gnode, fx.Node) or not ix.hits(gnode, _key(pnode)):
        shown = ix.text(gnode) if isinstance(gnode, fx.Node) else repr(gnode)
        return f"{shown} is not {getattr(pnode.target, '__name__', pnode.target)}"
    if mapping.setdefault(pnode, gnode) is not gnode:
        return f"{pnode.name} would be two different nodes"
    if len(pnode.args) != len(gnode.args):
        return f"{ix.text(gnode)} takes {len(gnode.args)} arguments, the pattern {len(pnode.args)}"
    extra = [k for k in gnode.kwargs if k not in pnode.kwargs]
    if extra:
        return f"{ix.text(gnode)} is called with {', '.join(extra)}=, which the pattern does not name"
    for pa, ga in [*zip(pnode.args, gnode.args), *((pnode.kwargs[k], gnode.kwargs.get(k)) for k in pnode.kwargs)]:
        why = _bind_arg(ix, pa, ga, mapping, inputs)
        if why:
            return why
    return ""


def _bind_arg(ix: CallIndex, pa: Any, ga: Any, mapping: dict, inputs: dict) -> str:
    if isinstance(pa, fx.Node):
        return _bind(ix, pa, ga, mapping, inputs)
    if isinstance(pa, (list, tuple)):
        if not isinstance(ga, (list, tuple)) or len(pa) != len(ga):
            return f"{ga!r} does not have the pattern's {len(pa)} items"
        return next((w for w in (_bind_arg(ix, a, g, mapping, inputs) for a, g in zip(pa, ga)) if w), "")
    return "" if pa == ga else f"argument {ga!r} is not the pattern's {pa!r}"


def _anchors(graph: fx.Graph) -> list[fx.Node]:
    """The pattern's outputs: one call, or each of a tuple of them."""
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _bind_also(ix: CallIndex, pnode: fx.Node, mapping: dict, inputs: dict) -> str:
    """Bind another output of the pattern among the readers of what is bound already."""
    if pnode in mapping:
        return ""
    bound = [g for g in [*mapping.values(), *inputs.values()] if isinstance(g, fx.Node)]
    readers = sorted({u for g in bound for u in g.users if u not in mapping.values() and ix.hits(u, _key(pnode))},
                     key=ix.position.__getitem__)
    for g in readers:
        m2, i2 = dict(mapping), dict(inputs)
        if not _bind(ix, pnode, g, m2, i2):
            mapping.update(m2)
            inputs.update(i2)
            return ""
    return f"no {getattr(pnode.target, '__name__', pnode.target)} reads the same values (the pattern's output {pnode.name})"


def _check_bound(ix: CallIndex, pattern: Pattern, placeholders: list, anchors: list, mapping: dict, inputs: dict) -> str:
    """Why a full binding cannot be rewritten: a leak, a value read too early, a constant that fails its test."""
    matched = sorted(mapping.values(), key=ix.position.__getitem__)
    inside = set(matched)
    outs = {mapping[a] for a in anchors}
    leak = next((g for g in matched if g not in outs and any(u not in inside for u in g.users)), None)
    if leak is not None:
        return f"{ix.text(leak)} is also read outside the pattern"
    last = ix.position[matched[-1]]
    early = next((u for g in outs for u in g.users if u not in inside and ix.position[u] < last), None)
    if early is not None:
        return f"{ix.text(early)} reads a value of the match before the match ends"
    tests = pattern.constants or {}
    for p in placeholders:
        if p.name not in tests:
            continue
        bound = inputs.get(p)
        if isinstance(bound, fx.Node):
            return f"{p.name} is bound to {ix.text(bound)}, not to a constant"
        if tests[p.name] is not None and not tests[p.name](bound):
            return f"{p.name} = {bound!r} fails the pattern's test"
    return ""


def find_dag(locator: Locator, rule: Rewrite) -> tuple[list[Found], list[str], list[str]]:
    """Matches of a pattern written as a function: anchored at its (first) output, candidates from the index."""
    pattern = rule.pattern
    graph = dag_graph(pattern, rule.origin)
    # an attribute the pattern reads binds like one more input, after its own: it stays in the model and
    # the replacement takes it (`x + self.a` -> `lambda x, a: ...`)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"] + [n for n in graph.nodes if n.op == "get_attr"]
    anchors = _anchors(graph)
    found, skipped, near = [], [], []
    for index in sorted(locator.indexes, key=lambda ix: (bool(ix.region), ix.region.count("."))):
        ix = CallIndex.of(index)
        chains, taken = [], set()
        for start in ix.candidates(_key(anchors[0])):
            mapping, inputs = {}, {}
            why = _bind(ix, anchors[0], start, mapping, inputs)
            for other in anchors[1:]:
                why = why or _bind_also(ix, other, mapping, inputs)
            why = why or _check_bound(ix, pattern, placeholders, anchors, mapping, inputs)
            matched = sorted(mapping.values(), key=ix.position.__getitem__)
            inside = set(matched)
            first = matched[0] if matched else start
            name = join(index.region, first.target if first.op == "call_module" else first.name)
            if rule.select is not None and not rule.select.matches_name(name):
                continue
            if why:
                near.append(f"at {ix.text(start)}: {why}")
                continue
            if inside & taken:
                skipped.append(f"{' + '.join(ix.text(n) for n in matched)}: overlaps an earlier match")
                continue
            problem = pattern.check(*[ix.module(n) for n in matched])
            if problem:
                skipped.append(f"{' + '.join(ix.text(n) for n in matched)}: {problem}")
                continue
            taken |= inside
            bound = tuple(inputs[p].name if isinstance(inputs.get(p), fx.Node) else Constant(inputs.get(p)) for p in placeholders)
            outs = tuple(mapping[a].name for a in anchors) if len(anchors) > 1 else None
            chains.append((matched, bound, outs))
        placed = _placed(ix, [c for c, _, _ in chains], rule, skipped, locator.capture.calls)
        by_nodes = {tuple(n.name for n in c): (ins, outs) for c, ins, outs in chains}
        for f in placed:
            ins, outs = by_nodes[f.nodes]
            found.append(Found(f.site, f.nodes, f.modules, f.install, ins, outs))
    return found, skipped, near


def _placed(ix: CallIndex, chains: list[list[fx.Node]], rule: Rewrite, skipped: list[str], calls: dict) -> list[Found]:
    """Where each chain's replacement goes; chains that would change a shared module are skipped.

    A module's calls count those in this graph and, from the example run, those
    made elsewhere (opaque code calling it directly, another graph)."""
    region = ix.index.region
    runs = calls[region].count if region and region in calls else 1  # how often this graph itself ran

    def count(target: str) -> int:
        recorded = calls.get(join(region, target))
        beyond = recorded.count - ix.calls[target] * runs if recorded is not None else 0
        return ix.calls[target] + max(0, beyond)

    matched_calls: dict[str, int] = defaultdict(int)
    for chain in chains:
        for n in chain:
            if n.op == "call_module":
                matched_calls[n.target] += 1
    out = []
    for chain in chains:
        targets = [n.target if n.op == "call_module" else None for n in chain]
        shared = [t for t in targets if t is not None and count(t) > 1]
        first = targets[0]
        if not shared:
            install = first
        elif len(chain) == 1 and matched_calls[first] == count(first):
            install = first  # every call of the module is rewritten the same way: one replacement serves all
        elif rule.per_site:
            install = None
        else:
            t = shared[0]
            skipped.append(f"{' + '.join(ix.text(n) for n in chain)}: {join(ix.index.region, t)} is called at "
                           f"{count(t)} places and rewriting one would change the others; per_site: true gives each match its own copy")
            continue
        names = [n.name for n in chain]
        key = first if first is not None and ix.calls[first] == 1 else chain[0].name  # a site key is per graph
        site = ix.index._site(key, first, names, len(chain) == 1 and chain[0].op == "call_module")
        out.append(Found(site, tuple(names), tuple(targets), install))
    return out


def missing_reason(locator: Locator, rule: Rewrite) -> str:
    """Why a pattern matched nothing at all: what its first element would have needed."""
    if rule.pattern.is_dag:
        return f"nothing in the traced graphs has the shape of {rule.pattern.describe()}"
    head = rule.pattern.elements()[0]
    kinds = [a for a in head if isinstance(a, type) and issubclass(a, nn.Module)]
    where = f" selected by {rule.select}" if rule.select is not None else ""
    text = f"no call of {element_text(head)}{where} in the traced graphs"
    if kinds:
        present = sorted({type(m).__name__ for m in locator.modules.values()})
        text += f" (types present: {', '.join(present[:8])})"
    opaque = locator.capture.opaque
    if opaque:
        shown = "; ".join(f"{p or '(the model)'}: {why}" for p, why in list(opaque.items())[:2])
        single = len(rule.pattern.elements()) == 1 and not rule.pattern.is_dag and len(kinds) == len(head)
        if single and not locator.capture.calls:
            text += (f"; opaque code may call it, and without example inputs its calls are not known ({shown}); "
                     "pass example inputs (--input)")
        else:
            text += f"; opaque code may call it, which pattern rules cannot see ({shown})"
    return text
