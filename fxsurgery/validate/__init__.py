"""Check the rewritten model: lint, dead-code elimination, shape propagation.

torch.fx's lint checks only the graph's wiring, so a layer fed the wrong
shape passes it and fails at run time; shapes are therefore propagated on
fake tensors, and a mismatch is reported against the rule that caused it.
Where opaque Python sits between graphs, the assembled module is run once
on fake tensors as well, and a failure names the rule nearest to it.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

from .._util import first_line
from ..capture import PropagationError, clone, held_by, propagate, quiet_fake_tensors
from ..errors import ValidateError
from ..rewrite import Edited, Rewritten, shape_failure
from ._gradflow import GradientFlow, fake_flow, fake_of, gradient_flow, in_place

__all__ = [
    "GradientFlow", "check_module", "gradient_flow", "validate", "validate_graph",
]


def _impure(node: fx.Node, table: dict) -> bool:
    """torch.fx's notion, plus in-place tensor ops: `x.add_(pos)` has no users but matters
    (torchvision's MViT adds its position embedding that way). A node with users stays anyway:
    its purity is not asked (torch's check costs tens of microseconds a node)."""
    if node.users or (in_place(node) and node.op == "call_method"):
        return True
    module = table.get(node.target) if node.op == "call_module" else None
    if in_place(node) or getattr(module, "inplace", False) is True:  # `F.relu(y, inplace=True)`, `self.act(y)`: for the write
        written = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
        return written is None or len(written.users) > 1 or written.op in ("placeholder", "get_attr") or _view(written)
    if node.op == "call_module":  # what Node.is_impure reads from the graph's owning module
        return bool(getattr(module, "_is_impure", False))
    return node.is_impure()


def _view(node: fx.Node) -> bool:
    """A value that may share another's memory: a write into it writes there too (`y.flatten(1).relu_()`)."""
    return node.target is operator.getitem or (node.op == "call_method" and node.target in _VIEWS)


_VIEWS = frozenset({"view", "view_as", "flatten", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "narrow", "select",
                    "expand", "expand_as", "t", "unflatten", "as_strided", "diagonal", "movedim", "swapaxes", "unfold"})


def _check_targets(graph: fx.Graph, table: dict) -> None:
    """Every call_module / get_attr target is held by the table (or inside a module it holds)."""
    lookup = held_by(table)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            try:
                lookup(node.target)
            except KeyError:
                raise RuntimeError(f"node '{node.name}' ({node.op}) reads '{node.target}', which nothing in the new model holds") from None


def validate_graph(edited: Edited) -> Edited:
    """Lint, drop dead nodes and unused targets, then give every node a shape."""
    table = edited.table()
    try:  # dead-code elimination lints the graph first, and changes nothing if that fails
        _check_targets(edited.graph, table)
        edited.graph.eliminate_dead_code(is_impure_node=lambda node: _impure(node, table))
    except Exception as exc:
        last = edited.plan.matches[-1].label if edited.plan.matches else "the rules"
        raise ValidateError(f"{last}: the rewritten graph is malformed: {exc}; fix: check the order of the rules") from None
    used = {n.target for n in edited.graph.nodes if n.op in ("call_module", "get_attr")}
    # a module whose tensors the graph reads one by one (a MultiheadAttention whose heads were pruned) stays
    used |= {t.rsplit(".", i)[0] for t in list(used) for i in range(1, t.count(".") + 1)}
    for slots in (edited.modules, edited.tensors):
        for target in [t for t in slots if t not in used]:
            del slots[target]
    if edited.captured.example_inputs is not None:
        try:
            edited.shapes = propagate(edited.table(), edited.graph, edited.example_inputs(), edited.shape_state)
        except PropagationError as err:
            raise shape_failure(err, edited) from None
        _check_dtypes(edited)
    return edited


# layers whose kernels refuse an input of another dtype than their weights (norms take bfloat16 into float32)
_SAME_DTYPE = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.PReLU, nn.MultiheadAttention, nn.RNNBase)


def _check_dtypes(edited: Edited) -> None:
    """A layer a rule made whose weights are of another floating dtype than what reaches it (a float32 Linear in a
    bfloat16 model): fake tensors propagate the mix, a real run refuses it ("mat1 and mat2 must have the same dtype")."""
    for node in edited.graph.nodes:
        slot = edited.modules.get(node.target) if node.op == "call_module" else None
        if slot is None or slot.rule is None or not isinstance(slot.value, _SAME_DTYPE):
            continue
        own = {t.dtype for t in slot.value.parameters() if t.is_floating_point()}
        first = next((edited.shapes.get(a.name) for a in node.all_input_nodes), None)
        if len(own) != 1 or first is None or not first.is_tensor or first.dtype is None or not first.dtype.is_floating_point:
            continue
        if first.dtype not in own:
            (weights,) = own
            match = edited.rule_of(slot.rule)
            have, want = (str(d).replace("torch.", "") for d in (weights, first.dtype))
            raise ValidateError(f"{match.label} at node '{node.name}': {type(slot.value).__name__} holds {have} weights and "
                                f"receives {want}; fix: build it in {want} (.to(torch.{want})), or with fxs.new, which takes "
                                "the model's dtype")


def validate(rewritten: Rewritten) -> Rewritten:
    """Check every edited graph."""
    for edited in rewritten.graphs.values():
        validate_graph(edited)
    return rewritten


def _hooks(open_paths: list[str]):
    """Forward hooks on a copy that keep the stack of modules running; returns their removal."""
    def install(copy: nn.Module):
        handles = []
        for path, sub in copy.named_modules():
            handles.append(sub.register_forward_pre_hook(lambda m, a, p=path: open_paths.append(p)))
            handles.append(sub.register_forward_hook(lambda m, a, o: open_paths.pop() and None))  # None: output unchanged
        return lambda: [h.remove() for h in handles]
    return install


def _run(module: nn.Module, inputs: tuple, fake: bool, kwargs: dict | None = None) -> tuple[BaseException | None, str]:
    """Run a copy of `module` (fake or real tensors); the failure and the innermost module it was in."""
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    copy = clone(module, (lambda t: fake_of(mode, t)) if fake else (lambda t: t.detach().clone()))
    open_paths: list[str] = []
    remove = _hooks(open_paths)(copy)
    try:
        with (mode or contextlib.nullcontext()), quiet_fake_tensors(), torch.no_grad():
            args, keywords = pytree.tree_map(lambda x: mode.from_tensor(x) if fake and isinstance(x, torch.Tensor) else x,
                                             (tuple(inputs), dict(kwargs or {})))
            copy(*args, **keywords)
        return None, ""
    except Exception as exc:
        return exc, open_paths[-1] if open_paths else ""
    finally:
        remove()


def check_module(module: nn.Module, rewritten: Rewritten, kwargs: dict | None = None) -> GradientFlow | None:
    """Run the assembled module once (fake tensors, else a real copy); blame the rule nearest to a failure.

    The fake run records autograd's graph too, and the gradient flow it gives is returned (None
    where no run was needed, or where only a run without autograd or a real one passes): the
    surgery makes one fake forward pass for both."""
    inputs = rewritten.example_inputs()
    if inputs is None or not rewritten.capture.opaque:
        return None
    try:
        return fake_flow(module, inputs, kwargs)
    except Exception:  # the runs below find out why, and where
        pass
    exc, where = _run(module, inputs, fake=True, kwargs=kwargs)
    if exc is not None:  # fake tensors cannot run every model (data-dependent code): run it for real
        exc, where = _run(module, inputs, fake=False, kwargs=kwargs)
    if exc is None:
        return None
    culprit = _nearest_rule(rewritten, where)
    first = first_line(exc)
    what = f"{type(exc).__name__}: {first}"
    if culprit is None:
        raise ValidateError(f"the rewritten model fails in '{where or '(the model)'}': {what}; fix: check the rules that touch it")
    raise ValidateError(f"{culprit.label}: after this rule, '{where or '(the model)'}' ({type(module.get_submodule(where)).__name__}) "
                        f"fails: {what}; fix: keep what that module passes on (its output's type and shape) as it was")


def _nearest_rule(rewritten: Rewritten, where: str):
    """The last rule that edited `where` or something inside it; else inside its parent, and so on up."""
    edited = [(e.path, e.rule) for e in rewritten.edits]
    for m in rewritten.plan.matches:
        edited += [(s.module if s.module is not None else s.region, m.index) for s in m.sites if s.region is not None]
    scope = where
    while True:
        touched = [rule for path, rule in edited if not scope or path == scope or path.startswith(scope + ".")]
        if touched:
            return rewritten.rule_of(max(touched))
        if not scope:
            return None
        scope = scope.rpartition(".")[0]
