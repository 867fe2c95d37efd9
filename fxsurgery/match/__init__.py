"""Resolve rules against the traced graph: read-only, a plan of matches.

A site is where a rule acts: one invocation of a module (a leaf call, or the
nodes traced through a non-leaf module's forward), or one function or method
call. "Did not match" is a value with a reason and the nearest names; it
becomes an error only when the rule must match.
"""

from __future__ import annotations

import difflib
import itertools
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from .._util import format_table
from ..capture import Capture
from ..errors import MatchError
from ..spec import Delete, Detach, Freeze, Insert, Layers, Output, Prune, Replace, Rewrite, Rule, Selector, frozen_by, statistics
from ._groups import Group, Unprunable, group_of, groups, zeroed
from ._heads import Heads, count_after, heads_of, zero_heads
from ._patterns import Constant, Found, find, missing_reason
from ._sites import Ambiguous, Locator, Site, exact, join, select_modules

__all__ = [
    "TWO_STEPS", "Constant", "Found", "Group", "Heads", "Locator", "Match", "Plan", "Site", "Unprunable", "count_after", "group_of", "groups",
    "heads_of", "join", "label", "match", "zero_heads", "zeroed",
]


@dataclass
class Match:
    """What one rule selected, or why it selected nothing."""

    index: int
    rule: Rule
    sites: list[Site] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)
    reason: str = ""
    nearest: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # sites an earlier rule removed, matches left alone (why)
    found: dict = field(default_factory=dict)          # pattern rules: Site -> chains.Found
    near: list[str] = field(default_factory=list)      # pattern rules: near misses and why, for --explain
    names: dict = field(default_factory=dict)          # Output: Site -> the key its value is returned under

    @property
    def count(self) -> int:
        return len(self.modules) if isinstance(self.rule, Freeze) else len(self.sites)

    @property
    def label(self) -> str:
        return label(self.index, self.rule)

    def to_dict(self) -> dict:
        return {"rule": self.index, "action": self.rule.action, "text": str(self.rule),
                "origin": str(self.rule.origin), "matches": self.count,
                "sites": [s.where for s in self.sites], "names": [s.shown for s in self.sites], "modules": list(self.modules),
                "reason": self.reason, "skipped": list(self.skipped), "near_misses": list(self.near)}


def label(index: int, rule: Rule) -> str:
    return f"rule {index} '{rule}' ({rule.origin})"


@dataclass
class Plan:
    """The matches of every rule, in order, and warnings worth reading."""

    matches: list[Match]
    warnings: list[str] = field(default_factory=list)

    def __repr__(self) -> str:  # the dataclass's own was kilobytes of sites: print(result.plan) shows the table
        return self.table()

    def table(self) -> str:
        rows = [("#", "rule", "matches", "where")]
        for m in self.matches:
            where = m.modules if isinstance(m.rule, Freeze) else [s.shown for s in m.sites]
            shown = ", ".join(where[:4]) + (f", ... (+{len(where) - 4})" if len(where) > 4 else "")
            rows.append((str(m.index), str(m.rule), str(m.count), shown or f"- ({m.reason})"))
        return format_table(rows)

    def to_dict(self) -> list[dict]:
        return [m.to_dict() for m in self.matches]

    def explain(self, limit: int | None = 5) -> str:
        """Per rule: what it matched, what it left alone and why, and its nearest misses (`limit` of each; None: all)."""
        limit = max(len(m.skipped) + len(m.near) for m in self.matches) if limit is None and self.matches else (limit or 0)
        lines = []
        for m in self.matches:
            lines.append(f"{m.label}: {m.count} match{'es' if m.count != 1 else ''}")
            if not m.count and not (m.skipped or m.near):
                near = f" (closest: {', '.join(m.nearest)})" if m.nearest else ""
                lines.append(f"  why nothing: {m.reason}{near}")
            for text in m.skipped[:limit]:
                lines.append(f"  left alone: {text}")
            for text in m.near[:limit]:
                lines.append(f"  near miss: {text}")
            hidden = max(0, len(m.skipped) - limit) + max(0, len(m.near) - limit)
            if hidden:
                lines.append(f"  ... and {hidden} more (--json or plan.explain(limit=None) lists them all)")
        return "\n".join(lines)


