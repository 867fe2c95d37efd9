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
import time
import warnings
from pathlib import Path

from .._progress import library_bars, quiet, working
from .._util import first_line, format_table, printable, read_json, shown
from ..errors import FxsError, ModelError, bounded
from ..spec import load_rule_files, load_rules, parse_overrides, rule_path

__all__ = [
    "cmd_apply", "cmd_check", "cmd_demo", "cmd_diff", "cmd_inspect", "cmd_map_weights", "cmd_rules", "main",
    "shipped",
]

EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3


def _path(text: str) -> str:
    """An output path: an empty one (-o "" from an unset shell variable) would write nowhere and say so quietly."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; fix: name the output, e.g. -o out/")
    return text


def _given(text: str) -> str:
    """A path or name an option needs: empty (an unset shell variable), --weights '' was no weights at all."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty; fix: give it a value, or leave the option out")
    return text


def _depth(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a depth; fix: give 1 or more (1: the model's children)")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxsurgery", description="Model surgery for PyTorch as checked graph rewrites.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(p):
        p.add_argument("model", help="package.module:factory, path/file.py:Name, a saved directory, or a pickled file")
        p.add_argument("--input", action="append", metavar="SHAPE", help="example input: sizes joined by x, e.g. 1x3x224x224; integer inputs (token ids) "
                       "with a dtype, e.g. 1x16:int64 (repeat for several inputs); a keyword input as NAME=SIZES, e.g. attention_mask=1x16:int64")
        p.add_argument("--weights", type=_given, metavar="FILE", help="the model's weights: .safetensors, a sharded *.index.json, a weights-only .pt, "
                       "or a torch.distributed.checkpoint directory")
        p.add_argument("--trust-pickle", action="store_true", help="allow MODEL to be a pickled model file")
        p.add_argument("--trust-code", action="store_true", help="load a saved directory by importing its model.py (runs its code)")
        p.add_argument("--allow-module", action="append", type=_given, default=[], metavar="PKG",
                       help="let rule files and saved directories name classes from PKG")
        p.add_argument("--leaf", action="append", type=_given, default=[], metavar="GLOB", help="treat modules at these paths as leaves")
        p.add_argument("--json", action="store_true", help="print JSON for machines")
        p.add_argument("--quiet", action="store_true", help="no progress bars; apply prints only its warnings and what it wrote")
        p.add_argument("--eval", action="store_true", help="put the model in eval mode first (inference rewrites: fold-bn)")

    p = sub.add_parser("apply", help="apply rule files to a model")
    model_args(p)
    p.add_argument("rules", nargs="+", help="rule files (YAML)")
    p.add_argument("-o", "--output", type=_path, metavar="DIR", help="write model.py, model.safetensors, surgery.json here")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="override a rule-file param "
                   "(with several rule files: in each file that declares it)")
    p.add_argument("--strict", action="store_true", help="fail when a tensor is new and no rule declared it")
    p.add_argument("--dry-run", action="store_true", help="show the plan and report, write nothing")
    p.add_argument("--explain", action="store_true", help="per rule: what matched, what was left alone and why, near misses")
    p.add_argument("--profile", action="store_true", help="seconds spent in each stage, loading and saving included")
    p.add_argument("--force", action="store_true", help="replace an existing output directory holding only files fxsurgery wrote")
    p.add_argument("--format", action="append", default=[], choices=["pt2", "onnx", "torchscript", "hf", "dcp"],
                   help="also write model.pt2 / model.onnx / model.torchscript.pt, verified on the inputs, or the weights "
                   "as a torch.distributed.checkpoint directory model.dcp/; hf: the directory is the transformers model's "
                   "own save_pretrained (what a transformers model gets by default)")
    p.add_argument("--stream", action="store_true", help="with --weights: read each tensor when its output shard is "
                   "written, never the whole model (for models larger than memory)")
    p.add_argument("--seed", type=int, metavar="N", help="seed torch's generator first: new layers' initial values repeat "
                   "(under torchrun every rank draws the same ones; by default from a seed derived from the launch)")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE", help="weights above this go into shards with an "
                   "index: bytes, or e.g. 2GB, 500MB (default 5GB)")
    p.add_argument("--keep-class", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the model's own class, submodules swapped (the default for transformers models: generate() "
                   "and save_pretrained keep working); --no-keep-class: a regenerated graph module, saved as model.py + "
                   "safetensors (needed for rules that edit inside a forward, and for --format)")
    p.add_argument("--dynamic-shapes", choices=["auto", "none"], default="auto",
                   help="auto: guard only the size decisions the code makes (default); none: only the example's shapes")
    p.add_argument("--no-modes", dest="modes", action="store_false", help="keep only the code of the mode the model is in: "
                   "the result runs it in train and eval mode alike (an inference surgery, --eval, that matches in that mode only)")

    p = sub.add_parser("inspect", help="show modules, shapes and parameters as the graph sees them")
    model_args(p)
    p.add_argument("--depth", type=_depth, help="show modules down to this depth")
    p.add_argument("--groups", action="store_true", help="list the dependency groups: layers whose channels Prune removes together")

    p = sub.add_parser("check", help="validate rule files without a model")
    p.add_argument("rules", nargs="+", help="rule files (YAML) or shipped rule names")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="override a rule-file param")
    p.add_argument("--allow-module", action="append", default=[], metavar="PKG", help="let rule files name classes from PKG")
    p.add_argument("--json", action="store_true", help="print the rules as JSON")

    p = sub.add_parser("diff", help="write the graph before and after the rules as HTML or SVG")
    model_args(p)
    p.add_argument("rules", nargs="+", help="rule files (YAML)")
    p.add_argument("-o", "--output", type=_path, required=True, metavar="FILE", help="diff.html (one self-contained page) or diff.svg")
    p.add_argument("--force", action="store_true", help="replace the file if it exists")
    p.add_argument("--set", action="append", default=[], metavar="K=V", help="override a rule-file param")

    p = sub.add_parser("map-weights", help="map a checkpoint of the original model into a saved surgery's layout")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("checkpoint", help="weights of the original architecture (.safetensors, a sharded *.index.json, or weights-only .pt)")
    p.add_argument("surgery", help="a directory written by apply -o / save()")
    p.add_argument("-o", "--output", type=_path, required=True, metavar="FILE", help="the mapped weights (.safetensors)")
    p.add_argument("--force", action="store_true", help="replace the file if it exists")

    p = sub.add_parser("rules", help="list the shipped rule files with their descriptions and params")
    p.add_argument("--json", action="store_true", help="print the list as JSON")

    p = sub.add_parser("demo", help="run the embedded default end to end (ResNet-18, random weights)")
    p.add_argument("-o", "--output", type=_path, default="fxsurgery-demo", metavar="DIR", help="where to write (default: fxsurgery-demo)")
    p.add_argument("--force", action="store_true", help="replace DIR when it is not an earlier demo's output")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _profile_table(profile: dict[str, float]) -> str:
    """Seconds and share of the total per stage, in pipeline order."""
    total = sum(profile.values()) or 1.0
    rows = [("stage", "seconds", "share")]
    rows += [(stage, f"{t:.3f}", f"{100 * t / total:.0f}%") for stage, t in profile.items()]
    rows.append(("total", f"{sum(profile.values()):.3f}", "100%"))
    return format_table(rows)


