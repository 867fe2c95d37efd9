"""Gradient and autocast modes the forward sets itself, which torch.fx does not record.

`with torch.no_grad(): t = self.teacher(x)` (an EMA teacher, a momentum
encoder, targets computed on the fly) traced as plain nodes lets gradients
reach, and an optimizer move, parameters the original never trains. While
tracing, the forward's own switches of the gradient mode (`torch.no_grad`,
`@torch.no_grad()`, `torch.set_grad_enabled(False)`, `torch.inference_mode`)
are watched, and every node made with gradients off is marked. After tracing,
what such a node reads from outside (an input, a parameter, an earlier
value) is read through `.detach()`, and so is what a module called there
returns (its own parameters are inside it): no gradient crosses the region,
in either direction, as under no_grad, and every value is the same.

Knowing which values are tensors takes the example's values; a trace
without them stops there (the capture then traces with values, or keeps
the module as Python). `torch.autocast` changes the dtypes the ops inside
compute in, which a graph cannot hold: its module stays Python.
"""

from __future__ import annotations

import contextlib
import operator

import torch
from torch import fx
from torch.amp import autocast_mode
from torch.autograd import grad_mode
from torch.utils import _pytree as pytree

NO_GRAD = "fxs_no_grad"  # node meta: made while the forward had gradients turned off
_MISSING = object()


@contextlib.contextmanager
def watched(tracer):
    """Trace with gradients on (so that the forward's own switch shows), noting where the forward turns them off:
    `tracer.grad_off` while it is. Computing an example value (`tracer.evaluating`) is not the forward's."""
    set_grad, inference_enter, inference_exit = torch._C._set_grad_enabled, grad_mode.inference_mode.__enter__, grad_mode.inference_mode.__exit__
    autocast_enter = autocast_mode.autocast.__enter__
    tracer.grad_off, depth = False, [0]

    def theirs() -> bool:
        return not getattr(tracer, "evaluating", False)

    def off() -> None:
        if getattr(tracer, "values", None) is None:
            raise fx.proxy.TraceError("the code turns gradients off (torch.no_grad); cutting them in a graph takes example inputs")

    def switched(mode):
        if theirs():
            if not mode:
                off()
            tracer.grad_off = not mode or depth[0] > 0
        return set_grad(mode)

    def entered(self):
        if theirs() and self.mode:
            off()
            depth[0] += 1
            tracer.grad_off = True
        return inference_enter(self)

    def left(self, *exc):
        left_ = inference_exit(self, *exc)
        if theirs() and self.mode:
            depth[0] -= 1
            tracer.grad_off = depth[0] > 0 or not torch.is_grad_enabled()
        return left_

    def autocast(self):
        if theirs():
            raise fx.proxy.TraceError("the code enters torch.autocast, whose dtypes a graph does not hold")
        return autocast_enter(self)

    with torch.enable_grad():  # entered and left unwatched: a capture may run under no_grad
        torch._C._set_grad_enabled = switched
        grad_mode.inference_mode.__enter__, grad_mode.inference_mode.__exit__ = entered, left
        autocast_mode.autocast.__enter__ = autocast
        try:
            yield
        finally:
            torch._C._set_grad_enabled = set_grad
            grad_mode.inference_mode.__enter__, grad_mode.inference_mode.__exit__ = inference_enter, inference_exit
            autocast_mode.autocast.__enter__ = autocast_enter


def cut(graph: fx.Graph, values: dict | None, root) -> int:
    """Detach what the nodes marked NO_GRAD read from outside, and what modules called there return. Returns
    the number of detaches made."""
    inside = [n for n in graph.nodes if n.meta.get(NO_GRAD)]
    if not inside:
        return 0
    marked = set(inside)

    made_values: dict[fx.Node, object] = {}  # the detaches made here: what they detach

    def value_of(node: fx.Node):
        value = made_values.get(node, values.get(node, _MISSING) if values is not None else _MISSING)
        if value is _MISSING and node.op == "get_attr":
            try:
                value = _attr(root, node.target)
            except AttributeError:
                value = _MISSING
        if value is _MISSING:
            raise fx.proxy.TraceError(f"the code turns gradients off (torch.no_grad) around '{node.name}', whose value "
                                      "is not known; a graph cannot cut gradients there")
        return value

    def is_tensor(node: fx.Node) -> bool:
        return isinstance(value_of(node), torch.Tensor)

    def holds_tensors(node: fx.Node) -> bool:  # a tuple, list or dict with a tensor in it
        value = value_of(node)
        return not isinstance(value, torch.Tensor) and any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value))

    made: dict[fx.Node, fx.Node] = {}

    def detach(value: fx.Node, where: fx.Node, after: bool) -> fx.Node:
        with (graph.inserting_after(value) if after else graph.inserting_before(where)):
            node = graph.call_method("detach", (value,))
        node.meta.update({k: where.meta[k] for k in ("nn_module_stack", "stack_trace") if k in where.meta})
        if where.op == "call_module" and node.meta.get("nn_module_stack"):  # beside the module called, not inside it
            node.meta["nn_module_stack"] = dict(list(node.meta["nn_module_stack"].items())[:-1])
        node.meta[NO_GRAD] = True
        marked.add(node)
        made_values[node] = value_of(value)
        return node

    done: set[fx.Node] = set()

    def cut_out(node: fx.Node) -> int:
        """Detach what `node` gives, wherever it is read: a tensor itself; out of a tuple or dict, each value read
        (`out, (h, c) = self.lstm(x)`: h and c, inside the region or after it)."""
        if node in done:
            return 0
        done.add(node)
        if is_tensor(node):
            users = list(node.users)
            cut_node = detach(node, node, after=True)
            for user in users:
                user.replace_input_with(node, cut_node)
            return 1
        if not holds_tensors(node):
            return 0
        if any(u.op != "call_function" or u.target is not operator.getitem for u in node.users):
            raise fx.proxy.TraceError(f"the code turns gradients off (torch.no_grad) around '{node.name}', whose "
                                      "values are not read one by one; a graph cannot cut gradients there")
        return sum(cut_out(u) for u in list(node.users))

    count = 0
    for node in inside:
        for source in node.all_input_nodes:
            if source in marked or source.op == "output" or not is_tensor(source):
                continue
            if source not in made:
                made[source] = detach(source, node, after=False)
                count += 1
            node.replace_input_with(source, made[source])
        # a gradient may come in other than through a tensor read: a module's own parameters, or a value read out of
        # a tuple or dict (made before the region, or a module's tuple of outputs)
        if node.op == "call_module" or any(holds_tensors(s) for s in node.all_input_nodes):
            count += cut_out(node)
    return count


def cut_of(node: fx.Node) -> fx.Node | None:
    """What the rest of the graph reads of `node`: the detach a no_grad region's module output is read through,
    else `node` itself (an `Output` there returns what the original's region gives: no gradient); None for a tuple
    made there whose values are read one by one through detaches (an LSTM's), which leaves the region whole."""
    users = list(node.users)
    if not node.meta.get(NO_GRAD):
        return node
    if len(users) == 1 and users[0].meta.get(NO_GRAD) and users[0].target == "detach":
        return users[0]
    picked = [u for u in users if u.op == "call_function" and u.target is operator.getitem]
    return None if picked and any(cut_of(u) is not u for u in picked) else node


def _attr(root, target: str):
    value = root
    for part in target.split("."):
        value = getattr(value, part)
    return value
