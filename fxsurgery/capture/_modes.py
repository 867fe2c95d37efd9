"""Keep train/eval decisions live: what the original reads from `self.training`, the result reads at run time.

torch.fx runs Python while tracing, so `F.dropout(x, p, self.training)` is
recorded with the mode the model happened to be in. The model is therefore
traced in both modes (a copy sharing its tensors) and the graphs compared
node by node:

- identical: nothing depends on the mode;
- only constant arguments differ (`training=True/False`, `dropout_p=0.1/0.0`):
  after the surgery those arguments are computed from the graph module's own
  `self.training` (`training`, `training ^ True`, `training * 0.1`);
- the code itself differs (`if self.training:` branches): the surgery is made
  on both graphs and the result runs the one of its current mode
  (dualgraph.py), sharing every module and tensor.

Where the code differs and the model is not one graph (or the other mode
cannot be traced), the graph runs only in the mode it was captured in: a
guard in the graph (and in model.py) raises, naming the reason, in the other
mode. A mode read of a module left in another mode than the model's, or a
non-numeric argument that changes with the mode, is refused with a ModeError.
"""

from __future__ import annotations

import operator
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .._util import SAME_IN_BOTH_MODES
from ..errors import FxsError, ModeError, TraceError
from ._copying import share
from ._dualgraph import join
from ._guards import GUARD
from ._trace import module_stack, trace

_NUMBER = (bool, int, float)
_PRIMITIVE = (bool, int, float, str, type(None))


@dataclass
class Change:
    """One constant argument that takes another value in the other mode."""

    node: str
    target: Any
    where: tuple          # position inside (args, kwargs)
    value: Any            # in the mode the model was captured in
    other: Any            # in the other mode


@dataclass
class Modes:
    """How the captured graphs depend on the mode, and what keeps that dependence live."""

    training: bool                                             # the mode the model was captured in
    changes: dict[str, list[Change]] = field(default_factory=dict)   # region path -> constants to make live
    branch: str | None = None                                  # where the code itself differs (one graph only)
    other: Any = None                                          # the surgery made in the other mode
    guards: dict[str, str] = field(default_factory=dict)       # region path -> why it runs in one mode only

    def keep(self, module: nn.Module, plan) -> nn.Module:
        """`module` (the result of the surgery) with its mode decisions read at run time."""
        for path, changes in self.changes.items():
            gm = _region_module(module, path)
            if gm is not None:
                live(gm, changes, self.training)
        for path, why in self.guards.items():
            gm = _region_module(module, path)
            if gm is not None:
                guard(gm, f"'{path or gm.__class__.__name__}' was captured in {'train' if self.training else 'eval'} "
                          f"mode and {why}; capture the model again in the mode you run it in", self.training)
        if self.other is not None:
            module = join(module, self.other, not self.training, plan)  # each graph runs in its own mode
        return module


def _region_module(module: nn.Module, path: str) -> fx.GraphModule | None:
    try:
        found = module.get_submodule(path) if path else module
    except AttributeError:
        return None  # a rule replaced or removed it
    return found if isinstance(found, fx.GraphModule) else None


def flipped(model: nn.Module) -> nn.Module:
    """A copy of the model objects, every module in the other mode than its own, sharing every tensor."""
    copy = share(model)
    for sub in copy.modules():
        sub.training = not sub.training
    return copy


