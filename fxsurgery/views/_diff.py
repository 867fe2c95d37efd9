"""The graph before and after a surgery, grouped by module, coloured by what the rules did.

The transfer report says what happened to every tensor; this view says where
in the graph it happened. `render_html` gives one self-contained page (inline
CSS and JS, nothing fetched), `render_svg` the same as a standalone drawing,
and `diff` picks one by the file's suffix and writes it atomically.

    >>> fxs.diff(fxs.apply(model, ["rules/resnet-finetune.yaml"], example_inputs=(x,)), "diff.html")

Every node, and every module group, has one status (`data-status`):
deleted, inserted, replaced, cut, frozen or kept (see MEANING).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from dataclasses import dataclass, field

from torch import fx, nn

from .._util import shape_text
from ..errors import SaveError
from ..pipeline import SurgeryResult
from ._assets import CSS, JS, csp
from ._groups import pruned_modules
from ._svg import draw, esc

COLOURS = {"deleted": "#cf222e", "inserted": "#1a7f37", "replaced": "#bc4c00",
           "cut": "#8250df", "frozen": "#0969da", "kept": "#8c959f"}
MEANING = {
    "deleted": "an original node that is gone",
    "inserted": "a node or module an Insert rule added",
    "replaced": "a module or call a Replace, pattern or Prune rule changed (a pruned one shows its new width)",
    "cut": "a detach a Detach rule added, and the edges it cuts (no gradient crosses)",
    "frozen": "a module whose parameters are all frozen in the new module",
    "kept": "unchanged",
}
# A tensor of the transfer report takes the colour of the node status that means the same.
TENSOR_STATUS = {"new": "inserted", "adapted": "replaced", "dropped": "deleted", "transferred": "kept"}
_MADE = {"insert": "inserted", "detach": "cut", "replace": "replaced", "rewrite": "replaced", "prune": "replaced", "layers": "replaced"}
_RULE_STATUS = {"delete": "deleted", "freeze": "frozen", "output": "deleted", **_MADE}  # output: what follows is cut off
_STRUCTURAL = ("deleted", "inserted", "replaced", "cut")


@dataclass
class Item:
    """One node of one side, and what the surgery did to it."""

    name: str
    op: str
    what: str                 # module class, function or method
    shape: str
    status: str
    rule: int | None
    note: str = ""            # the label of that rule
    target: str = ""          # the module path of a call_module node
    chain: tuple = ()         # invocation keys of the groups it sits in, outermost first
    inputs: list = field(default_factory=list)  # (input node name, the edge is cut)


@dataclass
class Group:
    """One module invocation of one side: its nodes and nested invocations, in graph order."""

    key: str                  # invocation key as torch.fx writes it ('layer1.0.relu@1')
    path: str
    kind: str
    children: list = field(default_factory=list)  # Item | Group
    status: str = "kept"

    def items(self):
        for child in self.children:
            yield from (child.items() if isinstance(child, Group) else (child,))

    def groups(self):
        for child in self.children:
            if isinstance(child, Group):
                yield child
                yield from child.groups()

    def counts(self) -> Counter:
        return Counter(item.status for item in self.items())


@dataclass
class Side:
    """The graph before or after, as a tree of module groups."""

    name: str
    root: Group
    items: list[Item]


class _Facts:
    """What the plan and the new module say, gathered once for both sides."""

    def __init__(self, result: SurgeryResult):
        matches = result.plan.matches
        self.actions = {m.index: m.rule.action for m in matches}
        self.labels = {m.index: m.label for m in matches}
        self.sites = {name: (_RULE_STATUS[m.rule.action], m.index) for m in matches   # original node -> (status, rule)
                      if m.rule.action in ("delete", "replace", "rewrite", "prune") for s in m.sites for name in s.nodes}
        self.site_paths = {m.index: [s.path for s in m.sites if s.path is not None] for m in matches}
        self.frozen = _frozen_modules(result.module, result.plan)   # module path -> Freeze rule
        self.before = {n.name for n in result.original.graph.nodes}
        self.pruned = pruned_modules(result.report, self.actions)   # module path -> ("replaced", the Prune rule)


def _frozen_modules(module: nn.Module, plan) -> dict[str, int | None]:
    """Module paths whose parameters are all frozen, each with the last Freeze rule that reached it."""
    freezers = [m for m in reversed(plan.matches) if m.rule.action == "freeze"]
    out = {}
    for path, sub in module.named_modules():
        params = list(sub.parameters())
        if params and not any(p.requires_grad for p in params):
            out[path] = next((m.index for m in freezers if any(not path or o == path or o.startswith(path + ".")
                                                               for o in m.modules)), None)
    return out


def _what(node: fx.Node, gm: nn.Module) -> str:
    if node.op == "call_module":
        with contextlib.suppress(AttributeError):
            return type(gm.get_submodule(node.target)).__name__
        return "module"
    if node.op == "call_function":
        return getattr(node.target, "__name__", str(node.target))
    if node.op == "call_method":
        return f".{node.target}()"
    return {"placeholder": "input", "get_attr": "attribute"}.get(node.op, node.op)


def _type_name(kind) -> str:
    return getattr(kind, "__name__", str(kind).rsplit(".", 1)[-1].strip("'>"))


def _stack(node: fx.Node, made_at: list[str] | None) -> list[tuple[str, str, str]]:
    """(key, path, class) of the module invocations a node sits in, outermost first."""
    raw = node.meta.get("nn_module_stack") or {}
    stack = [(key, value[0], _type_name(value[1])) for key, value in raw.items()]
    if node.op == "call_module" and stack and stack[-1][1] == node.target:
        stack = stack[:-1]    # a leaf call is a node, not a group
    if made_at:
        # rewrite copies the stack of the node a new one sits by; a node on the
        # edges of a matched module belongs beside that module, not inside it
        stack = [s for s in stack if any(p.startswith(s[1] + ".") for p in made_at)]
    return stack


def _after_status(node: fx.Node, facts: _Facts) -> tuple[str, int | None]:
    rule = node.meta.get("fxs_rule")
    if node.name not in facts.before:   # torch.fx never reuses a name, so a rule made it
        action = facts.actions.get(rule)
        if action in _MADE:
            return _MADE[action], rule
        # a later Delete rewired it and its provenance now names that rule
        return ("cut" if node.op == "call_method" and node.target == "detach" else "inserted"), rule
    site = facts.sites.get(node.name) or (facts.pruned.get(node.target) if node.op == "call_module" else None)
    if site and site[0] == "replaced":
        return site
    if node.op == "call_module" and node.target in facts.frozen:
        return "frozen", facts.frozen[node.target]
    return "kept", rule


def _before_status(node: fx.Node, facts: _Facts, after: dict[str, Item]) -> tuple[str, int | None]:
    if node.name in facts.sites:
        return facts.sites[node.name]
    if node.name not in after:
        return "deleted", None        # left dead by a rule and eliminated
    return (after[node.name].status, after[node.name].rule) if after[node.name].status in ("frozen", "replaced") else ("kept", None)


def _item(node: fx.Node, gm: nn.Module, shapes: dict, status: tuple, facts: _Facts) -> Item:
    meta = shapes.get(node.name)
    return Item(node.name, node.op, _what(node, gm), str(meta) if meta is not None else "", status[0], status[1],
                facts.labels.get(status[1], ""), node.target if node.op == "call_module" else "")


def _tree(name: str, entries: list, kind: str) -> Side:
    root, index = Group("", "", kind), {}
    for item, stack in entries:
        parent = root
        for key, path, cls in stack:
            if key not in index:
                index[key] = Group(key, path, cls)
                parent.children.append(index[key])
            parent = index[key]
        parent.children.append(item)
        item.chain = tuple(key for key, _, _ in stack)
    return Side(name, root, [item for item, _ in entries])


def _group_status(group: Group, frozen: dict) -> str:
    statuses = set(group.counts())
    if len(statuses) == 1 and statuses <= {"deleted", "replaced", "inserted"}:
        return statuses.pop()
    return "frozen" if group.path in frozen else "kept"


def sides(result: SurgeryResult) -> tuple[Side, Side]:
    """The before and after graphs of `result`, each node and module group with its status."""
    if result.capture is not None and result.capture.kept:
        raise SaveError(f"the result keeps the class {type(result.module).__name__} and runs its own code, so there is no graph to draw; "
                        "fix: apply with keep_class=False to see the graphs before and after")
    if result.original is None or not isinstance(result.module, fx.GraphModule):
        opaque = ", ".join(p or "(the model)" for p in list(result.capture.opaque)[:3]) if result.capture is not None else ""
        raise SaveError(f"{f'part of the original stays Python ({opaque})' if opaque else 'the result has no graph of the whole original'}, "
                        "so there is no single graph to compare; fix: make the model traceable (leaf_paths=) or list what changed "
                        "with 'fxsurgery apply --explain'")
    facts, kind = _Facts(result), type(result.original.model).__name__
    after, made = [], {}
    for node in result.module.graph.nodes:
        item = _item(node, result.module, result.shapes, _after_status(node, facts), facts)
        fresh = node.name not in facts.before and item.rule in facts.site_paths
        after.append((item, _stack(node, facts.site_paths[item.rule] if fresh else None)))
        made[node.name] = item
    cut = set()   # original edges a detach now sits on
    for node in result.module.graph.nodes:
        item = made[node.name]
        item.inputs = [(u.name, made[u.name].status == "cut") for u in node.all_input_nodes]
        if item.status == "cut" and node.all_input_nodes:
            cut.update((node.all_input_nodes[0].name, user.name) for user in node.users)
    before = []
    for node in result.original.graph.nodes:
        item = _item(node, result.original.gm, result.original.shapes, _before_status(node, facts, made), facts)
        item.inputs = [(u.name, (u.name, node.name) in cut) for u in node.all_input_nodes]
        before.append((item, _stack(node, None)))
    out = _tree("before", before, kind), _tree("after", after, kind)
    for side in out:
        for group in side.root.groups():
            group.status = _group_status(group, facts.frozen)
    return out


# -- HTML ----------------------------------------------------------------------

def _status_css() -> str:
    css = [f'[data-status="{s}"]{{--c:{c};--bg:{c}1a}}' for s, c in COLOURS.items()]
    css += [f'[data-status="{t}"]{{--c:{COLOURS[s]};--bg:{COLOURS[s]}1a}}' for t, s in TENSOR_STATUS.items()]
    return "\n".join(css + [f"td.fz{{color:{COLOURS['frozen']}}}"])


def _node_html(item: Item) -> str:
    attrs = f' data-rule="{item.rule}" title="{esc(item.note)}"' if item.rule else ""
    attrs += f' data-module="{esc(item.target)}"' if item.target else ""
    edges = ", ".join(f'<span class="fxs-edge" data-from="{esc(u)}" data-status="{"cut" if c else "kept"}">{esc(u)}</span>'
                      for u, c in item.inputs)
    return (f'<div class="fxs-node" data-node="{esc(item.name)}" data-status="{item.status}" data-op="{item.op}"{attrs}>'
            f'<span class="n">{esc(item.name)}</span> <span class="t">{esc(item.what)}</span> <span class="s">{esc(item.shape)}</span>'
            + (f' <span class="in">&larr; {edges}</span>' if edges else "") + "</div>")


def _group_html(group: Group) -> str:
    counts = group.counts()
    badges = "".join(f'<span class="fxs-badge" data-status="{s}">{counts[s]} {s}</span>' for s in COLOURS if s != "kept" and counts[s])
    call = group.key[len(group.path):]   # '@1' for a second call of the same module
    # open where the rules changed structure; frozen alone reads from the summary
    is_open = " open" if any(counts[s] for s in _STRUCTURAL) or any(c for i in group.items() for _, c in i.inputs) else ""
    return (f'<details class="fxs-group" data-module="{esc(group.path)}" data-key="{esc(group.key)}" data-status="{group.status}"{is_open}>'
            f'<summary><span class="n">{esc(group.path)}{esc(call)}</span> <span class="t">{esc(group.kind)}</span> '
            f'<span class="fxs-count">{sum(counts.values())} nodes</span>{badges}</summary>'
            + "".join(_child_html(c) for c in group.children) + "</details>")


def _child_html(child) -> str:
    return _group_html(child) if isinstance(child, Group) else _node_html(child)


def _side_html(side: Side) -> str:
    groups = sum(1 for _ in side.root.groups())
    return (f'<section class="fxs-side" data-side="{side.name}"><h2>{side.name} <small>{len(side.items)} nodes, '
            f'{groups} module groups</small></h2>' + "".join(_child_html(c) for c in side.root.children) + "</section>")


def _row(cells, status: str | None = None, attrs: str = "") -> str:
    data = f' data-status="{status}"' if status else ""
    return f"<tr{data}{attrs}>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"


def _table(head, rows: list[str], cls: str) -> str:
    return (f'<table class="{cls}"><thead><tr>' + "".join(f"<th>{esc(h)}</th>" for h in head)
            + "</tr></thead><tbody>" + "".join(rows) + "</tbody></table>")


def _rules_html(result) -> str:
    rows = []
    for m in result.plan.matches:
        where = m.modules if m.rule.action == "freeze" else [s.key for s in m.sites]
        shown = ", ".join(where[:4]) + (f", ... (+{len(where) - 4})" if len(where) > 4 else "")
        attrs = f' data-rule="{m.index}" title="{esc(", ".join(where))}"'
        rows.append(_row([m.label, m.count, shown or m.reason], _RULE_STATUS[m.rule.action], attrs))
    return _table(("rule", "matches", "where"), rows, "fxs-rules")


def _why(entry, labels: dict) -> str:
    if entry.status == "new":
        return f"made by {labels.get(entry.rule, 'no rule')}" if entry.rule else "no rule declared it"
    if entry.status == "dropped":
        return "not used by the new module"
    if entry.source in (None, entry.name):   # a plain copy says nothing a row needs to repeat
        return entry.op
    return f"{entry.op} from {entry.source}".strip()


def _report_html(result) -> str:
    report, order = result.report, list(TENSOR_STATUS)
    per_module: dict[str, Counter] = {}
    for e in report.entries:
        counts = per_module.setdefault(e.name.split(".")[0] if "." in e.name else "(root)", Counter())
        counts.update({e.status: 1, "frozen": int(e.frozen)})
    heads = ("transferred", "adapted", "new", "dropped", "frozen")
    summary = [_row([top, *(c[h] for h in heads)]) for top, c in per_module.items()]
    summary.append(_row(["total", *(report.counts()[h] for h in heads)], attrs=' class="fxs-total"'))
    tensors = []
    for e in sorted(report.entries, key=lambda e: order.index(e.status) if e.status != "transferred" else len(order)):
        why = _why(e, report.rules)
        tensors.append(f'<tr class="fxs-tensor" data-tensor="{esc(e.name)}" data-status="{e.status}" data-frozen="{str(e.frozen).lower()}">'
                       f'<td>{esc(e.name)}' + (f'<div class="why">{esc(why)}</div>' if why else "") + f'</td><td class="st">{e.status}</td>'
                       f'<td>{esc(shape_text(e.shape))} {esc(e.dtype)}</td><td class="fz">{"frozen" if e.frozen else ""}</td></tr>')
    extra = [f"<li>{esc(c)}</li>" for c in result.input_changes] + [f"<li>{esc(w)}</li>" for w in result.plan.warnings]
    return ('<aside class="fxs-report"><h2>rules</h2>' + _rules_html(result)
            + (f'<ul class="fxs-notes">{"".join(extra)}</ul>' if extra else "")
            + '<h2>transfer report</h2>' + _table(("module", *heads), summary, "fxs-counts")
            + '<div class="fxs-scroll">' + _table(("tensor", "status", "shape", "frozen"), tensors, "fxs-tensors")
            + "</div></aside>")


def _header(title: str, before: Side, after: Side) -> str:
    legend = "".join(f'<li class="fxs-key" data-status="{s}"><b>{s}</b>: {esc(MEANING[s])}</li>' for s in COLOURS)
    def line(side):
        counts = Counter(i.status for i in side.items)
        return f"{side.name}: {len(side.items)} nodes (" + ", ".join(f"{counts[s]} {s}" for s in COLOURS) + ")"
    return (f'<header><h1>{esc(title)}</h1><p class="fxs-summary">{esc(line(before))}; {esc(line(after))}</p>'
            f'<ul class="fxs-legend">{legend}</ul><div class="fxs-tools"><button id="fxs-expand" type="button">expand all</button>'
            '<button id="fxs-collapse" type="button">collapse all</button><label><input id="fxs-changes" type="checkbox"> '
            'changes only</label> <span id="fxs-status" class="fxs-summary"></span></div></header>')


def _title(result) -> str:
    return f"fxsurgery diff: {type(result.original.model).__name__}, {len(result.plan.matches)} rules"


def render_html(result: SurgeryResult) -> str:
    """One self-contained HTML page: before and after side by side, and the transfer report."""
    before, after = sides(result)
    title = _title(result)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{csp()}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{esc(title)}</title>'
            f"<style>{CSS}{_status_css()}</style></head><body>" + _header(title, before, after)
            + '<main class="fxs-diff">' + _side_html(before) + _side_html(after) + _report_html(result)
            + f"</main><script>{JS}</script></body></html>\n")


# -- SVG and files -------------------------------------------------------------

def render_svg(result: SurgeryResult) -> str:
    """The same as a standalone SVG drawing: legend, before, after, rules and report."""
    before, after = sides(result)
    notes = [(f"{m.label}: {m.count} matched", _RULE_STATUS[m.rule.action]) for m in result.plan.matches]
    notes += [(str(line), None) for line in [*result.input_changes, *result.plan.warnings, "", "transfer report:"]]
    # the report's tensor lines start with their status, which picks their colour
    notes += [(line, TENSOR_STATUS.get(line.split()[0]) if line.startswith("  ") else None)
              for line in result.report.table().splitlines()]
    return draw(_title(result), [before, after], COLOURS, MEANING, notes)
