"""Benchmark: loading a saved directory against safetensors and module construction.

A ~1 GB model (Linear(4096, 4096) x 16, float32) goes through fxs.apply and
result.save; then, rounds interleaved in one process:
- `fxs_load`: `fxs.load(DIR)` (graph.json rebuilt against the allowlist, the
  record's sha256 over model.py, graph.json and the weights checked);
- `fxs_load_unverified`: `fxs.load(DIR, verify=False)`, the same without the hash;
- `baseline`: the same module built on meta and `load_state_dict(load_file(...),
  assign=True)`, the weights from a plain copy of the same tensors;
- `digest`: the record's hash alone, the part of a load that reads every byte
  (safetensors maps the file and reads nothing until a tensor is used).
The figure of merit is fxs_load_unverified / baseline (goal <= 1.1); fxs_load /
baseline is reported beside it: the baseline reads no byte, the hash reads them all.
baseline and fxs_load_unverified take milliseconds, so they run a further `--fast-rounds` (60)
interleaved rounds alone; each figure is the median of all its runs. A loaded module's
Python code is generated at its first call (about 1 ms here), not counted.

    python -m benchmarks.load_speed --out benchmarks/results [--quick] [--rounds N] [--fast-rounds N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import as the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from .common import log, machine, write_json

GOAL = 1.1
WIDTH, DEPTH = 4096, 16


def _model(width: int, depth: int):
    from torch import nn
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)]).eval()


def run(quick: bool = False, rounds: int | None = None, fast_rounds: int | None = None) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    import fxsurgery as fxs
    from fxsurgery.export._record import digest

    width, depth = (1024, 8) if quick else (WIDTH, DEPTH)
    rounds = rounds or (2 if quick else 5)
    torch.manual_seed(0)
    model = _model(width, depth)
    result = fxs.apply(model, [], example_inputs=(torch.randn(1, width),))
    folder = tempfile.mkdtemp(prefix="fxs-load-")
    try:
        out = os.path.join(folder, "saved")
        result.save(out)
        plain = os.path.join(folder, "plain.safetensors")
        save_file({k: v.contiguous() for k, v in result.module.state_dict().items()}, plain)
        size = os.path.getsize(os.path.join(out, "model.safetensors"))
        del model, result

        def baseline():
            with torch.device("meta"):
                m = _model(width, depth)
            m.load_state_dict(load_file(plain), assign=True)
            return m

        steps = [("baseline", baseline), ("fxs_load", lambda: fxs.load(out)),
                 ("fxs_load_unverified", lambda: fxs.load(out, verify=False)), ("digest", lambda: digest(Path(out)))]
        times: dict[str, list[float]] = {k: [] for k, _ in steps}
        for r in range(rounds):
            for key, fn in steps[r % len(steps):] + steps[:r % len(steps)]:
                start = time.perf_counter()
                got = fn()
                times[key].append(time.perf_counter() - start)
                del got
        # the two that take milliseconds, again and again: a median of 5 such figures is mostly noise
        quick_steps = [steps[0], steps[2]]
        for r in range(fast_rounds if fast_rounds is not None else (10 if quick else 60)):
            for key, fn in quick_steps[r % 2:] + quick_steps[:r % 2]:
                start = time.perf_counter()
                got = fn()
                times[key].append(time.perf_counter() - start)
                del got
        median = {k: statistics.median(v) for k, v in times.items()}
        ratio = median["fxs_load"] / median["baseline"]
        unverified = median["fxs_load_unverified"] / median["baseline"]
        log(f"load {size / 1e9:.2f} GB: fxs.load {median['fxs_load']:.3f}s, verify=False {median['fxs_load_unverified']:.3f}s, "
            f"load_file + construction {median['baseline']:.3f}s ({ratio:.2f}x, {unverified:.2f}x), "
            f"the hash alone {median['digest']:.3f}s")
        return {"benchmark": "load", "goal": {"load_over_load_file_max": GOAL}, "machine": machine(),
                "model": f"Linear({width}, {width}) x {depth}, float32", "bytes": size, "rounds": rounds,
                "seconds": median, "all_runs": times,
                "summary": {"load_over_load_file": ratio, "unverified_over_load_file": unverified,
                            "load_without_hash_over_load_file": (median["fxs_load"] - median["digest"]) / median["baseline"]}}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int)
    p.add_argument("--fast-rounds", type=int, help="further rounds of baseline and fxs_load_unverified alone (default 60)")
    a = p.parse_args(argv)
    write_json(Path(a.out), "load", run(a.quick, a.rounds, a.fast_rounds))


if __name__ == "__main__":
    main()
