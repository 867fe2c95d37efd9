"""The dependency groups of a model (`fxsurgery inspect --groups`): which layers lose channels together.

One row per group: the Conv/Linear layers whose outputs hold its channels
(select any of them with Prune), how many channels, how many tensor axes a
prune slices, and the layers that read them; or why the group cannot be
pruned exactly (the node and the reason).
"""

from __future__ import annotations

from .._util import format_table
from ..capture import Capture
from ..match import Group, groups


def dependency_groups(capture: Capture) -> list[dict]:
    """Every group of every captured graph, as data (see the module docstring)."""
    out = []
    for region in capture.regions:
        modules = dict(region.gm.named_modules())
        prefix = f"{region.path}." if region.path else ""
        for names, found in groups(region.graph, modules, region.shapes):
            targets = {n.name: n.target for n in region.graph.nodes}
            layers = [prefix + targets[n] for n in names]
            row = {"layers": layers}
            if isinstance(found, Group):
                readers = [prefix + s.target for s in found.slices.values() if not s.source and s.param == "weight"]
                row.update(channels=found.width, tensors=len(found.slices), readers=list(dict.fromkeys(readers)),
                           refused=None)
            else:
                row.update(channels=None, tensors=0, readers=[], refused=f"node '{found.node}': {found.reason}")
            out.append(row)
    return out


def groups_table(rows: list[dict]) -> str:
    table = [("#", "layers", "channels", "tensors", "read by / refused")]
    for i, r in enumerate(rows, start=1):
        layers = ", ".join(r["layers"][:3]) + (f", ... (+{len(r['layers']) - 3})" if len(r["layers"]) > 3 else "")
        if r["refused"]:
            tail = f"refused: {r['refused']}"
        else:
            tail = ", ".join(r["readers"][:3]) + (f", ... (+{len(r['readers']) - 3})" if len(r["readers"]) > 3 else "")
        table.append((str(i), layers, str(r["channels"] or "-"), str(r["tensors"] or "-"), tail or "-"))
    ok = sum(1 for r in rows if not r["refused"])
    return f"{len(rows)} dependency groups, {ok} prunable\n" + format_table(table)


def pruned_modules(report, actions: dict) -> dict[str, tuple]:
    """Module path -> ("replaced", rule) for each module whose tensors a Prune rule sliced (for the diff view)."""
    return {e.name.rpartition(".")[0]: ("replaced", e.rule) for e in report.entries
            if e.status == "adapted" and actions.get(e.rule) == "prune"}
