"""Resolve rules against the traced graph: read-only, a plan of matches.

A site is where a rule acts: one invocation of a module (a leaf call, or the
nodes traced through a non-leaf module's forward), or one function or method
call. "Did not match" is a value with a reason and the nearest names; it
becomes an error only when the rule must match.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from dataclasses import dataclass, field

from torch import fx, nn

from .errors import MatchError
from .spec import Delete, Freeze, Replace, Rule, Selector
from .trace import Captured, module_stack


@dataclass(frozen=True)
class Site:
    """One place a rule acts on: a module invocation or a call node."""

    key: str                  # invocation key ('layer1.0.relu@1') or node name
    path: str | None          # module path, None for function/method calls
    leaf: bool                # a single node
    nodes: tuple[str, ...]    # node names, in graph order
    inputs: tuple[str, ...]   # nodes outside the site that it reads
    outputs: tuple[str, ...]  # site nodes read outside the site

    @property
    def output(self) -> str | None:
        return self.outputs[0] if len(self.outputs) == 1 else None

    def __str__(self) -> str:
        return self.key


@dataclass
class Match:
    """What one rule selected, or why it selected nothing."""

    index: int
    rule: Rule
    sites: list[Site] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    reason: str = ""
    nearest: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # sites an earlier rule removed

    @property
    def count(self) -> int:
        return len(self.modules) if isinstance(self.rule, Freeze) else len(self.sites)

    @property
    def label(self) -> str:
        return label(self.index, self.rule)

    def to_dict(self) -> dict:
        return {"rule": self.index, "action": self.rule.action, "text": str(self.rule),
                "origin": str(self.rule.origin), "matches": self.count,
                "sites": [s.key for s in self.sites], "modules": list(self.modules),
                "reason": self.reason, "skipped": list(self.skipped)}


def label(index: int, rule: Rule) -> str:
    return f"rule {index} '{rule}' ({rule.origin})"


@dataclass
class Plan:
    """The matches of every rule, in order, and warnings worth reading."""

    matches: list[Match]
    warnings: list[str] = field(default_factory=list)

    def table(self) -> str:
        rows = [("#", "rule", "matches", "where")]
        for m in self.matches:
            where = m.modules if isinstance(m.rule, Freeze) else [s.key for s in m.sites]
            shown = ", ".join(where[:4]) + (f", ... (+{len(where) - 4})" if len(where) > 4 else "")
            rows.append((str(m.index), str(m.rule), str(m.count), shown or f"- ({m.reason})"))
        return format_table(rows)

    def to_dict(self) -> list[dict]:
        return [m.to_dict() for m in self.matches]


def format_table(rows: list[tuple]) -> str:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


class GraphIndex:
    """Nodes by name, module invocations by path, calls by target: built once."""

    def __init__(self, captured: Captured):
        self.captured = captured
        self.nodes = {n.name: n for n in captured.graph.nodes}
        self.modules = dict(captured.model.named_modules())
        self.keys: dict[str, list[str]] = defaultdict(list)       # path -> invocation keys
        self.members: dict[str, list[str]] = defaultdict(list)    # key -> node names
        for n in captured.graph.nodes:
            for key, path in module_stack(n):
                if key not in self.members:
                    self.keys[path].append(key)
                self.members[key].append(n.name)

    def module_sites(self, path: str) -> list[Site]:
        return [self.region(key, path) for key in self.keys.get(path, [])]

    def region(self, key: str, path: str | None) -> Site:
        names = self.members[key]
        inside = set(names)
        inputs: list[str] = []
        outputs: list[str] = []
        for name in names:
            node = self.nodes[name]
            for arg in node.all_input_nodes:
                if arg.name not in inside and arg.name not in inputs:
                    inputs.append(arg.name)
            if any(u.name not in inside for u in node.users):
                outputs.append(name)
        leaf = len(names) == 1 and self.nodes[names[0]].op == "call_module"
        return Site(key, path, leaf, tuple(names), tuple(inputs), tuple(outputs))

    def call_site(self, node: fx.Node) -> Site:
        inputs = tuple(dict.fromkeys(a.name for a in node.all_input_nodes))
        return Site(node.name, None, True, (node.name,), inputs, (node.name,))

    def names(self) -> list[str]:
        """Every module path and call-node name, for 'did you mean'."""
        calls = [n.name for n in self.nodes.values() if n.op.startswith("call")]
        return list(dict.fromkeys([p for p in self.modules if p] + calls))


def outermost(paths: list[str]) -> list[str]:
    chosen = set(paths)
    return [p for p in paths if not any(p.startswith(q + ".") for q in chosen if q != p)]


def select_modules(sel: Selector, modules: dict[str, nn.Module]) -> list[str]:
    """Module paths selected by a glob, regex or type selector."""
    if sel.kind == "type":
        return [p for p, m in modules.items() if isinstance(m, sel.value)]
    if sel.kind in ("glob", "regex"):
        return [p for p in modules if p and sel.matches_name(p)]
    return []


def select_sites(index: GraphIndex, sel: Selector) -> tuple[list[Site], list[str]]:
    """Sites and module paths a selector picks in the graph."""
    graph_nodes = index.nodes.values()
    if sel.kind == "function":
        return [index.call_site(n) for n in graph_nodes if n.op == "call_function" and n.target is sel.value], []
    if sel.kind == "method":
        return [index.call_site(n) for n in graph_nodes if n.op == "call_method" and n.target == sel.value], []
    paths = [p for p in outermost(select_modules(sel, index.modules)) if index.keys.get(p)]
    sites = [s for p in paths for s in index.module_sites(p)]
    if sel.kind in ("glob", "regex"):
        covered = {name for s in sites for name in s.nodes}
        for n in graph_nodes:
            if n.op.startswith("call") and n.name not in covered and sel.matches_name(n.name):
                if n.op == "call_module":
                    site = next(s for s in index.module_sites(n.target) if n.name in s.nodes)
                else:
                    site = index.call_site(n)
                sites.append(site)
                covered.update(site.nodes)
    return sites, paths


def param_owner(name: str) -> str:
    return name.rpartition(".")[0]


def ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def frozen_by(rule: Freeze, params: list[str], type_of) -> tuple[list[str], list[str]]:
    """(parameters frozen, modules selected) for a Freeze rule.

    A parameter is frozen when its module or one above it is selected by the
    target and none of them is excluded. `type_of(path)` gives a module's class.
    """
    def hit(sel: Selector, path: str) -> bool:
        if sel.kind == "type":
            return isinstance(type_of(path), type) and issubclass(type_of(path), sel.value)
        return sel.matches_name(path)

    frozen = []
    for name in params:
        chain = ancestors(param_owner(name))
        if any(hit(rule.target, p) for p in chain) and not any(hit(e, p) for e in rule.exclude for p in chain):
            frozen.append(name)
    owners = list(dict.fromkeys(param_owner(p) for p in frozen))
    return frozen, owners


def _why_not(index: GraphIndex, rule: Rule, sel: Selector) -> tuple[str, list[str]]:
    if sel.kind == "type":
        present = sorted({type(m).__name__ for m in index.modules.values()})
        return f"no module of type {sel.value.__name__} (types present: {', '.join(present[:8])})", []
    if sel.kind == "function":
        called = sorted({getattr(n.target, "__name__", str(n.target)) for n in index.nodes.values() if n.op == "call_function"})
        return f"no call of {sel.text} (functions called: {', '.join(called[:8]) or 'none'})", []
    if sel.kind == "method":
        called = sorted({n.target for n in index.nodes.values() if n.op == "call_method"})
        return f"no call of method {sel.value} (methods called: {', '.join(called[:8]) or 'none'})", []
    selected = select_modules(sel, index.modules)
    if selected:
        return f"{', '.join(selected[:3])} {'is' if len(selected) == 1 else 'are'} never called by the traced forward (inside a leaf module or unused)", []
    text = sel.value if sel.kind == "glob" else sel.value.pattern
    nearest = difflib.get_close_matches(text, index.names(), n=3, cutoff=0.5)
    return f"no module path or node name matches {sel.text!r}", nearest


def match(captured: Captured, rules: list[Rule]) -> Plan:
    """Resolve every rule against the original graph; raise where one must match."""
    index = GraphIndex(captured)
    plan = Plan([])
    touched: dict[str, Match] = {}  # node name -> the rule that deleted or replaced it
    params = [n for n, _ in captured.model.named_parameters(remove_duplicate=False)]
    for i, rule in enumerate(rules, start=1):
        m = Match(i, rule)
        if isinstance(rule, Freeze):
            frozen, owners = frozen_by(rule, params, lambda p: type(index.modules.get(p)))
            m.modules = owners
            if not owners:
                chosen = select_modules(rule.target, index.modules)
                if chosen and not rule.exclude:
                    plan.warnings.append(f"{m.label}: {', '.join(chosen[:3])} {'has' if len(chosen) == 1 else 'have'} no parameters; nothing to freeze")
                    plan.matches.append(m)
                    continue
                m.reason, m.nearest = _why_not(index, rule, rule.target) if not chosen else ("every selected parameter is excluded", [])
        else:
            sel = rule.selectors()[0]
            m.sites, m.modules = select_sites(index, sel)
            if not m.sites:
                m.reason, m.nearest = _why_not(index, rule, sel)
            _check_conflicts(m, touched)
        if not m.count and not rule.optional:
            near = f"; closest: {', '.join(m.nearest)}" if m.nearest else ""
            raise MatchError(f"{m.label} matched nothing: {m.reason}{near}; fix: correct the selector or add 'optional: true'")
        plan.matches.append(m)
    return plan


def _check_conflicts(m: Match, touched: dict[str, Match]) -> None:
    """Skip sites an earlier rule deleted or replaced; a rule left with none conflicts."""
    destructive = isinstance(m.rule, (Delete, Replace))
    kept, clash = [], None
    for site in m.sites:
        hit = next(((name, touched[name]) for name in site.nodes if name in touched
                    and (destructive or touched[name].rule.action == "delete")), None)
        if hit is None:
            kept.append(site)
        else:
            clash = clash or hit
            m.skipped.append(f"{site.key} (gone after {hit[1].label})")
    if clash and not kept:
        name, earlier = clash
        verb = "deleted" if isinstance(earlier.rule, Delete) else "replaced"
        raise MatchError(f"{m.label} conflicts with {earlier.label}: node '{name}' was already {verb}; fix: drop one of the two rules")
    m.sites = kept
    m.modules = [p for p in m.modules if any(s.path == p for s in kept)]
    if destructive:
        for site in kept:
            for name in site.nodes:
                touched[name] = m
