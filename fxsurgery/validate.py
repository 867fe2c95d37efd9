"""Check the rewritten graph: lint, dead-code elimination, shape propagation.

torch.fx's lint checks only the graph's wiring, so a layer fed the wrong
shape passes it and fails at run time; shapes are therefore propagated on
fake tensors, and a mismatch is reported against the rule that caused it.
"""

from __future__ import annotations

from torch import fx

from .errors import ValidateError
from .rewrite import Edited, shape_failure
from .shapes import PropagationError, propagate, root_of


def validate(edited: Edited) -> Edited:
    """Lint, drop dead nodes and unused targets, then give every node a shape."""
    shadow = fx.GraphModule(root_of(edited.table()), edited.graph)  # owns the graph for purity checks
    try:
        edited.graph.lint()
    except Exception as exc:
        last = edited.plan.matches[-1].label if edited.plan.matches else "the rules"
        raise ValidateError(f"{last}: the rewritten graph is malformed: {exc}; fix: check the order of the rules") from None
    edited.graph.eliminate_dead_code()
    used = {n.target for n in edited.graph.nodes if n.op in ("call_module", "get_attr")}
    for table in (edited.modules, edited.tensors):
        for target in [t for t in table if t not in used]:
            del table[target]
    del shadow
    if edited.captured.example_inputs is not None:
        try:
            edited.shapes = propagate(root_of(edited.table()), edited.graph, edited.example_inputs())
        except PropagationError as err:
            raise shape_failure(err, edited) from None
    return edited
