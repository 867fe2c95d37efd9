"""One PNG beside the JSON: pipeline stages per model, the scaling curves, transfer, module speed.

matplotlib is optional (`pip install -e ".[bench]"`); without it the JSON is
still written and the plot is skipped with a note.
"""

from __future__ import annotations

from pathlib import Path

from .common import read_json

STAGE_COLOURS = {"capture": "#4c72b0", "match": "#dd8452", "rewrite": "#55a868",
                 "validate": "#c44e52", "transfer": "#8172b3", "check": "#937860"}


def _pipeline(ax, data):
    """Stages in units of each model's own trace time, the goal a line at 3; torch.export's time as a dot."""
    rows = sorted(data["models"], key=lambda r: r["pipeline_over_trace"])
    names = [f"{r['model']} ({r['input'][-1]}px)" for r in rows]
    left = [0.0] * len(rows)
    for stage, colour in STAGE_COLOURS.items():
        widths = [r["stages_s"][stage] / r["fx_trace_s"] for r in rows]
        ax.barh(names, widths, left=left, color=colour, label=stage)
        left = [a + b for a, b in zip(left, widths)]
    ax.axvline(1.0, color="black", linewidth=1, label="torch.fx symbolic_trace = 1")
    ax.axvline(3.0, color="black", linestyle="--", linewidth=1, label="goal: pipeline <= 3x trace")
    exported = [(n, r["export_s"] / r["fx_trace_s"]) for n, r in zip(names, rows) if r.get("export_s")]
    if exported:
        ax.plot([x for _, x in exported], [n for n, _ in exported], "k.", label="torch.export.export")
    med = data["summary"]["pipeline_over_trace_median"]
    ax.set_title(f"Six-rule surgery, stages in multiples of trace time (median {med:.1f}x; goal <= 3x)", fontsize=9)
    ax.set_xlabel("stage time / symbolic_trace time (medians)")
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=7, loc="lower right")


def _scaling(ax, data):
    series = [("fxs_module", "total", "fxsurgery pipeline (type swap)", "-o"),
              ("fxs_module", "swap", "fxsurgery match+rewrite (type swap)", "-s"),
              ("fxs_function", "swap", "fxsurgery match+rewrite (F.relu)", "--s"),
              ("fxs_pattern", "swap", "fxsurgery pattern rule swap (F.relu)", "-.d"),
              ("fx_function", "replace_pattern", "torch.fx replace_pattern (F.relu)", "-^"),
              ("fx_trace", "total", "torch.fx symbolic_trace", ":.")]
    exps = data.get("exponents", {})
    labels = {"fxs_module/total": "fxs_pipeline", "fxs_module/swap": "fxs_type_swap",
              "fxs_function/swap": "fxs_function_swap", "fxs_pattern/swap": "fxs_pattern_swap",
              "fx_function/replace_pattern": "fx_replace_pattern",
              "fx_trace/total": "fx_trace"}
    for name, stage, label, style in series:
        pts = [(r["nodes"], r["median_s"][name][stage]) for r in data["sizes"] if name in r["median_s"]]
        if not pts:
            continue
        e = exps.get(labels[f"{name}/{stage}"], {}).get("exponent")
        ax.plot(*zip(*pts), style, label=f"{label}: n^{e:.2f}" if e is not None else label)
    two = data.get("two_users")
    if two:
        ax.scatter([two["nodes"]], [two["median_s"]["fx_function"]["replace_pattern"]], marker="*", s=80,
                   color="black", zorder=3, label="replace_pattern, relu read twice")
        ax.scatter([two["nodes"]], [two["median_s"]["fxs_function"]["swap"]], marker="*", s=80,
                   color="grey", zorder=3, label="fxsurgery swap, relu read twice")
        if "fxs_pattern" in two["median_s"]:
            ax.scatter([two["nodes"]], [two["median_s"]["fxs_pattern"]["swap"]], marker="P", s=60,
                       color="tab:purple", zorder=3, label="fxsurgery pattern rule, relu read twice")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("graph nodes")
    ax.set_ylabel("seconds (median)")
    ax.set_title("Scaling (goal: exponent <= 1.1)", fontsize=9)
    ax.legend(fontsize=6)


def _transfer(ax, data):
    rows = {k: v for k, v in data["variants"].items() if "seconds" in v}
    names = list(rows)
    ax.bar(names, [rows[n]["seconds"] for n in names], color="#4c72b0")
    ax.set_ylabel("seconds (median)")
    ax.tick_params(axis="x", labelsize=6, rotation=25)
    twin = ax.twinx()
    twin.plot(names, [rows[n]["peak_over_model"] for n in names], "o", color="#c44e52")
    twin.set_ylabel("peak RSS / model bytes", color="#c44e52")
    ax.set_title(f"Transfer, {data['model']} ({next(iter(rows.values()))['model_bytes'] / 1e9:.2f} GB)", fontsize=9)


def _speed(ax, data):
    rows = {k: v for k, v in data["cpu"]["models"].items() if "ratio" in v}
    gpu = {k: v for k, v in data.get("gpu", {}).items() if isinstance(v, dict) and "ratio" in v}
    rows.update({f"GPU {k}": v for k, v in gpu.items()})
    names = list(rows)
    ax.bar(names, [rows[n]["ratio"] for n in names], color="#55a868")
    ax.axhline(1.02, color="black", linestyle="--", linewidth=1, label="goal 1.02")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.set_ylim(0.8, max([1.1] + [rows[n]["ratio"] + 0.05 for n in names]))
    ax.tick_params(axis="x", labelsize=6, rotation=25)
    ax.set_ylabel("rewritten / original forward time")
    ax.set_title("Forward time after an empty surgery", fontsize=9)
    ax.legend(fontsize=7)


def plot(out_dir: Path) -> Path | None:
    try:
        import matplotlib
        matplotlib.use("Agg")  # no display on a benchmark machine
        import matplotlib.pyplot as plt
    except ImportError:
        print("[bench] matplotlib is not installed: no plot (pip install -e '.[bench]')")
        return None
    panels = [("pipeline", _pipeline), ("scaling", _scaling), ("transfer", _transfer), ("module_speed", _speed)]
    fig, axes = plt.subplots(2, 2, figsize=(15, 11))
    for ax, (name, draw) in zip(axes.flat, panels):
        data = read_json(out_dir, name)
        if data is None:
            ax.text(0.5, 0.5, f"{name}: not run", ha="center", va="center")
            ax.set_axis_off()
            continue
        draw(ax, data)
    machine = next((d["machine"] for d in (read_json(out_dir, n) for n, _ in panels) if d), {})
    fig.suptitle(f"fxsurgery benchmarks: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
                 f"{machine.get('torch_threads', '?')} torch threads, torch {machine.get('torch', '?')}", fontsize=10)
    fig.tight_layout()
    path = Path(out_dir) / "benchmarks.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