_SELECTING = ("head", "select", "at", "target", "train")  # the shipped rule files' params that name modules


def _param_fix(rule: Rule, modules: dict) -> str:
    """The fix for a rule that matched nothing: where its selector is a param of its file (linear-probe's
    `${head}`, fc by default), the param to set, and for a head the model's last Linear."""
    origin = rule.origin
    in_file = bool(origin.file and origin.line and origin.file.endswith((".yaml", ".yml")))  # a rule written in Python has no params
    try:
        lines = Path(origin.file).read_text(encoding="utf-8").splitlines()[origin.line - 1:] if in_file else []
    except (OSError, UnicodeDecodeError, ValueError):
        lines = []
    indent = len(lines[0]) - len(lines[0].lstrip(" -")) if lines else 0  # where the rule's keys start, after "- "
    own = lines[:1] + list(itertools.takewhile(lambda t: len(t) - len(t.lstrip(" ")) >= indent and not t.lstrip().startswith("- "),
                                               lines[1:]))  # the rule's own lines, not the next rule's
    names = [n for text in own for n in re.findall(r"\$\{(\w+)\}", text) if n in _SELECTING]
    if not names:
        return "correct the selector or add 'optional: true'"
    name = names[0]
    linears = [p for p, module in modules.items() if isinstance(module, nn.Linear)] if "head" in name else []
    example = linears[-1] if linears else "PATH"
    seen = ", the model's last Linear" if linears else ""
    return f"set the file's param: --set {name}={example}{seen} (params={{{name!r}: ...}} in Python)"


def _why_not(locator: Locator, sel: Selector) -> tuple[str, list[str]]:
    capture = locator.capture
    hidden = ""
    if capture.opaque:
        shown = "; ".join(f"{p or '(the model)'}: {why}" for p, why in list(capture.opaque.items())[:2])
        hidden = f"; opaque code may call it, which rules cannot see ({shown})"
    calls = [n for ix in locator.indexes for n in ix.nodes.values()]
    if sel.kind == "any":  # the first member that selects nothing says why
        missing = next((m for m in sel.value if not select_modules(m, locator.modules)), sel.value[0])
        return _why_not(locator, missing)
    if sel.kind == "type":
        present = sorted({type(m).__name__ for m in locator.modules.values()})
        return f"no module of type {sel.value.__name__} (types present: {', '.join(present[:8])})", []
    if sel.kind == "function":
        called = sorted({getattr(n.target, "__name__", str(n.target)) for n in calls if n.op == "call_function"})
        return f"no call of {sel.text} (functions called: {', '.join(called[:8]) or 'none'}){hidden}", []
    if sel.kind == "method":
        called = sorted({n.target for n in calls if n.op == "call_method"})
        return f"no call of method {sel.value} (methods called: {', '.join(called[:8]) or 'none'}){hidden}", []
    selected = select_modules(sel, locator.modules)
    if selected and capture.opaque and not capture.calls:
        return (f"{', '.join(selected[:3])} {'is' if len(selected) == 1 else 'are'} not called by traced code, and without "
                f"example inputs the calls made by opaque code ({', '.join(p or '(the model)' for p in list(capture.opaque)[:2])}) "
                f"are not known; pass example inputs (--input)"), []
    if selected:
        return (f"{', '.join(selected[:3])} {'is' if len(selected) == 1 else 'are'} never called by the forward (inside a leaf module "
                f"or unused){_called_through(capture, selected[0])}"), []
    text = sel.value if sel.kind == "glob" else sel.value.pattern
    names = locator.names()
    # `fc` of a wrapped model (DataParallel, a user's wrapper) is `module.fc`: a path ending in the text comes first
    under = [n for n in names if n.endswith("." + text)] if sel.kind == "glob" else []
    nearest = (sorted(under, key=len) + [n for n in difflib.get_close_matches(text, names, n=3, cutoff=0.5) if n not in under])[:3]
    return f"no module path or node name matches {sel.text!r}", nearest


