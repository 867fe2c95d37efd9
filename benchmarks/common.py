"""What every benchmark shares: the machine record, interleaved timing, medians, JSON.

The machine these run on is shared and noisy, so no absolute time is a
result: every figure is a ratio of two things measured in the same process,
interleaved (baseline and candidate alternate, their order rotating each
round), repeated, and reduced to medians.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

Stages = dict[str, float]  # stage name -> seconds


def cpu_model() -> str:
    """The CPU's marketing name (/proc/cpuinfo), else whatever platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Where a figure was measured: CPU, cores, threads, versions, and how busy the machine was."""
    import torchvision

    import fxsurgery

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    record = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": cores,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "fxsurgery": fxsurgery.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        # other work on the machine shows up here; ratios are meant to survive it
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return record


def clock(fn: Callable[[], object]) -> Stages:
    """Run `fn` once. A callable that times its own stages returns them as a dict."""
    gc.collect()  # a collection owed by the previous run is not this run's cost
    start = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - start
    if isinstance(out, dict):
        stages = {k: float(v) for k, v in out.items()}
        stages.setdefault("total", sum(stages.values()))
        return stages
    return {"total": elapsed}


def interleave(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[Stages]]:
    """Each round runs every candidate once, starting one further along each round,
    so slow drift of the machine falls on all of them alike."""
    names = list(candidates)
    runs: dict[str, list[Stages]] = {n: [] for n in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(i + r) % len(names)]
            runs[name].append(clock(candidates[name]))
    return runs


def medians(runs: list[Stages]) -> Stages:
    """Per-stage median over the repeats."""
    keys = list(runs[0])
    return {k: statistics.median(r[k] for r in runs) for k in keys}


def ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def fit_exponent(sizes: list[float], times: list[float]) -> float | None:
    """Least-squares slope of log(time) against log(size): t ~ size ** slope."""
    pts = [(math.log(s), math.log(t)) for s, t in zip(sizes, times) if s > 0 and t and t > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else None


def write_json(out_dir: Path, name: str, payload: dict) -> Path:
    """Write `name.json` (atomically: a half-written result is worse than none)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def read_json(out_dir: Path, name: str) -> dict | None:
    path = Path(out_dir) / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def log(*parts) -> None:
    print("[bench]", *parts, flush=True)