def _model(args):
    """The model, and the checkpoint its values come from (None: its own).

    With --weights the model is built without memory for its parameters and
    the checkpoint, checked against it by its headers, is read tensor by tensor
    into the result: the model's memory is never needed twice.
    """
    from ..transfer import empty_weights, open_checkpoint, refuse_own_loading
    from ._modelref import load_model
    checkpoint = open_checkpoint(args.weights) if args.weights else None
    meta = checkpoint is not None or getattr(args, "stream", False)  # --stream --dry-run alone: the plan on meta
    with empty_weights() if meta else contextlib.nullcontext(), working("load model"):
        model = load_model(args.model, trust_pickle=args.trust_pickle, trust_code=args.trust_code,
                           allow=tuple(getattr(args, "allow_module", ())))
    if checkpoint is not None:
        refuse_own_loading(model, checkpoint)  # before the names are compared: its own code may rename them
        checkpoint.check(model)
    if getattr(args, "eval", False):
        model.eval()
    return model, checkpoint


def cmd_apply(args) -> int:
    from ..export import Ranks, check_save, check_target, parse_size
    parse_size(args.max_shard_size, "--max-shard-size")
    ranks = Ranks.from_env() if args.output and not args.dry_run else None  # under torchrun: each rank its share of the shards
    if args.stream and not args.weights and not args.dry_run:
        raise ModelError("--stream reads the model's tensors from --weights, and none was given; "
                         "fix: pass --weights (a .safetensors file or a sharded *.index.json), or --dry-run for the plan alone")
    if args.format and not args.output and not args.dry_run:
        raise ModelError(f"--format {args.format[0]}: nothing is written without -o; fix: pass -o DIR, or --dry-run to check the formats")
    if args.output and not args.dry_run:
        check_target(args.output, args.force, flag="--force", ranks=ranks)  # before the surgery: fail fast, write nothing
    if args.seed is not None or ranks is not None:  # every rank must make the same new tensors: each writes some of them
        import torch
        torch.manual_seed(args.seed if args.seed is not None else ranks.seed())
    from ..spec import planning
    start = time.perf_counter()
    with planning() if args.dry_run else contextlib.nullcontext():  # declared modules on meta: shown, not allocated
        result = _result(args)
    loaded = time.perf_counter() - start - sum(result.timings.values())
    _refuse_no_op(result, args.eval, args.explain)
    if args.dry_run:
        pretrained, _ = result.check_formats(args.format)  # what save would refuse, a dry run refuses
        check_save(result.module, pretrained, result.to_dict(), result.capture.model if result.capture else None)
    written = None
    start = time.perf_counter()
    if args.output and not args.dry_run:
        written = str(result.save(args.output, force=args.force, formats=args.format, max_shard_size=args.max_shard_size,
                                  ranks=ranks is not None))
        if ranks is not None and ranks.rank:  # its shards are on disk; rank 0 completes the output
            print(f"rank {ranks.rank} of {ranks.size}: shards written; rank 0 completes {written}/")
            return 0
    profile = {"load model (imports included)": loaded, **result.timings, "save": time.perf_counter() - start}
    if args.json:
        extra = {"profile": profile} if args.profile else {}
        print(json.dumps({**result.to_dict(), "output": written, "dry_run": args.dry_run,
                          "footprint": result.footprint(args.max_shard_size), **extra}, indent=2, default=str))
        return 0
    summary = result.summary(brief=args.quiet)  # --quiet: the warnings, then what was written
    if summary:
        print(printable(summary))
    if args.explain:
        print(printable("\nexplain:\n" + result.plan.explain()))
    if args.profile:
        print("\n" + _profile_table(profile))
    gap = "\n" if summary or args.explain or args.profile else ""
    if written:
        print(f"{gap}wrote {shown(str(written))}/ ({', '.join(_files(written))})")
    elif args.dry_run:
        print(f"{gap}{result.footprint_text(args.max_shard_size)}\ndry run: nothing written")
    else:
        print(f"{gap}nothing written (pass -o DIR to save the result)")
    return 0