def match(capture: Capture, rules: list[Rule]) -> Plan:
    """Resolve every rule against the captured model; raise where one must match."""
    locator = Locator(capture)
    plan = Plan([])
    touched: dict[tuple, Match] = {}  # (graph, node) or (None, module) -> the rule that deleted or replaced it
    params = [n for n, _ in capture.model.named_parameters(remove_duplicate=False)]
    for i, rule in enumerate(rules, start=1):
        m = Match(i, rule)
        try:
            settled = _match_one(m, locator, capture, plan, touched, params)
        except Ambiguous as exc:
            raise MatchError(f"{m.label}: {exc}") from None
        if not m.count and not rule.optional and not settled:
            near = f"; closest: {', '.join(m.nearest)}" if m.nearest else ""
            raise MatchError(f"{m.label} matched nothing: {m.reason}{near}; fix: {_param_fix(rule, locator.modules)}")
        plan.matches.append(m)
    return plan


def _match_one(m: Match, locator: Locator, capture: Capture, plan: Plan, touched: dict, params: list[str]) -> bool:
    """Resolve one rule into `m`; True when it needs no match (a warning said why)."""
    rule = m.rule
    if capture.kept:
        _check_kept(m)
    if isinstance(rule, Layers):
        m.sites, m.modules = _layer_sites(m, locator)
        if not m.sites:
            m.reason, m.nearest = _why_not(locator, rule.target)
    elif isinstance(rule, Freeze):
        held = statistics(locator.modules) if rule.bn == "eval" else []  # BatchNorms without parameters it holds
        frozen, owners = frozen_by(rule, [*params, *held], lambda p: type(locator.modules.get(p)))
        m.modules = owners
        every = dict(capture.model.named_modules(remove_duplicate=False)) if rule.exclude else {}  # a module's second path too
        spared = next((e for e in rule.exclude if not select_modules(e, every)), None)
        made = any(isinstance(x.rule, (Replace, Insert, Rewrite)) for x in plan.matches)  # an except may name what they add
        if spared is not None and not rule.optional and not made:  # freeze-backbone's `fc` in a model without one froze its head too
            near = _why_not(locator, spared)[1]
            raise MatchError(f"{m.label}: except {spared.text!r} selects no module, so it spares nothing ({len(frozen)} of {len(params)} "
                             f"parameters would freeze){'; closest: ' + ', '.join(near) if near else ''}; fix: {_param_fix(rule, locator.modules)}")
        idle = [s for s in (rule.target.value if rule.target.kind == "any" else ()) if not select_modules(s, locator.modules)]
        if idle and not rule.optional:  # each selector of a list must select something, as one alone must
            m.modules = []
            m.reason, m.nearest = _why_not(locator, idle[0])
        elif not owners:
            chosen = select_modules(rule.target, locator.modules)
            if chosen and not rule.exclude:
                plan.warnings.append(f"{m.label}: {', '.join(chosen[:3])} {'has' if len(chosen) == 1 else 'have'} no parameters; nothing to freeze")
                return True  # a warning, not a miss
            m.reason, m.nearest = _why_not(locator, rule.target) if not chosen else ("every selected parameter is excluded", [])
    elif isinstance(rule, Rewrite):
        found, m.skipped, m.near = find(locator, rule)
        m.sites, m.found = [f.site for f in found], {f.site: f for f in found}
        m.modules = list(dict.fromkeys(s.module for s in m.sites if s.module is not None))
        if not m.sites:
            m.reason = (missing_reason(locator, rule) if not (m.skipped or m.near)
                        else f"every candidate was left alone: {(m.skipped or m.near)[0]}")
        elif capture.opaque and not _modules_only(rule):
            plan.warnings.append(f"{m.label}: calls inside opaque code ({', '.join(p or '(the model)' for p in list(capture.opaque)[:3])}) are not "
                                 f"seen and stay as they are")
        before = len(m.skipped)
        _check_conflicts(m, touched)
        gone = [s.partition(" (gone after ")[::2] for s in m.skipped[before:]]
        if gone:  # a fold that leaves one BatchNorm because input-channels rewrote its conv first: said, not silent
            plan.warnings.append(f"{m.label} left {', '.join(w for w, _ in gone[:3])}{' and more' if len(gone) > 3 else ''} as "
                                 f"{'it is' if len(gone) == 1 else 'they are'}: {gone[0][1][:-1]} rewrote {'it' if len(gone) == 1 else 'them'} "
                                 f"first, and a rule sees the original graph; fix: {TWO_STEPS}")
    elif isinstance(rule, Output):
        _match_outputs(m, locator)
        _check_conflicts(m, touched)
    else:
        sel = rule.selectors()[0]
        m.sites, m.modules = locator.select(sel, boundary=isinstance(rule, (Insert, Detach)))
        if not m.sites:
            m.reason, m.nearest = _why_not(locator, sel)
        elif sel.kind in ("function", "method") and capture.opaque:
            plan.warnings.append(f"{m.label}: calls inside opaque code ({', '.join(p or '(the model)' for p in list(capture.opaque)[:3])}) are not "
                                 f"seen and stay as they are")
        _check_conflicts(m, touched)
    return False


