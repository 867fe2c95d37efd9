"""Measure the capture corpus (tests/corpus.py).

    python tests/probe_corpus.py                 # the quick cases (slow=False)
    python tests/probe_corpus.py --all           # every case
    python tests/probe_corpus.py --all --out /tmp/corpus_probe.json
    python tests/probe_corpus.py --only timm/resnet50 --only hf/t5

For each case: build time, first and second forward time, parameter count,
whether two forward passes (and a second build) give bit-identical outputs,
whether plain ``torch.fx.symbolic_trace(model)`` succeeds (the exception type
and the first line of its message if not) and, when it does, whether the traced
module gives the same output bit for bit; the activation classes found in the
model, and whether they match the case's stored ``activations``.  Exits 1 if a
case fails to build or run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

import torch
import torch.fx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from corpus import CORPUS, Case, activation_names


def _tensors(value) -> tuple[torch.Tensor, ...]:
    return value if isinstance(value, tuple) else (value,)


def _identical(a, b) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) and all(
        x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb)
    )


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else ""


def probe(case: Case) -> dict:
    row: dict = {"name": case.name, "family": case.family, "slow": case.slow}
    t = time.perf_counter()
    model = case.build()
    row["build_s"] = round(time.perf_counter() - t, 3)
    row["params"] = sum(p.numel() for p in model.parameters())

    with torch.no_grad():
        t = time.perf_counter()
        first = case.output(model(*case.inputs()))
        row["forward_s"] = round(time.perf_counter() - t, 3)
        t = time.perf_counter()
        second = case.output(model(*case.inputs()))
        row["forward2_s"] = round(time.perf_counter() - t, 3)
    row["deterministic"] = _identical(first, second)
    # A second build must give the same weights, hence the same output.
    with torch.no_grad():
        row["rebuild_identical"] = _identical(first, case.output(case.build()(*case.inputs())))
    row["output_shapes"] = [list(x.shape) for x in _tensors(first)]
    row["empty_output"] = any(x.numel() == 0 for x in _tensors(first))

    try:
        traced = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001  (any failure is a measurement)
        row["fx_ok"] = False
        row["fx_error"] = f"{type(exc).__name__}: {_first_line(exc)}"
        row["fx_same_output"] = None
    else:
        row["fx_ok"] = True
        row["fx_error"] = None
        try:
            with torch.no_grad():
                row["fx_same_output"] = _identical(first, case.output(traced(*case.inputs())))
        except Exception as exc:  # noqa: BLE001
            row["fx_same_output"] = f"{type(exc).__name__}: {_first_line(exc)}"

    found = activation_names(model)
    row["activations"] = list(found)
    row["activations_match"] = found == case.activations
    return row


def _print_row(row: dict) -> None:
    if "error" in row:
        print(f"{row['name']:<42} ERROR {row['error']}", flush=True)
        return
    fx = "ok" if row["fx_ok"] else f"FAIL {row['fx_error'][:90]}"
    if row["fx_ok"] and row["fx_same_output"] is not True:
        fx += f" (traced output differs: {row['fx_same_output']})"
    flags = []
    if not row["deterministic"]:
        flags.append("NON-DETERMINISTIC")
    if not row["rebuild_identical"]:
        flags.append("rebuilt model differs")
    if row["empty_output"]:
        flags.append("empty output")
    if not row["activations_match"]:
        flags.append("activations differ from corpus.py")
    print(
        f"{row['name']:<42} {row['params']:>11,} {row['build_s']:>7.2f} {row['forward_s']:>7.2f}"
        f" {row['forward2_s']:>7.2f}  {'slow' if row['slow'] else '    '}"
        f"  {','.join(row['activations']) or '-':<26} {fx}"
        + (f"  [{'; '.join(flags)}]" if flags else ""),
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="include the slow cases")
    parser.add_argument("--only", action="append", metavar="NAME", help="probe only these cases")
    parser.add_argument("--out", help="write the measurements to this JSON file")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    cases = [c for c in CORPUS if args.all or not c.slow]
    if args.only:
        unknown = set(args.only) - {c.name for c in CORPUS}
        if unknown:
            parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
        cases = [c for c in CORPUS if c.name in args.only]

    print(f"{'name':<42} {'params':>11} {'build s':>7} {'fwd s':>7} {'fwd2 s':>7}  slow"
          f"  {'activations':<26} plain fx", flush=True)
    rows = []
    caught: list[str] = []
    for case in cases:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            try:
                row = probe(case)
            except Exception as exc:  # noqa: BLE001
                row = {"name": case.name, "family": case.family, "slow": case.slow,
                       "error": f"{type(exc).__name__}: {_first_line(exc)}",
                       "traceback": traceback.format_exc()}
        row["warnings"] = sorted({f"{w.category.__name__}: {str(w.message).splitlines()[0][:160]}"
                                  for w in seen})
        caught += [f"{case.name}: {w}" for w in row["warnings"]]
        rows.append(row)
        _print_row(row)

    done = [r for r in rows if "error" not in r]
    quick = [r for r in done if not r["slow"]]
    print(f"\n{len(done)}/{len(rows)} cases ran; {sum(r['fx_ok'] for r in done)} trace with plain fx; "
          f"quick subset forward total {sum(r['forward_s'] for r in quick):.1f} s "
          f"(second pass {sum(r['forward2_s'] for r in quick):.1f} s) "
          f"on {torch.get_num_threads()} threads")
    if caught:
        print("\nwarnings:")
        for line in caught:
            print("  " + line)

    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "cases": rows},
                      f, indent=1)
        print(f"\nwrote {args.out}")
    return 0 if len(done) == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
