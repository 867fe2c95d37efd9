"""Benchmark 2: how the pipeline's time grows with the graph, beside torch.fx's replace_pattern.

Synthetic chains of residual blocks, `x + relu(Linear(8, 8)(x))`: three graph
nodes per block, so N nodes is N/3 blocks. Two spellings of the same model:
- `module`: the activation is an nn.ReLU module, swapped by type
  (Replace(nn.ReLU, nn.GELU())): the full pipeline and the swap itself
  (match + rewrite) are timed;
- `function`: the activation is an F.relu call. torch.fx's replace_pattern
  matches calls, not module types, so the side-by-side uses this spelling on
  both sides: fxsurgery's Replace(F.relu, F.gelu) against
  replace_pattern(gm, F.relu pattern, F.gelu replacement) on a symbolic_trace
  of the same model. Both sides' outputs are counted (GELU calls) to show the
  two did the same edit.
The `two_users` case is the shape from the issue (12k nodes, each relu output
read twice: `h = relu(lin(x)); h + lin2(h)`), swapped three ways: Replace of
the function, the SwapActivation pattern rule, and replace_pattern.

A measurement whose predicted time (from the sizes before it) exceeds the
budget is skipped and recorded as such, not silently dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx import subgraph_rewriter

from fxsurgery import Replace, Rewrite, SwapActivation

from .common import fit_exponent, interleave, log, medians
from .recipe import STAGES, run_stages

SIZES = (1000, 4000, 16000, 64000)
QUICK_SIZES = (1000, 4000)
TWO_USERS_NODES = 12000
GOAL = 1.1  # log-log exponent of time against nodes


class ModuleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.act = nn.ReLU()

    def forward(self, x):
        return x + self.act(self.lin(x))


class FunctionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return x + F.relu(self.lin(x))


class TwoUsersBlock(nn.Module):
    """Each relu output has two users (lin2 and the add): four nodes per block."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.lin2 = nn.Linear(8, 8)

    def forward(self, x):
        h = F.relu(self.lin(x))
        return h + self.lin2(h)


