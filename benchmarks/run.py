"""Run the benchmarks, write one JSON per benchmark and a PNG, then check the goals.

    python -m benchmarks.run --out benchmarks/results            # everything (tens of minutes)
    python -m benchmarks.run --quick                             # a short version
    python -m benchmarks.run --only scaling --sizes 1000         # one benchmark, smaller
    python -m benchmarks.check benchmarks/results                # which goals hold

Benchmarks: pipeline, scaling, transfer (vit_l_16), transfer_large (a 2.15 GB
synthetic model, with streaming from a sharded checkpoint), module_speed
(with the conv+bn fold speed-up, and the GPU comparison where
torch.cuda.is_available()), capture_dynamic (capture time with guards on
size decisions against guards on whole input shapes).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a file (python benchmarks/NAME.py): import as the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from .common import log, machine, write_json

NAMES = ("pipeline", "scaling", "transfer", "transfer_large", "module_speed", "capture_dynamic")


def _csv(text: str) -> list[str]:
    return [t for t in text.split(",") if t]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results", help="directory for the JSON and PNG")
    p.add_argument("--quick", action="store_true", help="fewer repeats, lighter models, smaller graphs")
    p.add_argument("--only", action="append", type=_csv, metavar="NAME[,NAME]",
                   help=f"run only these ({', '.join(NAMES)}); repeatable")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (1: the machine is shared, fewer threads, less noise)")
    p.add_argument("--repeats", type=int, help="rounds per measurement (default: per benchmark)")
    p.add_argument("--models", type=_csv, help="pipeline: torchvision names; module_speed: its model keys")
    p.add_argument("--sizes", type=_csv, help="scaling: node counts, e.g. 1000,4000")
    p.add_argument("--budget", type=float, help="scaling: skip a measurement predicted to take longer (s)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--no-check", action="store_true")
    args = p.parse_args(argv)
    args.only = [n for group in args.only for n in group] if args.only else list(NAMES)
    unknown = [n for n in args.only if n not in NAMES]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    return args


def _run_one(name: str, args) -> dict:
    if name == "pipeline":
        from . import pipeline_latency
        from .models import BY_NAME
        return pipeline_latency.run(args.quick, args.repeats, _known(args.models, BY_NAME))
    if name == "scaling":
        from . import scaling
        sizes = tuple(int(s) for s in args.sizes) if args.sizes else None
        return scaling.run(args.quick, sizes, args.budget)
    if name in ("transfer", "transfer_large"):
        from . import transfer_memory
        model = transfer_memory.SYNTHETIC if name == "transfer_large" else None
        return transfer_memory.run(args.quick, args.repeats, model=model, threads=args.threads)
    if name == "capture_dynamic":
        from . import capture_dynamic
        return capture_dynamic.run(args.quick, args.repeats, _known(args.models, capture_dynamic.MODELS))
    from . import module_speed
    return module_speed.run(args.quick, args.repeats, _known(args.models, module_speed.MODELS))


def _known(names: list[str] | None, table) -> list[str] | None:
    """--models names one list for two benchmarks: each takes the names it knows."""
    if not names:
        return None
    return [n for n in names if n in table] or None


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    for name in args.only:
        log(f"{name}: start{' (quick)' if args.quick else ''}")
        start = time.perf_counter()
        result = _run_one(name, args)
        result["machine"] = machine()  # after the run: the load average says how busy it was
        result["quick"] = args.quick
        result["wall_s"] = time.perf_counter() - start
        log(f"{name}: done in {result['wall_s']:.0f}s -> {write_json(out, name, result)}")
    if not args.no_plot:
        from .plot import plot
        path = plot(out)
        if path:
            log(f"plot -> {path}")
    if not args.no_check:
        from .check import check
        check(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