def cmd_inspect(args) -> int:
    from ..capture import capture
    from ..views import overview, overview_table
    from ._modelref import parse_inputs, unmasked
    inputs, keywords = parse_inputs(args.input)
    model = _model(args)[0]
    inputs, keywords = unmasked(model, inputs, keywords)
    captured = capture(model, inputs or None, keywords or None, leaf_paths=args.leaf)
    if args.groups:
        from ..views import dependency_groups, groups_table
        rows = dependency_groups(captured)
        print(json.dumps(rows, indent=2) if args.json else groups_table(rows))
        return 0
    info = overview(captured)
    print(json.dumps(info, indent=2) if args.json else overview_table(info, args.depth))
    if not (inputs or keywords or args.json) and "" in captured.opaque:  # a forward that traces only with values
        print("  the model stays Python without example inputs: pass --input to trace it "
              "(--input 1x3x224x224; token ids with a dtype: --input 1x16:int64)")
    return 0


def cmd_check(args) -> int:
    params = parse_overrides(args.set)
    results = []
    for path, ruleset in zip(args.rules, load_rule_files([shipped(p) for p in args.rules], params, args.allow_module)):
        results.append({"file": path, "rules": [str(r) for r in ruleset], "params": ruleset.params})
    if args.json:
        print(json.dumps(results, indent=2, default=str))
    else:
        for r in results:
            print(f"{shown(r['file'])}: ok, {len(r['rules'])} rule{'' if len(r['rules']) == 1 else 's'}")
            for i, text in enumerate(r["rules"], start=1):  # a rule file's text may hold terminal escapes
                print(f"  {i}. {shown(text)}")
    return 0


def _result(args, keep_class: bool | None = None):
    """Load the rules and the model and run the surgery, printing nothing."""
    from ..pipeline import apply
    from ._modelref import parse_inputs, unmasked
    params = parse_overrides(args.set)
    rules = load_rule_files([shipped(path) for path in args.rules], params, args.allow_module)
    inputs, keywords = parse_inputs(args.input)
    model, checkpoint = _model(args)
    inputs, keywords = unmasked(model, inputs, keywords)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the plan's warnings are printed by the caller
        dynamic = None if getattr(args, "dynamic_shapes", "auto") == "none" else "auto"
        return apply(model, rules, inputs or None, example_kwargs=keywords or None, strict=getattr(args, "strict", False),
                     leaf_paths=args.leaf, weights=checkpoint, stream=getattr(args, "stream", False), dynamic_shapes=dynamic,
                     modes=getattr(args, "modes", True),
                     keep_class=getattr(args, "keep_class", None) if keep_class is None else keep_class)


