"""Pruning beside Torch-Pruning: the same channels removed by both, on resnet50 and vit_b_16 at 30% and 50%.

resnet50: the inner width of every bottleneck (conv1 and conv2 outputs; the
residual streams stay). vit_b_16: the MLP hidden units of every encoder layer
(its residual stream passes LayerNorms, which fxsurgery refuses to prune
inexactly). The channels are chosen once (lowest L1 norm of each layer's
output weights) and given to both, so both results have the same parameters;
measured: parameters, MACs (torch.utils.flop_counter, FLOPs / 2), CPU latency
at batch 1 and 224x224 (median of interleaved runs), the time to plan and
apply the prune (fxsurgery: `fxs.apply`; Torch-Pruning: building the
dependency graph, then each group's prune), and the largest output difference.

vit_b_16_heads: the attention heads of every encoder layer (lowest L1 norm of
the weights each head owns). Torch-Pruning removes heads of separate q/k/v
Linear layers only; torchvision's ViT uses torch.nn.MultiheadAttention, which
it can only narrow in embed_dim (the residual stream), so its column says so
and the row compares fxsurgery with the original.

    python -m benchmarks.prune --out benchmarks/results [--models vit_b_16_heads]

MACs are counted with MultiheadAttention's fused fast path off (the counter
cannot see inside it); latency runs with it on.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch.utils.flop_counter import FlopCounterMode

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxsurgery as fxs  # noqa: E402
from benchmarks.common import log, machine, write_json  # noqa: E402
from fxsurgery import Prune  # noqa: E402

CASES = {
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), r"re:layer\d\.\d+\.conv[12]", "conv"),
    "vit_b_16": (lambda: torchvision.models.vit_b_16(weights=None), r"re:encoder\.layers\.encoder_layer_\d+\.mlp\.0", "linear"),
}


def macs(model, x) -> int:
    counter = FlopCounterMode(display=False)
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # MultiheadAttention's fused kernel hides its matmuls from the counter
    try:
        with counter, torch.no_grad():
            model(x)
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return counter.get_total_flops() // 2


def latency(models: dict, x, rounds: int) -> dict:
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(x)  # warm up
        for r in range(rounds):
            names = list(models)
            for k in names[r % len(names):] + names[:r % len(names)]:
                t = time.perf_counter()
                models[k](x)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def chosen(model, selector: str, amount: float) -> dict[str, list[int]]:
    """path -> output channels to remove (lowest L1), what both tools are given."""
    rule = Prune(selector, amount=amount)
    out = {}
    for path, m in model.named_modules():
        if rule.target.matches_name(path) and isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            out[path] = rule.choose(m, m.weight.shape[0], path)
    return out


def run_case(name: str, amount: float, rounds: int) -> dict:
    import torch_pruning as tp
    build, selector, kind = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(1, 3, 224, 224)
    plan = chosen(model, selector, amount)
    t = time.perf_counter()
    ours = fxs.apply(model, [Prune(path, channels=ch) for path, ch in plan.items()], example_inputs=(x,)).module
    ours_time = time.perf_counter() - t
    theirs = copy.deepcopy(model)
    t = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(theirs, example_inputs=x)
    how = tp.prune_conv_out_channels if kind == "conv" else tp.prune_linear_out_channels
    for path, ch in plan.items():
        graph.get_pruning_group(theirs.get_submodule(path), how, idxs=list(ch)).prune()
    theirs_time = time.perf_counter() - t
    with torch.no_grad():
        diff = (ours(x) - theirs(x)).abs().max().item()
    models = {"original": model, "fxsurgery": ours, "torch_pruning": theirs}
    lat = latency(models, x, rounds)
    row = {"model": name, "amount": amount, "layers": len(plan), "channels_removed": sum(map(len, plan.values())),
           "max_output_difference": diff, "plan_and_apply_s": {"fxsurgery": ours_time, "torch_pruning": theirs_time}}
    for k, m in models.items():
        row[k] = {"parameters": sum(p.numel() for p in m.parameters()), "macs": macs(m, x), "latency_s": lat[k]}
    log(f"{name} {amount:.0%}: params {row['original']['parameters']:,} -> {row['fxsurgery']['parameters']:,} "
        f"(torch-pruning {row['torch_pruning']['parameters']:,}); plan+apply fxsurgery {ours_time:.1f}s, "
        f"torch-pruning {theirs_time:.1f}s; latency {lat['original'] * 1e3:.0f} -> {lat['fxsurgery'] * 1e3:.0f} ms "
        f"(torch-pruning {lat['torch_pruning'] * 1e3:.0f} ms); max |diff| {diff:.2e}")
    return row


def run_heads(amount: float, rounds: int) -> dict:
    torch.manual_seed(0)
    model = torchvision.models.vit_b_16(weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    t = time.perf_counter()
    result = fxs.apply(model, [Prune(r"re:encoder\.layers\.encoder_layer_\d+\.self_attention", amount=amount)], example_inputs=(x,))
    ours_time = time.perf_counter() - t
    ours = result.module
    models = {"original": model, "fxsurgery": ours}
    lat = latency(models, x, rounds)
    removed = sum(1 for e in result.report.entries if e.name.endswith("out_proj.weight") and e.status == "adapted")
    row = {"model": "vit_b_16_heads", "amount": amount, "layers": removed, "heads_removed": removed * int(amount * 12),
           "plan_and_apply_s": {"fxsurgery": ours_time},
           "torch_pruning": "removes heads of separate q/k/v Linear layers only; torch.nn.MultiheadAttention is narrowed in "
                            "embed_dim (the residual stream), not in heads"}
    for k, m in models.items():
        row[k] = {"parameters": sum(p.numel() for p in m.parameters()), "macs": macs(m, x), "latency_s": lat[k]}
    log(f"vit_b_16 heads {amount:.0%}: params {row['original']['parameters']:,} -> {row['fxsurgery']['parameters']:,}; "
        f"plan+apply fxsurgery {ours_time:.1f}s; latency {lat['original'] * 1e3:.0f} -> {lat['fxsurgery'] * 1e3:.0f} ms")
    return row


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--models", default="resnet50,vit_b_16,vit_b_16_heads")
    args = parser.parse_args(argv)
    rows = [run_heads(amount, args.rounds) if name == "vit_b_16_heads" else run_case(name, amount, args.rounds)
            for name in args.models.split(",") for amount in (0.3, 0.5)]
    earlier = Path(args.out) / "prune.json"  # rows of the models not run this time are kept
    names = {r["model"] for r in rows}
    kept = [r for r in json.loads(earlier.read_text())["rows"] if r["model"] not in names] if earlier.exists() else []
    write_json(Path(args.out), "prune", {"benchmark": "prune", "machine": machine(), "rows": kept + rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