def _match_outputs(m: Match, locator: Locator) -> None:
    """Each selector of an Output rule, with the key its value is returned under.

    One place per selector keeps the name given; a selector that matches
    several places returns each under its own name (a module path, or the
    call's qualified name where one module is called more than once). A
    name is a value, as in torchvision's `return_nodes`: a module called
    several times (`layer1.0.relu`) returns its first call, `layer1.0.relu_1`
    its second.
    """
    rule = m.rule
    for sel, name in zip(rule.at, rule.names):
        sites, paths = (locator.named(sel.value), []) if exact(sel) else ([], [])
        if not sites:
            sites, paths = locator.select(sel, boundary=False)
        if not sites:
            reason, nearest = _why_not(locator, sel)
            if rule.optional:
                m.skipped.append(f"{sel.text}: {reason}")
                continue
            m.sites, m.modules, m.names, m.reason, m.nearest = [], [], {}, reason, nearest
            return
        calls = Counter(s.module for s in sites)  # a module called once is named by its path
        keys = [name] if len(sites) == 1 else [s.module if s.module and calls[s.module] == 1 else s.shown for s in sites]
        for site, key in zip(sites, keys):
            if site in m.names:
                raise MatchError(f"{m.label}: {sel.text!r} selects {site.where}, which is already returned as {m.names[site]!r}; "
                                 "fix: select each place once")
            if key in m.names.values():
                raise MatchError(f"{m.label}: two places would be returned as {key!r}; fix: name the outputs, e.g. "
                                 "Output({'layer1': 'feat1', 'layer2': 'feat2'})")
            m.names[site] = key
        m.sites += sites
        m.modules += [p for p in paths if p not in m.modules]
    if not m.sites and m.skipped:  # every selector optional and none matched: say why
        m.reason = "; ".join(m.skipped[:3])


def _called_through(capture: Capture, path: str) -> str:
    """Where a module that is never called has its weights called (T5's `shared` through encoder.embed_tokens)."""
    own = {id(t) for t in capture.model.get_submodule(path).parameters()}
    if not own or not capture.calls:
        return ""
    for other, module in capture.model.named_modules(remove_duplicate=False):
        if other != path and other in capture.calls and own & {id(t) for t in module.parameters(recurse=False)}:
            return f"; its weights are called through {other}: select that"
    return ""


def _check_kept(m: Match) -> None:
    """keep_class runs the model's own code: a rule that must edit inside a forward is refused."""
    rule = m.rule
    inside = (isinstance(rule, Output) or (isinstance(rule, Rewrite) and not _modules_only(rule))
              or any(sel.kind in ("function", "method") for sel in ([] if isinstance(rule, Rewrite) else rule.selectors())))
    if inside:
        raise MatchError(f"{m.label} edits code inside a forward, which keep_class=True runs as written; "
                         "fix: pass keep_class=False (--no-keep-class) for a regenerated module")


