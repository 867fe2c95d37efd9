"""Which rule a failing node owes its inputs to, and the one-line error that says so;
the source line a node came from."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING

from torch import fx, nn

from .._util import first_line, shape_text
from ..capture import PropagationError
from ..errors import ValidateError
from ..match import Match
from ..spec import describe
from ._fitting import expected_input

if TYPE_CHECKING:  # annotations only: the editor (which imports this module) makes Edited
    from ._edited import Edited


def blame(edited: Edited, node: fx.Node) -> Match | None:
    """The rule that made, changed or rewired `node` or, nearest first, a node upstream of it."""
    queue, seen = [node], {node}
    while queue:
        candidate = queue.pop(0)
        index = candidate.meta.get("fxs_rule", candidate.meta.get("fxs_rewired"))
        if index is None and candidate.op == "call_module" and candidate.target in edited.modules:
            index = edited.modules[candidate.target].rule
        if index is not None:
            return edited.rule_of(index)
        for arg in candidate.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                queue.append(arg)
    return None


def _later_upstream(edited: Edited, node: fx.Node, index: int) -> Match | None:
    """A rule after rule `index` that changed what reaches `node` (the nearest upstream), if any."""
    found = [blame(edited, arg) for arg in node.all_input_nodes]
    later = [m for m in found if m is not None and m.index > index]
    return min(later, key=lambda m: m.index) if later else None


def shape_failure(err: PropagationError, edited: Edited) -> ValidateError:
    """A one-line error for a node that fails on its new inputs, naming the rule."""
    node, exc = err.node, err.exc
    culprit = blame(edited, node)
    where = f"{culprit.label} at node '{node.name}' [{node.op}]" if culprit else f"node '{node.name}' [{node.op}]"
    incoming = [err.metas.get(a.name) for a in node.all_input_nodes]
    shape = next((mt.shape for mt in incoming if mt is not None and mt.is_tensor), None)
    module = edited.modules[node.target].value if node.op == "call_module" and node.target in edited.modules else None
    if module is not None and shape is not None:
        wanted = expected_input(module, shape)
        made = culprit is not None and edited.modules[node.target].rule == culprit.index
        if wanted != tuple(shape):
            later = _later_upstream(edited, node, culprit.index) if made else None
            if later is not None:  # sized (or inferred) for what reached it then; a later rule changed that
                return ValidateError(f"{where}: what reaches it is now {shape_text(shape)}, changed by rule {later.index} "
                                     f"'{later.rule}' after this rule sized it; fix: put rule {culprit.index} after rule "
                                     f"{later.index} (fxs.new then infers the new size), or set it to match {shape_text(shape)}")
            fix = (f"drop the shape argument and let it be inferred (fxs.new), or set it to match {shape_text(shape)}" if made
                   else "replace this layer too (fxs.new infers its input size), or insert a layer that maps the shape")
            return ValidateError(f"{where}: {describe(module)} does not fit the incoming shape {shape_text(shape)}; fix: {fix}")
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and "more than 1 value per channel" in str(exc):
        return ValidateError(f"{where}: {type(module).__name__} in training mode needs 2+ values per channel, gets "
                             f"{shape_text(shape)}; fix: example inputs with a batch of 2 or more (--input 2x...), or eval mode (--eval)")
    first = first_line(exc)
    sizes = _fixed_sizes(node)
    if sizes and "is invalid for input of size" in first:  # the code reshapes to a size it read when it was captured
        return ValidateError(f"{where}: the forward reshapes to ({', '.join(map(str, sizes))}), sizes fixed at capture; "
                             "fix: leave out the inputs that lead there (labels=: a loss over the old classes), or keep_class=True")
    return ValidateError(f"{where}: {type(exc).__name__}: {first}; fix: check that the rule's replacement fits the shapes around it (inspect the model "
                         f"with 'fxsurgery inspect')")


def _fixed_sizes(node: fx.Node) -> list[int]:
    """The literal sizes a view or reshape node asks for; [] for any other node."""
    if not (node.op == "call_method" and node.target in ("view", "reshape")):
        return []
    sizes = node.args[1:]
    sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else sizes
    return list(sizes) if all(type(s) is int for s in sizes) else []


def source_line(model: nn.Module, node: fx.Node, above: str) -> str:
    """Where the forward code reads `node`'s target ("file.py:12 `code`"): the node's recorded
    stack trace, else the line of a forward above the module `above` (innermost first) that names it; '' if none."""
    if node.stack_trace:
        last = [line.strip() for line in node.stack_trace.strip().splitlines() if line.strip()]
        return " ".join(last[-2:])
    parts = str(node.target).split(".")
    for i in range(len(above.split(".")) - 1, -1, -1):
        try:
            owner = model.get_submodule(".".join(parts[:i]))
            lines, start = inspect.getsourcelines(type(owner).forward)
            file = inspect.getsourcefile(type(owner).forward)
        except (AttributeError, OSError, TypeError):
            continue
        wanted = "self." + ".".join(parts[i:])
        for offset, line in enumerate(lines):
            if wanted in line:
                return f"{file}:{start + offset} `{line.strip()}`"
    return ""
