"""The dependency groups of a model (`fxsurgery inspect --groups`): which layers lose channels together.

One row per group: the Conv/Linear layers whose outputs hold its channels
(select any of them with Prune), how many channels, how many tensor axes a
prune slices, and the layers that read them; or why the group cannot be
pruned exactly (the node and the reason). Then one row per attention module
whose heads `Prune(sel, heads=[...])` removes: its head count and size, or why
its heads cannot be removed exactly.
"""

from __future__ import annotations

from .._util import format_table
from ..capture import Capture
from ..match import Group, Unprunable, groups, heads_of


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
    return out + attention_heads(capture.model)


def attention_heads(model) -> list[dict]:
    """One row per attention module of a known layout (match/_heads.py), outermost only: `layers` is the
    module to select, `heads` how many heads= counts (key/value heads), `group` the query heads per head."""
    rows, found = [], []
    for path, module in model.named_modules():
        if any(path.startswith(f"{f}.") for f in found):
            continue  # a part of an attention module already listed (BERT's `attention.self`)
        try:
            heads = heads_of(module, path)
        except Unprunable as exc:
            rows.append({"layers": [path], "heads": None, "head_dim": None, "group": None, "tensors": 0,
                         "refused": f"node '{exc.node}': {exc.reason}"})
            found.append(path)
            continue
        if heads is not None:
            rows.append({"layers": [path], "heads": heads.heads, "head_dim": heads.head_dim, "group": heads.group,
                         "tensors": len(heads.slices), "refused": None})
            found.append(path)
    return rows


def groups_table(rows: list[dict]) -> str:
    channels = [r for r in rows if "heads" not in r]
    table = [("#", "layers", "channels", "tensors", "read by / refused")]
    for i, r in enumerate(channels, start=1):
        layers = ", ".join(r["layers"][:3]) + (f", ... (+{len(r['layers']) - 3})" if len(r["layers"]) > 3 else "")
        if r["refused"]:
            tail = f"refused: {r['refused']}"
        else:
            tail = ", ".join(r["readers"][:3]) + (f", ... (+{len(r['readers']) - 3})" if len(r["readers"]) > 3 else "")
        table.append((str(i), layers, str(r["channels"] or "-"), str(r["tensors"] or "-"), tail or "-"))
    ok = sum(1 for r in channels if not r["refused"])
    text = f"{len(channels)} dependency groups, {ok} prunable\n" + format_table(table)
    attention = [r for r in rows if "heads" in r]
    if attention:
        table = [("#", "attention module", "heads", "head size", "tensors", "refused")]
        for i, r in enumerate(attention, start=1):
            heads = "-" if r["heads"] is None else str(r["heads"]) + (f" (x{r['group']} query)" if r["group"] > 1 else "")
            table.append((str(i), r["layers"][0], heads, str(r["head_dim"] or "-"), str(r["tensors"] or "-"),
                          f"refused: {r['refused']}" if r["refused"] else "-"))
        ok = sum(1 for r in attention if not r["refused"])
        text += (f"\n\n{len(attention)} attention modules, {ok} with heads Prune(sel, heads=[...]) can remove\n"
                 + format_table(table))
    return text


def pruned_modules(report, actions: dict) -> dict[str, tuple]:
    """Module path -> ("replaced", rule) for each module whose tensors a Prune rule sliced (for the diff view)."""
    return {e.name.rpartition(".")[0]: ("replaced", e.rule) for e in report.entries
            if e.status == "adapted" and actions.get(e.rule) == "prune"}
