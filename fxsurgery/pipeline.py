"""The recipe: trace -> match -> rewrite -> validate -> transfer, and its result."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import fx, nn

from .loader import load_rules
from .match import Plan, match
from .capture import Capture, capture
from .graphedit import InputChange
from .rewrite import rewrite
from .export import save
from .shapes import Meta, shape_text
from .spec import Rule, flatten
from .trace import Captured
from .transfer import TransferReport, transfer
from .validate import check_module, validate


class SurgeryWarning(UserWarning):
    """Something worth reading that is not an error (e.g. freezing a module without parameters)."""


@dataclass
class SurgeryResult:
    """The regenerated module and everything said about how it was made."""

    module: fx.GraphModule
    report: TransferReport
    plan: Plan
    rules: list[Rule]
    example_inputs: tuple | None = None
    original_inputs: tuple | None = None
    input_changes: list[InputChange] = field(default_factory=list)
    original: Captured | None = None          # the traced original, when one graph holds it all
    shapes: dict[str, Meta] = field(default_factory=dict)  # node name -> shape in the new graph
    capture: Capture | None = None            # every graph and opaque module of the original

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What an optimizer should get: parameters that require grad, each object once."""
        seen, out = set(), []
        for p in self.module.parameters():
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def summary(self) -> str:
        parts = ["plan:", self.plan.table(), "", "transfer:", self.report.table()]
        if self.input_changes:
            parts += ["", "inputs:"] + [f"  {c}" for c in self.input_changes]
        if self.plan.warnings:
            parts += ["", "warnings:"] + [f"  {w}" for w in self.plan.warnings]
        return "\n".join(parts)

    def coverage(self) -> dict:
        """Traced graphs, opaque modules with the reason each stays Python, share of parameters in graphs."""
        return self.capture.coverage()

    def to_dict(self) -> dict:
        def shapes(inputs):
            return [list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs or ()]
        return {
            "rules": [{"rule": i, "text": str(r), "origin": str(r.origin)} for i, r in enumerate(self.rules, start=1)],
            "matches": self.plan.to_dict(),
            "warnings": list(self.plan.warnings),
            "inputs": {"before": shapes(self.original_inputs), "after": shapes(self.example_inputs),
                       "changes": [str(c) for c in self.input_changes]},
            "report": self.report.to_dict(),
            "coverage": self.capture.coverage() if self.capture is not None else None,
        }

    def diff(self, path: str | os.PathLike) -> Path:
        """Write the graph before and after as one self-contained HTML page or an SVG, chosen by the suffix."""
        from .diff import write  # the view sits above the pipeline; imported when asked for
        return write(self, path)

    def save(self, directory: str | os.PathLike, *, force: bool = False, formats=()) -> Path:
        """Write model.py + model.safetensors + surgery.json (atomically), plus any `formats`
        ("pt2", "onnx", "torchscript"), each verified on the example inputs."""
        return save(self.module, directory, force=force, record=self.to_dict(), formats=formats,
                    example_inputs=self.example_inputs)


def apply(model: nn.Module, rules, example_inputs=None, *, params: dict | None = None, allow=(),
          strict: bool = False, leaf_types=(), leaf_paths=()) -> SurgeryResult:
    """Apply `rules` to `model` (never modified) and return the regenerated module.

    >>> result = apply(resnet18(), [Replace("fc", new(nn.Linear, out_features=10))],
    ...                example_inputs=(torch.randn(1, 3, 224, 224),))
    >>> result.module(torch.randn(2, 3, 224, 224)).shape
    torch.Size([2, 10])
    """
    rule_list = flatten(rules, lambda path: load_rules(path, params=params, allow=allow))
    captured = capture(model, example_inputs, leaf_types=leaf_types, leaf_paths=leaf_paths)
    plan = match(captured, rule_list)                 # read-only
    rewritten = validate(rewrite(captured, plan))     # the only stage that edits structure, then checked
    module, report = transfer(rewritten, strict=strict)
    check_module(module, rewritten)                   # where opaque code joins the graphs
    for warning in plan.warnings:
        warnings.warn(warning, SurgeryWarning, stacklevel=2)
    root = rewritten.root
    return SurgeryResult(module, report, plan, rule_list, rewritten.example_inputs(), captured.example_inputs,
                         rewritten.input_changes(), captured.regions[0] if captured.complete else None,
                         root.shapes if root is not None else {}, captured)


def describe_inputs(inputs) -> str:
    return ", ".join(shape_text(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs or ())
