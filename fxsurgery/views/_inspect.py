"""What a model is made of, as fxsurgery sees it: the `inspect` command."""

from __future__ import annotations

from collections import Counter

from torch.utils import _pytree as pytree

from .._util import format_table
from ..capture import Capture, Meta
from ..match import Locator


def _first_tensor(tree) -> str:
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, Meta) and leaf.is_tensor:
            return str(leaf)
    return ""


def _state(capture: Capture, path: str, sites) -> str:
    if path in capture.opaque:
        return "opaque"
    if any(s.region is not None for s in sites):
        return "graph"
    return "python" if path in capture.calls else "unused"


def _containers(rows: list[dict], capture: Capture) -> None:
    """A module never called itself whose modules run (a graph calls `layer1.0.conv1`, not `layer1`, once
    saved and loaded) holds them: "container", not "unused"; one whose tensors the graph reads (GPT-2's
    Conv1D traced through, then saved) is "weights", not "unused"."""
    read = {str(n.target).rpartition(".")[0] for r in capture.regions for n in r.graph.nodes if n.op == "get_attr"}
    for r in rows:
        if r["runs"] == "unused" and r["path"] in read:
            r["runs"] = "weights"
    above = set()
    for r in rows:
        if r["runs"] != "unused":
            parts = r["path"].split(".")
            above.update(".".join(parts[:i]) for i in range(1, len(parts)))
    for r in rows:
        if r["runs"] == "unused" and r["path"] in above:
            r["runs"] = "container"
    # a graph calls a leaf (nn.TransformerEncoder) as one module: what is inside it runs with it (not so inside a
    # module traced through, whose unused children stay unused)
    called = {f"{r.path}.{n.target}" if r.path else str(n.target) for r in capture.regions for n in r.graph.nodes if n.op == "call_module"}
    leaves = [r["path"] + "." for r in rows if r["runs"] == "graph" and r["path"] in called]
    for r in rows:
        if r["runs"] == "unused" and any(r["path"].startswith(leaf) for leaf in leaves):
            r["runs"] = "in leaf"


def overview(capture: Capture) -> dict:
    """Modules (path, type, output shape, parameters, calls, where they run) and graph counts."""
    locator = Locator(capture)
    regions = {r.path: r for r in capture.regions}
    rows = []
    for path, module in capture.model.named_modules():
        if not path:
            continue
        sites = locator.module_sites(path, boundary=True)
        output, calls = "", len(sites)
        graph_site = next((s for s in sites if s.region is not None), None)
        if graph_site is not None and graph_site.output:
            meta = regions[graph_site.region].shapes.get(graph_site.output)
            output = str(meta) if meta is not None else ""
        elif path in capture.calls:
            output, calls = _first_tensor(capture.calls[path].output), capture.calls[path].count
        params = list(module.parameters())
        rows.append({
            "path": path, "type": type(module).__name__, "output": output,
            "parameters": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "calls": calls, "runs": _state(capture, path, sites),
        })
    _containers(rows, capture)
    ops = Counter(n.op for r in capture.regions for n in r.graph.nodes)
    seen, total, trainable = set(), 0, 0
    for p in capture.model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    inputs = {}
    if capture.complete:
        inputs = {name: str(capture.regions[0].shapes.get(name, "")) for name in capture.regions[0].input_names()}
    return {"class": type(capture.model).__name__, "modules": rows, "nodes": sum(ops.values()),
            "ops": dict(ops), "parameters": total, "trainable": trainable, "inputs": inputs,
            "coverage": capture.coverage(),
            "specialised": {name: {str(d): why for d, why in dims.items()} for name, dims in capture.specialised().items()}}


def overview_table(info: dict, depth: int | None = None) -> str:
    rows = [("module", "type", "output", "params", "calls", "runs as")]
    for r in info["modules"]:
        if depth is not None and r["path"].count(".") >= depth:
            continue
        rows.append((r["path"], r["type"], r["output"], f"{r['parameters']:,}", str(r["calls"]), r["runs"]))
    ops = ", ".join(f"{k} {v}" for k, v in info["ops"].items())
    coverage = info["coverage"]
    if not coverage["opaque"]:
        how = "traced completely"
    else:
        how = (f"{len(coverage['traced'])} graphs hold {coverage['traced_share']:.0%} of the parameters; "
               f"{len(coverage['opaque'])} modules stay Python")
    head = (f"{info['class']}: {info['parameters']:,} parameters ({info['trainable']:,} trainable), "
            f"{info['nodes']} graph nodes ({ops}); {how}")
    lines = [head, format_table(rows)]
    for path, why in coverage["opaque"].items():
        lines.append(f"  opaque {path or '(the model)'}: {why}")
    for name, dims in info.get("specialised", {}).items():  # every other input dim stays general
        for dim, why in dims.items():
            lines.append(f"  specialised dim {dim} of input '{name}': {why}")
    return "\n".join(lines)
