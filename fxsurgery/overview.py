"""What a model is made of, as the graph sees it: the `inspect` command."""

from __future__ import annotations

from collections import Counter

from .match import GraphIndex, format_table
from .trace import Captured


def overview(captured: Captured) -> dict:
    """Modules (path, type, output shape, parameters, calls) and graph counts."""
    index = GraphIndex(captured)
    leaves = {n.target for n in captured.graph.nodes if n.op == "call_module"}
    rows = []
    for path, module in captured.model.named_modules():
        if not path:
            continue
        params = list(module.parameters())
        sites = index.module_sites(path)
        out = captured.shapes.get(sites[0].output) if sites and sites[0].output else None
        rows.append({
            "path": path,
            "type": type(module).__name__,
            "output": str(out) if out is not None else "",
            "parameters": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "calls": len(sites),
            "leaf": path in leaves,
        })
    ops = Counter(n.op for n in captured.graph.nodes)
    seen, total, trainable = set(), 0, 0
    for p in captured.model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return {"class": type(captured.model).__name__, "modules": rows, "nodes": sum(ops.values()),
            "ops": dict(ops), "parameters": total, "trainable": trainable, "traced": True,
            "inputs": {name: str(captured.shapes.get(name, "")) for name in captured.input_names()}}


def overview_table(info: dict, depth: int | None = None) -> str:
    rows = [("module", "type", "output", "params", "calls")]
    for r in info["modules"]:
        if depth is not None and r["path"].count(".") >= depth:
            continue
        rows.append((r["path"], r["type"], r["output"], f"{r['parameters']:,}", str(r["calls"])))
    ops = ", ".join(f"{k} {v}" for k, v in info["ops"].items())
    head = (f"{info['class']}: {info['parameters']:,} parameters ({info['trainable']:,} trainable), "
            f"{info['nodes']} graph nodes ({ops}); traced completely")
    return head + "\n" + format_table(rows)
