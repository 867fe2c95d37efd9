"""The `fxsurgery` command: apply, inspect, check, diff, map-weights, rules, demo.

Bad input ends with one line on stderr naming the problem and the fix, a
non-zero exit status, no traceback, and nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings
from pathlib import Path

from .._progress import quiet
from .._util import first_line
from ..errors import FxsError
from ..spec import load_rules, parse_overrides

__all__ = [
    "cmd_apply", "cmd_check", "cmd_demo", "cmd_diff", "cmd_inspect", "cmd_map_weights", "cmd_rules", "main",
    "shipped",
]

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxsurgery", description="Model surgery for PyTorch as checked graph rewrites.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p):
        p.add_argument("model", help="package.module:factory, path/file.py:Name, a saved directory, or a pickled file")
        p.add_argument("--input", action="append", metavar="SHAPE", help="example input: sizes joined by x, e.g. 1x3x224x224; integer inputs (token ids) "
                       "with a dtype, e.g. 1x16:int64 (repeat for several inputs); a keyword input as NAME=SIZES, e.g. attention_mask=1x16:int64")
        p.add_argument("--weights", metavar="FILE", help="the model's weights: .safetensors, a sharded *.index.json, or a weights-only .pt")
        p.add_argument("--trust-pickle", action="store_true", help="allow MODEL to be a pickled model file")
        p.add_argument("--trust-code", action="store_true", help="load a saved directory by importing its model.py (runs its code)")
        p.add_argument("--leaf", action="append", default=[], metavar="GLOB", help="treat modules at these paths as leaves")
        p.add_argument("--json", action="store_true", help="print JSON for machines")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        p.add_argument("--eval", action="store_true", help="put the model in eval mode first (inference rewrites: fold-bn)")

    p = sub.add_parser("apply", help="apply rule files to a model")
    model_args(p)
    p.add_argument("rules", nargs="+", help="rule files (YAML)")
    p.add_argument("-o", "--output", metavar="DIR", help="write model.py, model.safetensors, surgery.json here")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="override a rule-file param")
    p.add_argument("--allow-module", action="append", default=[], metavar="PKG", help="let rule files name classes from PKG")
    p.add_argument("--strict", action="store_true", help="fail when a tensor is new and no rule declared it")
    p.add_argument("--dry-run", action="store_true", help="show the plan and report, write nothing")
    p.add_argument("--explain", action="store_true", help="per rule: what matched, what was left alone and why, near misses")
    p.add_argument("--force", action="store_true", help="replace an existing output directory holding only files fxsurgery wrote")
    p.add_argument("--format", action="append", default=[], choices=["pt2", "onnx", "torchscript"],
                   help="also write model.pt2 / model.onnx / model.torchscript.pt, verified on the inputs")

    p = sub.add_parser("inspect", help="show modules, shapes and parameters as the graph sees them")
    model_args(p)
    p.add_argument("--depth", type=int, help="show modules down to this depth")

    p = sub.add_parser("check", help="validate rule files without a model")
    p.add_argument("rules", nargs="+")
    p.add_argument("--set", action="append", default=[], metavar="K=V")
    p.add_argument("--allow-module", action="append", default=[], metavar="PKG")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("diff", help="write the graph before and after the rules as HTML or SVG")
    model_args(p)
    p.add_argument("rules", nargs="+", help="rule files (YAML)")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="diff.html (one self-contained page) or diff.svg")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="override a rule-file param")
    p.add_argument("--allow-module", action="append", default=[], metavar="PKG", help="let rule files name classes from PKG")

    p = sub.add_parser("map-weights", help="map a checkpoint of the original model into a saved surgery's layout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("checkpoint", help="weights of the original architecture (.safetensors or weights-only .pt)")
    p.add_argument("surgery", help="a directory written by apply -o / save()")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the mapped weights (.safetensors)")

    p = sub.add_parser("rules", help="list the shipped rule files with their descriptions and params")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("demo", help="run the embedded default end to end (ResNet-18, random weights)")
    p.add_argument("-o", "--output", default="fxsurgery-demo", metavar="DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _model(args):
    """The model, and the checkpoint its values come from (None: its own).

    With --weights the model is built without memory for its parameters and
    the checkpoint, checked against it by its headers, is read tensor by tensor
    into the result: the model's memory is never needed twice.
    """
    from ..transfer import Checkpoint, empty_weights
    from ._modelref import load_model
    checkpoint = Checkpoint(args.weights) if args.weights else None
    with empty_weights() if checkpoint is not None else contextlib.nullcontext():
        model = load_model(args.model, trust_pickle=args.trust_pickle, trust_code=args.trust_code,
                           allow=tuple(getattr(args, "allow_module", ())))
    if checkpoint is not None:
        checkpoint.check({k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()})
    if getattr(args, "eval", False):
        model.eval()
    return model, checkpoint


def cmd_apply(args) -> int:
    if args.output and not args.dry_run:
        from ..export import check_target
        check_target(args.output, args.force, flag="--force")  # before the surgery: fail fast, write nothing
    result = _result(args)
    _refuse_no_op(result)
    written = None
    if args.output and not args.dry_run:
        written = str(result.save(args.output, force=args.force, formats=args.format))
    if args.json:
        print(json.dumps({**result.to_dict(), "output": written, "dry_run": args.dry_run}, indent=2, default=str))
        return 0
    print(result.summary())
    if args.explain:
        print("\nexplain:\n" + result.plan.explain())
    if written:
        print(f"\nwrote {written}/ ({', '.join(_files(written))})")
    elif args.dry_run:
        print("\ndry run: nothing written")
    else:
        print("\nnothing written (pass -o DIR to save the result)")
    return 0


def cmd_inspect(args) -> int:
    from ..capture import capture
    from ..views import overview, overview_table
    from ._modelref import parse_inputs
    inputs, keywords = parse_inputs(args.input)
    info = overview(capture(_model(args)[0], inputs or None, keywords or None, leaf_paths=args.leaf))
    print(json.dumps(info, indent=2) if args.json else overview_table(info, args.depth))
    return 0


def cmd_check(args) -> int:
    params = parse_overrides(args.set)
    results = []
    for path in args.rules:
        ruleset = load_rules(shipped(path), params=params, allow=args.allow_module)
        results.append({"file": path, "rules": [str(r) for r in ruleset], "params": ruleset.params})
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        for r in results:
            print(f"{r['file']}: ok, {len(r['rules'])} rules")
            for i, text in enumerate(r["rules"], start=1):
                print(f"  {i}. {text}")
    return 0


def _result(args):
    """Load the rules and the model and run the surgery, printing nothing."""
    from ..pipeline import apply
    from ._modelref import parse_inputs
    params = parse_overrides(args.set)
    rules = [load_rules(shipped(path), params=params, allow=args.allow_module) for path in args.rules]
    inputs, keywords = parse_inputs(args.input)
    model, checkpoint = _model(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan's warnings are printed by the caller
        return apply(model, rules, inputs or None, example_kwargs=keywords or None, strict=getattr(args, "strict", False),
                     leaf_paths=args.leaf, weights=checkpoint)


def cmd_diff(args) -> int:
    from ..views import check_suffix, diff
    check_suffix(args.output)
    print(f"wrote {diff(_result(args), args.output)}")
    return 0


def cmd_map_weights(args) -> int:
    from ..export import write_mapped
    mapped = write_mapped(args.checkpoint, args.surgery, args.output)
    print(f"wrote {args.output}: {len(mapped)} tensors in the layout of {args.surgery}")
    return 0


def shipped(path: str) -> str:
    """A rule file path, or the name of a shipped one ('fold-bn' for rules/fold-bn.yaml)."""
    if os.path.exists(path) or os.sep in path:
        return path
    from ._demo import rules_dir
    candidate = rules_dir() / (path if path.endswith(".yaml") else f"{path}.yaml")
    return str(candidate) if candidate.is_file() else path


def cmd_rules(args) -> int:
    from ._demo import rules_dir
    listed = []
    for path in sorted(rules_dir().glob("*.yaml")):
        ruleset = load_rules(path)
        listed.append({"name": path.stem, "description": ruleset.description, "params": ruleset.params,
                       "rules": [str(r) for r in ruleset]})
    if args.json:
        print(json.dumps(listed, indent=2, default=str))
        return 0
    for item in listed:
        params = ", ".join(f"{k}={v}" for k, v in item["params"].items()) or "none"
        print(f"{item['name']}\n  {item['description']}\n  params: {params}\n")
    print(f"{len(listed)} rule files; use one by name: fxsurgery apply MODEL {listed[0]['name']} --set k=v")
    return 0


def cmd_demo(args) -> int:
    from ._demo import run
    run(args.output)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line like every other error."""

    def error(self, message):
        print(f"fxsurgery: error: {message}; fix: see 'fxsurgery {self.prog.split()[-1]} --help'"
              if " " in self.prog else f"fxsurgery: error: {message}; fix: see 'fxsurgery --help'", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def main(argv=None) -> int:
    if not os.environ.get("FXSURGERY_DEBUG"):
        warnings.simplefilter("ignore")  # library warnings are not ours to print; our own go through the report
    args = _parser().parse_args(argv)
    command = {"apply": cmd_apply, "inspect": cmd_inspect, "check": cmd_check, "diff": cmd_diff,
               "map-weights": cmd_map_weights, "rules": cmd_rules, "demo": cmd_demo}[args.command]
    try:
        with quiet(getattr(args, "quiet", False)):
            return command(args)
    except FxsError as exc:
        print(f"fxsurgery: error: {exc.message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fxsurgery: interrupted; nothing written", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug of ours: one line, and the traceback only on request
        if os.environ.get("FXSURGERY_DEBUG"):
            raise
        first = first_line(exc)
        print(f"fxsurgery: internal error: {type(exc).__name__}: {first} (set FXSURGERY_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


def _refuse_no_op(result) -> None:
    """A surgery in which no rule matched would write the original again: say why instead."""
    matches = result.plan.matches
    if matches and all(m.count == 0 and m.reason for m in matches):  # (a warning said why a match changes nothing)
        first = matches[0]
        from ..errors import MatchError
        raise MatchError(f"nothing to change: no rule matched ({first.label}: {first.reason}); fix: check the selectors "
                         "against 'fxsurgery inspect MODEL' (inference rewrites such as fold-bn need --eval)")


def _files(directory: str) -> list[str]:
    """What an output holds, as its surgery.json lists it (every format written)."""
    try:
        return json.loads((Path(directory) / "surgery.json").read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return sorted(os.listdir(directory))


if __name__ == "__main__":
    sys.exit(main())
