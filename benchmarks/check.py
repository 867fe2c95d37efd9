"""Check benchmark results against the goals and print which hold.

    python -m benchmarks.check [benchmarks/results] [--strict]

Prints a Markdown table (goal, measured, holds). A goal whose benchmark was
not run, or skipped (no share mode, no GPU), reads "not measured". With
--strict the exit status is 1 when any measured goal fails.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a file (python benchmarks/NAME.py): import as the package
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    __package__ = "benchmarks"

from .common import read_json

Row = tuple[str, str, bool | None]  # goal, measured, holds (None: not measured)


def _fmt(x: float | None, unit: str = "x") -> str:
    return "not measured" if x is None else f"{x:.2f}{unit}"


def _le(goal: str, value: float | None, limit: float, unit: str = "x") -> Row:
    return goal, _fmt(value, unit), None if value is None else value <= limit


def pipeline_rows(data: dict | None) -> list[Row]:
    s = (data or {}).get("summary", {})
    n = s.get("models", 0)
    return [_le(f"pipeline: capture + six-rule surgery + transfer <= 3x symbolic_trace time (median over {n} models)",
                s.get("pipeline_over_trace_median"), 3.0),
            _le(f"pipeline: capture + six-rule surgery + transfer <= 0.5x torch.export time "
                f"(median over the {s.get('exported_models', 0)} models it exports)", s.get("pipeline_over_export_median"), 0.5)]


def scaling_rows(data: dict | None) -> list[Row]:
    exps = (data or {}).get("exponents", {})
    rows = []
    for key, what, goal in (("fxs_pipeline", "full pipeline", 1.1), ("fxs_type_swap", "type swap (match + rewrite)", 1.05),
                            ("fxs_function_swap", "function swap (match + rewrite)", 1.05),
                            ("fxs_pattern_swap", "pattern-rule swap (match + rewrite)", 1.1)):
        e = exps.get(key, {})
        rows.append(_le(f"scaling: {what} exponent <= {goal} ({e.get('points', 0)} sizes)", e.get("exponent"), goal, ""))
    return rows


def transfer_rows(data: dict | None) -> list[Row]:
    s = (data or {}).get("summary", {})
    model = (data or {}).get("model", "?")
    return [
        _le(f"transfer ({model}): copy time <= 1.1x load_state_dict (lazy copies: the surgery's own cost)",
            s.get("copy_over_load_state_dict"), 1.1),
        _le(f"transfer ({model}): copy, then every tensor written once, <= 1.1x load_state_dict",
            s.get("written_copy_over_load_state_dict"), 1.1),
        _le(f"transfer ({model}): share time <= 1.1x load_state_dict(assign=True)", s.get("share_over_assign"), 1.1),
        _le(f"transfer ({model}): copy peak RSS <= 2.1x model size", s.get("copy_peak_over_model"), 2.1),
        _le(f"transfer ({model}): share peak RSS <= 1.1x model size", s.get("share_peak_over_model"), 1.1),
    ]


def stream_rows(data: dict | None) -> list[Row]:
    s = (data or {}).get("summary", {})
    model = (data or {}).get("model", "?")
    limit = s.get("stream_limit_over_model")
    return [_le(f"transfer ({model}): streaming from a 4-shard checkpoint, peak RSS <= model + largest shard + 10% "
                f"({_fmt(limit)})", s.get("stream_peak_over_model"), limit or 0.0)]


def pattern_rows(scaling: dict | None, speed: dict | None) -> list[Row]:
    two = (scaling or {}).get("two_users", {})
    fold = (speed or {}).get("conv_bn_fold", {})
    speedup = fold.get("speedup")
    nodes = two.get("nodes", "12k")
    return [_le(f"patterns: ReLU->GELU pattern rule on {nodes} nodes (two users each), time / replace_pattern <= 1",
                two.get("pattern_swap_over_replace_pattern"), 1.0),
            _le(f"scaling: function swap Replace(F.relu, F.gelu) on {nodes} nodes (two users each; match + rewrite, "
                "with example inputs) <= 0.25x replace_pattern", two.get("swap_fxs_over_replace_pattern"), 0.25),
            _le("scaling: type swap Replace(nn.ReLU, GELU()) (match + rewrite) <= 0.25x replace_pattern's F.relu swap, "
                "at the size nearest 12k nodes", _type_swap_over_fx(scaling), 0.25),
            (f"scaling: the whole fxs.apply with example inputs (capture, shape pass, transfer, check) on {nodes} nodes / "
             "symbolic_trace + replace_pattern (no goal)", _fmt(two.get("end_to_end_fxs_over_fx")), None),
            ("patterns: conv+bn fold on resnet50 runs faster than the original (CPU, eval)",
             _fmt(speedup), None if speedup is None else speedup > 1.0)]


def _type_swap_over_fx(scaling: dict | None) -> float | None:
    """At the measured size nearest the issue's 12k nodes (replace_pattern grows faster than linearly)."""
    both = [r for r in (scaling or {}).get("sizes", [])
            if "fxs_module" in r.get("median_s", {}) and "fx_function" in r.get("median_s", {})]
    if not both:
        return None
    near = min(both, key=lambda r: abs(r["nodes"] - 12000))["median_s"]
    return near["fxs_module"]["swap"] / near["fx_function"]["replace_pattern"]