def cmd_diff(args) -> int:
    from ..views import check_free, check_suffix, diff
    check_suffix(args.output)
    check_free(args.output, args.force, flag="--force")  # before the surgery: fail fast, write nothing
    # the page draws graphs: a transformers model (kept as its class by apply) is drawn from its graph
    print(f"wrote {shown(str(diff(_result(args, keep_class=False), args.output, force=args.force)))}")
    return 0


def cmd_map_weights(args) -> int:
    from ..export import write_mapped
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mapped = write_mapped(args.checkpoint, args.surgery, args.output, force=args.force)
    for warning in caught:
        print(printable(f"warning: {warning.message}"))
    print(f"wrote {shown(args.output)}: {len(mapped)} tensors in the layout of {shown(args.surgery)}")
    return 0


def shipped(path: str) -> str:
    """A rule file path, or the name of a shipped one ('fold-bn' for rules/fold-bn.yaml); a local fold-bn.yaml first."""
    return rule_path(path)


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
    run(args.output, force=args.force)
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line like every other error."""

    def error(self, message):
        fix = f"see 'fxsurgery {self.prog.split()[-1]} --help'" if " " in self.prog else "see 'fxsurgery --help'"
        text = message if "; fix: " in message else f"{message}; fix: {fix}"  # an argument's own check names its fix
        print(f"fxsurgery: error: {bounded(text)}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def main(argv=None) -> int:
    if not os.environ.get("FXSURGERY_DEBUG"):
        warnings.simplefilter("ignore")  # library warnings are not ours to print; our own go through the report
    args = _parser().parse_args(argv)
    command = {"apply": cmd_apply, "inspect": cmd_inspect, "check": cmd_check, "diff": cmd_diff,
               "map-weights": cmd_map_weights, "rules": cmd_rules, "demo": cmd_demo}[args.command]
    try:
        with quiet(getattr(args, "quiet", False)), library_bars():
            return command(args)
    except FxsError as exc:
        from ._modelref import integer_hint
        message = integer_hint(exc.message, getattr(args, "input", None))
        print(f"fxsurgery: error: {bounded(message)}", file=sys.stderr)  # bounded already, unless a subclass skipped it
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("fxsurgery: interrupted; nothing written", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `fxsurgery rules | head`: the reader has what it wanted; what was written stays written
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 0
    except SystemExit as exc:  # the model's own code called sys.exit: that is no success
        print(f"fxsurgery: error: the model's code exited the process (SystemExit: {exc.code}); fix: remove the "
              "sys.exit/exit call from the code the model runs", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as exc:  # a bug of ours: one line, and the traceback only on request
        if os.environ.get("FXSURGERY_DEBUG"):
            raise
        first = first_line(exc)
        print(f"fxsurgery: internal error: {bounded(f'{type(exc).__name__}: {first}', 240)} (set FXSURGERY_DEBUG=1 for the traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


def _refuse_no_op(result, evaluating: bool = False, explain: bool = False) -> None:
    """A surgery in which no rule matched would write the original again: say why instead
    (with --explain, every rule's near misses first: the case it is asked for)."""
    matches = result.plan.matches
    if matches and all(m.count == 0 and m.reason for m in matches):  # (a warning said why a match changes nothing)
        if explain:
            print(printable("explain:\n" + result.plan.explain()))
        first = matches[0]
        from ..errors import MatchError
        if not evaluating and "training mode" in first.reason:  # the CLI's way to .eval() is the flag: said first
            raise MatchError(f"nothing to change: {first.label}: {first.reason.partition(': call .eval()')[0]}; fix: pass --eval "
                             "(inference rewrites such as fold-bn need the model in eval mode)")
        hint = "" if evaluating else " (inference rewrites such as fold-bn need --eval)"
        raise MatchError(f"nothing to change: no rule matched: {first.label}: {first.reason}; fix: check the selectors "
                         f"against 'fxsurgery inspect MODEL'{hint}")


def _files(directory: str) -> list[str]:
    """What an output holds, as its surgery.json lists it (every format written)."""
    try:
        files = read_json(Path(directory) / "surgery.json")["files"]
    except (OSError, ValueError, KeyError, TypeError):
        files = None
    return files if isinstance(files, list) and all(isinstance(f, str) for f in files) else sorted(os.listdir(directory))


if __name__ == "__main__":
    sys.exit(main())