def chain(block: type, nodes: int, per_block: int = 3) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[block() for _ in range(max(1, nodes // per_block))]).eval()


def _pattern(x):
    return F.relu(x)


def _replacement(x):
    return F.gelu(x)


def _gelu_calls(gm: nn.Module) -> int:
    graph = getattr(gm, "graph", None)
    return sum(1 for n in graph.nodes if n.target is F.gelu) if graph is not None else 0


def _fx_side(model: nn.Module, out: list):
    """torch.fx by hand: symbolic_trace then replace_pattern (which recompiles), each timed."""
    import time

    t0 = time.perf_counter()
    gm = fx.symbolic_trace(model)
    t1 = time.perf_counter()
    subgraph_rewriter.replace_pattern(gm, _pattern, _replacement)
    t2 = time.perf_counter()
    out[:] = [gm]
    return {"trace": t1 - t0, "replace_pattern": t2 - t1}


def _fxs_side(model: nn.Module, rules, inputs, out: list):
    out.clear()
    stages = run_stages(model, rules, inputs, keep=out)
    stages["total"] = sum(stages.values())  # before "swap", which repeats two stages
    stages["swap"] = stages["match"] + stages["rewrite"]
    return stages


class Budget:
    """Skip a measurement predicted to take longer than `seconds` (from the sizes before it)."""

    def __init__(self, seconds: float):
        self.seconds, self.seen = seconds, {}

    def predict(self, name: str, nodes: int) -> float | None:
        pts = self.seen.get(name, [])
        if not pts:
            return None
        exp = fit_exponent([p[0] for p in pts[-2:]], [p[1] for p in pts[-2:]]) if len(pts) > 1 else 1.0
        n0, t0 = pts[-1]
        return t0 * (nodes / n0) ** max(exp or 1.0, 1.0)

    def allows(self, name: str, nodes: int, repeats: int) -> tuple[bool, float | None]:
        p = self.predict(name, nodes)
        return (p is None or p * repeats <= self.seconds), p

    def record(self, name: str, nodes: int, seconds: float) -> None:
        self.seen.setdefault(name, []).append((nodes, seconds))


def _repeats(nodes: int, quick: bool) -> int:
    if quick:
        return 1
    return 5 if nodes <= 1000 else 3 if nodes <= 4000 else 2 if nodes <= 16000 else 1


def measure_size(nodes: int, repeats: int, budget: Budget) -> dict:
    inputs = (torch.randn(1, 8),)
    by_module, by_function = chain(ModuleBlock, nodes), chain(FunctionBlock, nodes)
    kept = {"fxs_module": [], "fxs_function": [], "fxs_pattern": [], "fx_function": []}
    candidates = {
        "fx_trace": lambda: fx.symbolic_trace(by_module),
        "fxs_module": lambda: _fxs_side(by_module, [Replace(nn.ReLU, nn.GELU())], inputs, kept["fxs_module"]),
        "fxs_function": lambda: _fxs_side(by_function, [Replace(F.relu, F.gelu)], inputs, kept["fxs_function"]),
        "fxs_pattern": lambda: _fxs_side(by_function, [Rewrite(SwapActivation(to=nn.GELU, of=F.relu))], inputs,
                                         kept["fxs_pattern"]),
        "fx_function": lambda: _fx_side(by_function, kept["fx_function"]),
    }
    skipped = {}
    for name in list(candidates):
        ok, predicted = budget.allows(name, nodes, repeats)
        if not ok:
            skipped[name] = f"predicted {predicted:.0f} s a run (x{repeats}) is over the {budget.seconds:.0f} s budget"
            del candidates[name]
    runs = interleave(candidates, repeats)
    row = {"nodes_requested": nodes, "nodes": len(fx.symbolic_trace(by_module).graph.nodes),
           "repeats": repeats, "skipped": skipped, "median_s": {}, "replaced": {}}
    for name, rs in runs.items():
        row["median_s"][name] = medians(rs)
        budget.record(name, nodes, row["median_s"][name]["total"])
    if kept["fxs_module"]:
        row["replaced"]["fxs_module"] = sum(isinstance(m, nn.GELU) for m in kept["fxs_module"][0].modules())
    for name in ("fxs_function", "fxs_pattern", "fx_function"):
        if kept[name]:
            row["replaced"][name] = _gelu_calls(kept[name][0])
    return row


def measure_two_users(nodes: int, repeats: int) -> dict:
    """The issue's shape: replace_pattern was quoted at 14.2 s for 12k nodes."""
    model, inputs = chain(TwoUsersBlock, nodes, per_block=4), (torch.randn(1, 8),)
    kept = {"fxs_function": [], "fxs_pattern": [], "fx_function": []}
    runs = interleave({
        "fxs_function": lambda: _fxs_side(model, [Replace(F.relu, F.gelu)], inputs, kept["fxs_function"]),
        "fxs_pattern": lambda: _fxs_side(model, [Rewrite(SwapActivation(to=nn.GELU, of=F.relu))], inputs, kept["fxs_pattern"]),
        "fx_function": lambda: _fx_side(model, kept["fx_function"]),
    }, repeats)
    med = {k: medians(v) for k, v in runs.items()}
    return {"nodes": len(fx.symbolic_trace(model).graph.nodes), "repeats": repeats, "median_s": med,
            "replaced": {k: _gelu_calls(v[0]) for k, v in kept.items()},
            "swap_fxs_over_replace_pattern": med["fxs_function"]["swap"] / med["fx_function"]["replace_pattern"],
            "pattern_swap_over_replace_pattern": med["fxs_pattern"]["swap"] / med["fx_function"]["replace_pattern"],
            "end_to_end_fxs_over_fx": med["fxs_function"]["total"] / med["fx_function"]["total"]}


def _exponents(rows: list[dict]) -> dict:
    series = {
        "fxs_pipeline": ("fxs_module", "total"), "fxs_type_swap": ("fxs_module", "swap"),
        "fxs_function_swap": ("fxs_function", "swap"), "fxs_pattern_swap": ("fxs_pattern", "swap"),
        "fx_replace_pattern": ("fx_function", "replace_pattern"),
        "fx_trace": ("fx_trace", "total"),
    }
    out = {}
    for label, (name, stage) in series.items():
        pts = [(r["nodes"], r["median_s"][name][stage]) for r in rows if name in r["median_s"]]
        out[label] = {"exponent": fit_exponent([p[0] for p in pts], [p[1] for p in pts]), "points": len(pts)}
    return out


def run(quick: bool = False, sizes: tuple[int, ...] | None = None, budget_s: float | None = None,
        two_users: bool | None = None) -> dict:
    sizes = tuple(sizes or (QUICK_SIZES if quick else SIZES))
    budget = Budget(budget_s or (60.0 if quick else 420.0))
    run_stages(chain(ModuleBlock, 60), [Replace(nn.ReLU, nn.GELU())], (torch.randn(1, 8),))  # warm-up
    rows = []
    for nodes in sizes:
        row = measure_size(nodes, _repeats(nodes, quick), budget)
        rows.append(row)
        m = row["median_s"]
        log(f"scaling {row['nodes']} nodes: " + ", ".join(f"{k} {v['total']:.2f}s" for k, v in m.items())
            + (f" skipped {list(row['skipped'])}" if row["skipped"] else ""))
    result = {
        "benchmark": "scaling",
        "goal": {"exponent_max": GOAL},
        "model": "chain of x + relu(Linear(8, 8)(x)) blocks, 3 nodes each; input [1, 8]",
        "stages": list(STAGES) + ["swap"],
        "sizes": rows,
        "exponents": _exponents(rows),
    }
    if two_users is None:
        two_users = not quick
    if two_users:
        result["two_users"] = measure_two_users(TWO_USERS_NODES, 1 if quick else 2)
        t = result["two_users"]
        log(f"scaling two_users {t['nodes']} nodes: replace_pattern {t['median_s']['fx_function']['replace_pattern']:.2f}s, "
            f"fxsurgery swap {t['median_s']['fxs_function']['swap']:.2f}s, pattern rule {t['median_s']['fxs_pattern']['swap']:.2f}s")
    return result