def speed_rows(data: dict | None) -> list[Row]:
    if data is None:
        return [("module speed: rewritten forward <= 1.02x original", "not measured", None)]
    rows = []
    for name, r in data["cpu"]["models"].items():
        rows.append(_le(f"module speed (CPU) {name}: rewritten forward <= 1.02x original", r.get("ratio"), 1.02))
    for key, r in data.get("gpu", {}).items():
        if isinstance(r, dict) and ("ratio" in r or "error" in r):
            rows.append(_le(f"module speed (GPU) {key}: rewritten forward <= 1.02x original", r.get("ratio"), 1.02))
    return rows


def large_rows(data: dict | None) -> list[Row]:
    save = (data or {}).get("save_load", {})
    ranks = (data or {}).get("ranks", {})
    peak = (data or {}).get("stream", {}).get("peak_over_imports")
    size = f"{save['model_bytes'] / 1e9:.2f} GB" if "model_bytes" in save else "large"
    same = ranks.get("byte_identical")
    best = "best_sharded_over_save_model" in save  # the fastest round of each: the least disturbed on a shared machine
    how = f"fastest of {save.get('rounds')} rounds each" if best else "median"
    return [
        _le(f"large models: sharded save of a {size} module (model.py, graph.json, hashes, fsync) <= 1.1x save_model ({how})",
            save.get("best_sharded_over_save_model" if best else "save_sharded_over_save_model"), 1.1),
        _le(f"large models: one-file save of the {size} module <= 1.1x save_model ({how})",
            save.get("best_one_over_save_model" if best else "save_one_over_save_model"), 1.1),
        _le(f"large models: sharded save of the {size} module <= 1.1x save_model + fsync, the same bytes made durable ({how})",
            save.get("best_sharded_over_durable_save_model" if best else None), 1.1),
        _le(f"large models: one-file save of the {size} module <= 1.1x save_model + fsync ({how})",
            save.get("best_one_over_durable_save_model" if best else "save_one_over_durable_save_model"), 1.1),
        _le("large models: streamed surgery, peak RSS above imports <= 2 GB", None if peak is None else peak / 1e9, 2.0, " GB"),
        _le("large models: 2 torchrun ranks / 1 process, wall time of the streamed surgery <= 0.6x",
            ranks.get("two_ranks_over_one"), 0.6),
        _le("large models: 2 torchrun ranks / 1 process, rank 0's save stage (shards, barrier, record) <= 0.6x",
            ranks.get("save_two_ranks_over_one"), 0.6),
        ("large models: the 2 ranks' output byte-identical to 1 process", "not measured" if same is None else str(same).lower(),
         same),
        *_big_rows((data or {}).get("big", {})),
    ]


def _big_rows(big: dict) -> list[Row]:
    peak = big.get("stream", {}).get("peak_over_imports")
    size = f"{big['model_bytes'] / 1e9:.1f} GB" if "model_bytes" in big else "~6 GB"
    return [
        _le(f"large models ({size}, 1 GB shards): streamed surgery, peak RSS above imports <= 2 GB",
            None if peak is None else peak / 1e9, 2.0, " GB"),
        _le(f"large models ({size}): the streamed CLI surgery <= 1.5x copying the checkpoint's files", big.get("one_over_copy"), 1.5),
        _le(f"large models ({size}): 2 torchrun ranks / 1 process, wall time <= 0.6x", big.get("two_ranks_over_one"), 0.6),
        ("large models ({size}): the 2 ranks' output byte-identical to 1 process".format(size=size),
         "not measured" if big.get("byte_identical") is None else str(big["byte_identical"]).lower(), big.get("byte_identical")),
    ]


def load_rows(data: dict | None) -> list[Row]:
    s = (data or {}).get("summary", {})
    size = (data or {}).get("bytes")
    what = f"{size / 1e9:.2f} GB" if size else "~1 GB"
    return [_le(f"load ({what}): fxs.load(verify=False) <= 1.1x safetensors load_file + module construction",
                s.get("unverified_over_load_file"), 1.1),
            (f"load ({what}): fxs.load, the hash of every byte checked / load_file + construction (no goal: "
             "the baseline reads no byte)", _fmt(s.get("load_over_load_file")), None)]


def check(out_dir: str | Path) -> list[Row]:
    """Every goal with its measured figure; printed as a Markdown table."""
    out_dir = Path(out_dir)
    rows = (pipeline_rows(read_json(out_dir, "pipeline")) + scaling_rows(read_json(out_dir, "scaling"))
            + transfer_rows(read_json(out_dir, "transfer")) + stream_rows(read_json(out_dir, "transfer"))
            + transfer_rows(read_json(out_dir, "transfer_large")) + stream_rows(read_json(out_dir, "transfer_large"))
            + speed_rows(read_json(out_dir, "module_speed")) + large_rows(read_json(out_dir, "large_models"))
            + load_rows(read_json(out_dir, "load"))
            + pattern_rows(read_json(out_dir, "scaling"), read_json(out_dir, "module_speed")))
    print("| goal | measured | holds |")
    print("|---|---|---|")
    for goal, measured, holds in rows:
        print(f"| {goal} | {measured} | {'-' if holds is None else 'yes' if holds else 'NO'} |")
    measured = [h for _, _, h in rows if h is not None]
    print(f"\n{sum(measured)} of {len(measured)} measured goals hold; {len(rows) - len(measured)} not measured.")
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.check", description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", default="benchmarks/results")
    p.add_argument("--strict", action="store_true", help="exit 1 if a measured goal fails")
    a = p.parse_args(argv)
    rows = check(a.out)
    return 1 if a.strict and any(h is False for _, _, h in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
