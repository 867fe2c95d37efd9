"""An edited graph as data: the graph, what each target holds (`Slot`), and the example inputs it now takes.

Shared by the editor that makes it and by the blame that reads it, so neither imports the other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .._util import shape_text
from ..capture import Captured, Meta, adapt
from ..match import Match, Plan


@dataclass
class Slot:
    """What a target of the new graph holds, and where it came from."""

    value: Any
    source: str | None        # path in the original model; None when a rule made it
    rule: int | None = None   # the rule that made or replaced it
    weights: Any = "new"      # Replace(weights=...): how the replaced module's tensors fill this one
    sources: tuple = ()       # pattern rules: the modules its tensors were derived from (graph paths)
    derived: frozenset | None = None  # of those, the names of the tensors computed from them ("" a tensor's own); None: all


@dataclass(frozen=True)
class InputChange:
    """An example input whose shape the rules changed."""

    name: str
    before: tuple
    after: tuple
    rule: int
    why: str

    def __str__(self) -> str:
        return f"{self.name}: {shape_text(self.before)} -> {shape_text(self.after)} because {self.why}"


@dataclass
class Edited:
    """The rewritten graph, its target table and the bookkeeping of who did what."""

    captured: Captured
    plan: Plan
    graph: fx.Graph
    modules: dict[str, Slot]
    tensors: dict[str, Slot]
    inputs: dict[str, InputChange] = field(default_factory=dict)
    shapes: dict[str, Meta] = field(default_factory=dict)
    frozen: dict[str, int] = field(default_factory=dict)   # module path -> the pattern rule that freezes it
    shape_state: Any = field(default=None, repr=False)     # the capture's shape pass, moved on by each later pass

    def table(self) -> dict[str, Any]:
        return {**{p: s.value for p, s in self.modules.items()}, **{p: s.value for p, s in self.tensors.items()}}

    def example_inputs(self) -> tuple | None:
        """The graph's example inputs, adapted where the rules changed the interface."""
        original = self.captured.example_inputs
        if original is None:
            return None
        names = self.captured.input_names()
        return tuple(adapt(x, self.inputs[n].after) if n in self.inputs else x for n, x in zip(names, original))

    def rule_of(self, index: int) -> Match:
        return self.plan.matches[index - 1]


