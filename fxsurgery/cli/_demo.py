"""The embedded default: fine-tune surgery on a torchvision ResNet-18, end to end.

Random weights (no download), the shipped rule file `resnet-finetune.yaml`,
a saved output directory, and a check that the saved model reloads to the
same outputs.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torchvision

from .._util import read_json, shown
from ..errors import SaveError
from ..export import load
from ..pipeline import SurgeryResult, apply
from ..spec import shipped_rules
from ..views import diff as write_diff


def rules_dir() -> Path:
    """The shipped rule files (rules/ in the source tree, package data when installed)."""
    return Path(shipped_rules())


def _trainable(module: torch.nn.Module) -> tuple[int, int]:
    seen, total, trainable = set(), 0, 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
    return total, trainable


_MARK = "demo.txt"


def _earlier_demo(out: Path) -> bool:
    """`out` is what an earlier demo wrote (its mark listed as one of the output's files), which a demo replaces."""
    try:
        return _MARK in read_json(out / "surgery.json").get("files", []) and (out / _MARK).is_file()
    except (OSError, ValueError, AttributeError):
        return False


def run(out: str | Path = "fxsurgery-demo", *, force: bool = False, echo=print) -> SurgeryResult:
    empty = Path(out).is_dir() and not any(Path(out).iterdir())
    if Path(out).exists() and not (force or empty or _earlier_demo(Path(out))):  # before the work: someone's output may be there
        raise SaveError(f"{shown(str(out))} exists and is not an earlier demo's output; fix: pass --force to replace it, "
                        "or -o another directory")
    start = time.perf_counter()
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    rules = rules_dir() / "resnet-finetune.yaml"
    x = torch.randn(1, 3, 224, 224)
    echo(f"model: torchvision.models.resnet18 (random weights)   rules: {rules.name}   input: [1, 3, 224, 224]")
    result = apply(model, [rules], example_inputs=(x,))
    echo(result.summary())
    before, after = _trainable(model), _trainable(result.module)
    echo(f"\nbefore: {before[0]:,} parameters, {before[1]:,} trainable; "
         f"after: {after[0]:,} parameters, {after[1]:,} trainable")
    mark = "written by `fxsurgery demo`: the next demo run replaces this directory\n"
    result.save(out, force=True, extra={"diff.html": lambda path: write_diff(result, path),
                                        _MARK: lambda path: path.write_text(mark, encoding="utf-8")})
    reloaded = load(out)
    model.eval(), result.module.eval(), reloaded.eval()
    with torch.no_grad():
        same = torch.equal(reloaded(x), result.module(x))
        logits = result.module(x)
    echo(f"output: {list(logits.shape)} (was {list(model(x).shape)}); "
         f"reloaded from {out}/: outputs {'bit-identical' if same else 'DIFFERENT'}")
    files = read_json(Path(out) / "surgery.json").get("files", [])  # what the output lists, graph.json included
    echo(f"wrote {out}/ ({', '.join(files)}) in {time.perf_counter() - start:.1f} s")
    if not same:
        raise RuntimeError("the saved model does not reproduce the result's outputs")
    return result
