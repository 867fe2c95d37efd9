"""Benchmark 1: the six-rule surgery end to end, per stage, against bare torch.fx tracing and torch.export.

For each model, rounds alternate `torch.fx.symbolic_trace(model)`,
`torch.export.export(model, inputs)` and the stages of fxs.apply (capture,
match, rewrite, validate, transfer, check) on the same model in the same
process. The figures of merit, median over models: the whole surgery over the
trace time (goal <= 3x) and over the export time where torch.export exports
the model (goal <= 0.5x). The engine's work beyond tracing, (pipeline -
trace) / trace, is kept beside them.
"""

from __future__ import annotations

import statistics
import traceback
import warnings

import torch

from fxsurgery._progress import bar

from .common import interleave, log, medians, ratio
from .models import build, selected, six_rules
from .recipe import STAGES, run_stages

GOAL_TRACE = 3.0   # the whole surgery, as a multiple of symbolic_trace's time
GOAL_EXPORT = 0.5  # the whole surgery, as a multiple of torch.export's time


def _exporter(model, inputs):
    """`torch.export.export` on the model, or None where it cannot export it (the baseline then has no row)."""
    try:
        torch.export.export(model, inputs)
    except Exception:
        return None
    return lambda: torch.export.export(model, inputs)


def _warm_up() -> None:
    """One untimed surgery first: imports and one-off caches are not any model's cost."""
    from .models import BY_NAME

    model, inputs = build(BY_NAME["resnet18"])
    run_stages(model, six_rules(BY_NAME["resnet18"]), inputs)
    torch.fx.symbolic_trace(model)


def measure_model(surgery, repeats: int) -> dict:
    model, inputs = build(surgery)
    rules = six_rules(surgery)
    nodes = len(torch.fx.symbolic_trace(model).graph.nodes)
    candidates = {"fx_trace": lambda: torch.fx.symbolic_trace(model),
                  "fxsurgery": lambda: run_stages(model, rules, inputs)}
    export = _exporter(model, inputs)
    if export is not None:
        candidates["export"] = export
    runs = interleave(candidates, repeats)
    trace = medians(runs["fx_trace"])["total"]
    exported = medians(runs["export"])["total"] if export is not None else None
    stages = medians(runs["fxsurgery"])
    total = stages["total"]
    return {
        "model": surgery.name,
        "input": [1, 3, surgery.size, surgery.size],
        "nodes": nodes,
        "parameters": sum(p.numel() for p in model.parameters()),
        "repeats": repeats,
        "fx_trace_s": trace,
        "export_s": exported,
        "stages_s": {k: stages[k] for k in STAGES},
        "pipeline_s": total,
        "pipeline_over_trace": ratio(total, trace),
        "overhead_over_trace": ratio(total - trace, trace),
        "pipeline_over_export": ratio(total, exported) if exported else None,
        "all_runs": {k: [r["total"] for r in v] for k, v in runs.items()},
    }


def run(quick: bool = False, repeats: int | None = None, models: list[str] | None = None) -> dict:
    repeats = repeats or (1 if quick else 3)
    warnings.simplefilter("ignore")  # torchvision's init warnings would drown the log
    _warm_up()
    rows, failed = [], []
    chosen = selected(quick, models)
    for surgery in bar(chosen, "pipeline", total=len(chosen), unit="model"):
        try:
            row = measure_model(surgery, repeats)
        except Exception as exc:  # a model that fails is a finding, not the end of the run
            failed.append({"model": surgery.name, "error": f"{type(exc).__name__}: {exc}",
                           "where": traceback.format_exc().strip().splitlines()[-3:]})
            log(f"pipeline {surgery.name}: FAILED {type(exc).__name__}: {str(exc)[:200]}")
            continue
        rows.append(row)
        log(f"pipeline {surgery.name}: trace {row['fx_trace_s']:.3f}s export "
            f"{'-' if row['export_s'] is None else format(row['export_s'], '.3f') + 's'} pipeline {row['pipeline_s']:.3f}s "
            f"= {row['pipeline_over_trace']:.1f}x trace")
    overheads = [r["overhead_over_trace"] for r in rows if r["overhead_over_trace"] is not None]
    over_export = [r["pipeline_over_export"] for r in rows if r["pipeline_over_export"] is not None]
    shares = {s: statistics.median(r["stages_s"][s] / r["pipeline_s"] for r in rows) for s in STAGES} if rows else {}
    return {
        "benchmark": "pipeline",
        "goal": {"pipeline_over_trace_median_max": GOAL_TRACE, "pipeline_over_export_median_max": GOAL_EXPORT},
        "rules": ["replace HEAD with fxs.new(Linear|Conv2d, out=10)", "freeze * except LAST_STAGE, HEAD",
                  "detach after CUT", "insert Dropout(0.2) before HEAD",
                  "replace nn.ReLU with GELU (optional)", "delete a shape-preserving module"],
        "models": rows,
        "failed": failed,
        "summary": {
            "models": len(rows),
            "overhead_over_trace_median": statistics.median(overheads) if overheads else None,
            "pipeline_over_trace_median": statistics.median(r["pipeline_over_trace"] for r in rows) if rows else None,
            "exported_models": len(over_export),
            "pipeline_over_export_median": statistics.median(over_export) if over_export else None,
            "stage_share_median": shares,
        },
    }