def _compare(a: Any, b: Any, where: tuple, out: list) -> bool:
    """Collect (where, a, b) for differing constants; False where the structure differs."""
    if isinstance(a, fx.Node) or isinstance(b, fx.Node):
        return isinstance(a, fx.Node) and isinstance(b, fx.Node) and a.name == b.name
    if isinstance(a, (tuple, list)) and type(a) is type(b):
        return len(a) == len(b) and all(_compare(x, y, where + (i,), out) for i, (x, y) in enumerate(zip(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_compare(a[k], b[k], where + (k,), out) for k in a)
    if isinstance(a, slice) and isinstance(b, slice):
        return _compare((a.start, a.stop, a.step), (b.start, b.stop, b.step), where + ("slice",), out)
    if a is b:
        return True
    if isinstance(a, _PRIMITIVE) and isinstance(b, _PRIMITIVE):
        if type(a) is not type(b) or a != b:
            out.append((where, a, b))
        return True
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:
        return False


def diff(graph: fx.Graph, other: fx.Graph) -> tuple[list[Change], str | None]:
    """(constants that differ, None) or ([], the first node where the code differs)."""
    changes: list[Change] = []
    # guards are added after tracing (messages may say more once probed): not code of either mode
    nodes, others = ([n for n in g.nodes if not n.meta.get(GUARD)] for g in (graph, other))
    for a, b in zip(nodes, others):
        found: list = []
        same = (a.op == b.op and a.name == b.name and (a.target is b.target or a.target == b.target)
                and _compare((a.args, a.kwargs), (b.args, b.kwargs), (), found))
        if not same:
            return [], a.name
        changes += [Change(a.name, a.target, where, x, y) for where, x, y in found]
    if len(nodes) != len(others):
        return [], (nodes[min(len(nodes), len(others)) - 1].name if nodes else "output")
    return changes, None


def _retrace(model: nn.Module, region, calls: bool) -> fx.Graph:
    module = model.get_submodule(region.path) if region.path else model
    example = (region.traced_at or region.example_inputs) if region.call is None else None
    options = dict(call=region.call, leaf_types=region.leaf_types, leaf_paths=region.leaf_paths, opaque=tuple(region.opaque),
                   path=region.path, dynamic=region.dynamic, shapes=False)
    try:
        return trace(module, example, values=calls, **options).graph
    except TraceError:  # code only the other mode runs needs example values (`torch.set_grad_enabled(self.training)`)
        if calls or (example is None and region.call is None):
            raise
        return trace(module, example, values=True, **options).graph


def _owners_in_mode(model: nn.Module, region, change: Change, graph: fx.Graph) -> bool:
    """True when every module the changed node was made in has the mode of the graph's module."""
    base = model.get_submodule(region.path) if region.path else model
    node = next(n for n in graph.nodes if n.name == change.node)
    for _, path in module_stack(node):
        try:
            owner = base.get_submodule(path) if path else base
        except AttributeError:
            continue
        if owner.training != base.training:
            return False
    return True


def _rerun(rerun: Callable, model: nn.Module, captured) -> Any:
    """The surgery on `model` (the other mode); where it fails and the example has a batch of 1 (train-mode
    BatchNorm takes no batch of one), made on the example repeated to a batch of 2 instead."""
    try:
        return rerun(model)
    except FxsError:
        call = (tuple(captured.example_inputs or ()), dict(captured.example_kwargs))
        ones = [t for t in pytree.tree_leaves(call) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1]
        if not ones:
            raise
        twice = pytree.tree_map(lambda t: torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1
                                else t, call)
        try:
            return rerun(model, twice)
        except FxsError:
            pass
        raise


def track(model: nn.Module, captured, rerun: Callable[..., Any]) -> Modes:
    """Compare the capture with one of a copy in the other mode; `rerun(copy)` makes the surgery
    on that copy when the code itself differs (one graph only)."""
    training = model.training
    other_model = flipped(model)
    modes = Modes(training)
    calls = bool(captured.calls)  # the regions were traced with example values (capture.py's walker)
    mixed = any(sub.training != training for sub in model.modules())
    other_mode = "eval" if training else "train"
    for region in captured.regions:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                other = _retrace(other_model, region, calls)
        except Exception as exc:
            modes.guards[region.path] = f"cannot be traced in {other_mode} mode ({type(exc).__name__})"
            continue
        changes, branch = diff(region.graph, other)
        if branch is not None:
            why = f"runs other code in {other_mode} mode (from node '{branch}')"
            one_graph = len(captured.regions) == 1 and not region.path and region.call is None and not captured.opaque
            if not one_graph or mixed:
                modes.guards[region.path] = why + (", inside a model that is not one graph" if not one_graph else
                                                   ", and some of its modules are in another mode than the model")
                continue
            try:
                modes.other = _rerun(rerun, other_model, captured)
            except FxsError as err:
                modes.guards[region.path] = f"{why}, where the surgery fails: {err.problem}"
                continue
            modes.branch = branch
            return modes
        follows = {c.node for c in changes}
        for n in region.graph.nodes:  # what rules may trust as the same in both modes (drop_dropout: training=True)
            n.meta[SAME_IN_BOTH_MODES] = n.name not in follows
        for change in changes:
            if mixed and not _owners_in_mode(model, region, change, region.graph):
                raise ModeError(f"'{region.path or type(model).__name__}' at node '{change.node}': reads self.training "
                                "of a module in another mode than the model; fix: call model.train() or model.eval() "
                                "before the surgery")
            if not isinstance(change.value, _NUMBER) or not isinstance(change.other, _NUMBER):
                raise ModeError(f"'{region.path or type(model).__name__}' at node '{change.node}': an argument is "
                                f"{change.value!r} in one mode and {change.other!r} in the other; fix: capture it in "
                                "the mode you will run it in")
        if changes:
            modes.changes[region.path] = changes
    return modes


def _leaf(value: Any, where: tuple) -> Any:
    for key in where:
        value = (value.start, value.stop, value.step) if key == "slice" else value[key]
    return value


def _replace(value: Any, where: tuple, new: Any) -> Any:
    if not where:
        return new
    key, rest = where[0], where[1:]
    if key == "slice":
        parts = _replace((value.start, value.stop, value.step), rest, new)
        return slice(*parts)
    if isinstance(value, dict):
        return {k: (_replace(v, rest, new) if k == key else v) for k, v in value.items()}
    items = [(_replace(v, rest, new) if i == key else v) for i, v in enumerate(value)]
    return type(value)(items)


def mode_node(graph: fx.Graph) -> fx.Node:
    """The graph's `self.training` (a get_attr node, made once, after the inputs)."""
    for node in graph.nodes:
        if node.op == "get_attr" and node.target == "training":
            return node
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1] if placeholders else None
    with (graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(None)):
        return graph.create_node("get_attr", "training", name="training")


def _expression(graph: fx.Graph, mode: fx.Node, train: Any, eval_: Any, before: fx.Node) -> Any:
    """A node that is `train` in train mode and `eval_` in eval mode, in plain arithmetic
    (the generated code reads as `training * 0.1` and traces again)."""
    with graph.inserting_before(before):
        if isinstance(train, bool) and isinstance(eval_, bool):
            return mode if train else graph.call_function(operator.xor, (mode, True))
        on = graph.call_function(operator.mul, (mode, train))
        if eval_ == 0 and type(eval_) is type(train):
            return on
        off = graph.call_function(operator.mul, (graph.call_function(operator.xor, (mode, True)), eval_))
        return graph.call_function(operator.add, (on, off))


def live(gm: fx.GraphModule, changes: list[Change], training: bool) -> int:
    """Make each recorded constant of `gm`'s graph follow `gm.training`; returns how many did."""
    named = {n.name: n for n in gm.graph.nodes}
    done = 0
    for change in changes:
        node = named.get(change.node)
        if node is None or node.target is not change.target and node.target != change.target:
            continue  # a rule replaced it
        args = (node.args, node.kwargs)
        try:
            now = _leaf(args, change.where)
        except (IndexError, KeyError, TypeError):
            continue
        if isinstance(now, fx.Node) or type(now) is not type(change.value) or now != change.value:
            continue  # a rule set it
        train, eval_ = (change.value, change.other) if training else (change.other, change.value)
        value = _expression(gm.graph, mode_node(gm.graph), train, eval_, node)
        node.args, node.kwargs = _replace(args, change.where, value)
        done += 1
    if done:
        gm.recompile()
        for hook in list(getattr(gm, "_deepcopy_hooks", ())):
            hook(gm)  # an adapter (shim.py) holds the compiled forward: install it again
    return done


def guard(gm: fx.GraphModule, message: str, training: bool) -> None:
    """Make `gm` raise `message` when it runs in the other mode than `training`."""
    graph = gm.graph
    mode = mode_node(graph)
    with graph.inserting_after(mode):
        same = graph.call_function(operator.eq, (mode, training))
    with graph.inserting_after(same):
        graph.call_function(torch._assert, (same, message))
    gm.recompile()
    for hook in list(getattr(gm, "_deepcopy_hooks", ())):
        hook(gm)