def _layer_sites(m: Match, locator: Locator) -> tuple[list[Site], list[str]]:
    """Each selected nn.ModuleList is one site; every index of the order must name one of its layers."""
    if not locator.capture.kept:
        raise MatchError(f"{m.label} rearranges a layer stack, whose calls a graph has traced into one call per layer "
                         "(a loop over a ModuleList, an nn.Sequential's forward); fix: pass keep_class=True (--keep-class), "
                         "or Delete/Insert the layers' calls")
    paths = select_modules(m.rule.target, locator.modules)
    for path in paths:
        layers = locator.modules[path]
        if not (isinstance(layers, nn.ModuleList) or _numbered_sequential(layers)):
            raise MatchError(f"{m.label}: {path} is a {type(layers).__name__}, not an nn.ModuleList or an nn.Sequential of "
                             "numbered layers; fix: select the list that holds the layers, e.g. 'model.layers'")
        bad = next((i for i in m.rule.order if i >= len(layers)), None)
        if bad is not None:
            raise MatchError(f"{m.label}: index {bad} is out of range for {path}, which holds {len(layers)} layers; "
                             f"fix: use indices 0 to {len(layers) - 1}")
    return [Site(p, p, True, (), (), (), None) for p in paths], paths


TWO_STEPS = "apply this rule to the first surgery's result (fxs.apply(result.module, rules), or its saved directory)"


def _numbered_sequential(module: nn.Module) -> bool:
    """A plain nn.Sequential whose layers are named 0..n-1 (timm's `blocks`): rearranged by position as a
    ModuleList is, with the same names; a subclass may take other constructor arguments, named layers would be renamed."""
    return type(module) is nn.Sequential and list(module._modules) == [str(i) for i in range(len(module))]


def _modules_only(rule: Rewrite) -> bool:
    """A one-module pattern reaches opaque code too; chains and calls there stay unseen."""
    p = rule.pattern
    return not p.is_dag and len(p.elements()) == 1 and all(isinstance(a, type) for a in p.elements()[0])


def _check_conflicts(m: Match, touched: dict[str, Match]) -> None:
    """Skip sites an earlier rule deleted or replaced; a rule left with none conflicts."""
    destructive = isinstance(m.rule, (Delete, Replace, Rewrite))
    kept, clash = [], None
    for site in m.sites:
        if isinstance(m.rule, (Delete, Replace)):
            _supersede(m, site, touched)
        names = [(site.region, n) for n in site.nodes] if site.region is not None else [(None, site.key)]
        hit = next(((name[1], touched[name]) for name in names if name in touched
                    and (destructive or touched[name].rule.action in ("delete", "rewrite"))), None)
        if hit is None:
            kept.append(site)
        else:
            clash = clash or hit
            m.skipped.append(f"{site.where} (gone after {hit[1].label})")
    if clash and not kept:
        name, earlier = clash
        verb = {"delete": "deleted", "rewrite": "rewritten"}.get(earlier.rule.action, "replaced")
        fix = f"{TWO_STEPS}, or drop one of the two rules" if isinstance(m.rule, (Rewrite, Prune)) and verb == "rewritten" else \
            "drop one of the two rules"
        raise MatchError(f"{m.label} conflicts with {earlier.label}: node '{name}' was already {verb}; fix: {fix}")
    m.sites = kept
    kept_modules = {s.module for s in kept}
    m.modules = [p for p in m.modules if p in kept_modules]
    if destructive:
        for site in kept:
            names = [(site.region, n) for n in site.nodes] if site.region is not None else [(None, site.key)]
            for name in names:
                touched[name] = m




def _supersede(m: Match, site: Site, touched: dict) -> None:
    """Earlier edits lying wholly inside a module this rule deletes or replaces go with it.

    `[Replace(nn.ReLU, nn.GELU()), Delete("layer4.2")]` means what the
    reverse order means: the block goes, and the ReLUs swapped inside it are
    left alone (said in the earlier rule's `skipped`).
    """
    if site.region is None:
        return
    inside = set(site.nodes)
    earlier = {id(touched[(site.region, n)]): touched[(site.region, n)] for n in site.nodes if (site.region, n) in touched}
    for e in earlier.values():
        gone = [s for s in e.sites if s.region == site.region and set(s.nodes) < inside]
        if not gone:
            continue
        e.sites = [s for s in e.sites if s not in gone]
        e.skipped += [f"{s.shown} (inside {site.shown}, which {m.label} removes)" for s in gone]
        left = {s.module for s in e.sites}
        e.modules = [p for p in e.modules if p in left]
        for s in gone:
            e.found.pop(s, None)
            for n in s.nodes:
                touched.pop((s.region, n), None)
