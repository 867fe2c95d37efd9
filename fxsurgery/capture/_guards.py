"""Guards on the decisions Python made while tracing, not on whole input shapes.

Where the traced code needs a number (`if seq_len > 4:`, `range(n)`, a size
passed to Python), the example's number is used and the graph holds only the
branch taken. Each such decision becomes an assertion placed right after the
node whose value was decided: at run time the graph recomputes that value and
raises, naming the condition and the source line, when another call would
have decided otherwise. Size reads stay graph nodes, so every other size flows.

Which input dimensions a decision depends on is found by running the graph
again on fake inputs with one dimension changed (torch's fake tensors: no
weights touched) and seeing whether the decided value changes: a dimension
that changes it at every probe is specialised by the decision.

An example size of 1 takes size-1 branches (`if batch != ids.shape[0]:`), so
a decision pinning a size-1 dim has the model captured again with it at 2, kept
where that leaves the dim general, its guards pass size 1 too, and it gives the
example's outputs bit for bit (size-1 runs the code of sizes >= 2, as torch's
size-oblivious guards assume); else the dim stays specialised.
"""

from __future__ import annotations

import operator
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils import _pytree as pytree

from ..errors import FxsError
from ._copying import clone
from ._shapes import PropagationError, propagate, quiet_fake_tensors

_OWN = (os.path.dirname(torch.__file__), os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SYMBOLS = {operator.gt: ">", operator.ge: ">=", operator.lt: "<", operator.le: "<=", operator.eq: "==",
            operator.ne: "!=", operator.add: "+", operator.sub: "-", operator.mul: "*", operator.floordiv: "//",
            operator.truediv: "/", operator.mod: "%", operator.and_: "&", operator.or_: "|"}
GUARD = "fxsurgery_guard"  # node.meta key: the node asserts a decision (probes skip it)
SPEC = "fxsurgery_spec_guard"  # node.meta key: the node asserts a dim dynamic_shapes leaves static


@dataclass
class Decision:
    """One place where Python took the example's value of a graph node."""

    node: fx.Node
    kind: str                 # "bool", "index", "len" or "value" (a dtype Python needed: torch.finfo(x.dtype))
    value: Any                # what Python got: True/False, an int
    source: str = ""          # "modeling_bert.py:123 (if seq_length > 4:)"
    depends: list[tuple[str, int]] = field(default_factory=list)   # (input, dim) whose change changes it
    forces: list[tuple[str, int]] = field(default_factory=list)    # ... at every probe: specialised
    ones: list[tuple[str, int]] = field(default_factory=list)      # ... at size 1 alone (a batch of 1 takes another branch)
    guard: fx.Node | None = None                                   # the torch._assert node
    example: dict = field(default_factory=dict)                    # input -> example shape, for messages

    @property
    def condition(self) -> str:
        text = render(self.node)
        return f"len({text})" if self.kind == "len" else text

    def describe(self) -> str:
        return f"`{self.condition}` is {self.value!r}" + (f" at {self.source}" if self.source else "")


def source_line() -> str:
    """'file.py:12 (the line)': the innermost frame of the model's own code (outside torch and fxsurgery)."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        if not name.startswith(_OWN) and not name.startswith("<"):
            import linecache
            text = linecache.getline(name, frame.f_lineno).strip()
            short = os.path.join(*name.split(os.sep)[-2:]) if os.sep in name else name
            return f"{short}:{frame.f_lineno}" + (f" ({text})" if text else "")
        frame = frame.f_back
    return ""


def render(node: Any, depth: int = 0) -> str:
    """Python-like text of a node's value, down to the size reads it comes from."""
    if not isinstance(node, fx.Node):
        return repr(node)
    if depth > 6:
        return node.name
    args = node.args
    if node.op == "placeholder":
        return node.name
    if node.op == "call_function":
        if node.target in _SYMBOLS and len(args) == 2:
            text = f"{render(args[0], depth + 1)} {_SYMBOLS[node.target]} {render(args[1], depth + 1)}"
            return f"({text})" if depth else text
        if node.target is operator.getitem:
            return f"{render(args[0], depth + 1)}[{render(args[1], depth + 1)}]"
        if node.target is getattr:
            return f"{render(args[0], depth + 1)}.{args[1]}"
        if node.target is len:
            return f"len({render(args[0], depth + 1)})"
    if node.op == "call_method" and node.target in ("size", "dim") and args:
        inner = ", ".join(render(a, depth + 1) for a in args[1:])
        return f"{render(args[0], depth + 1)}.{node.target}({inner})"
    return node.name


def unique(decisions: list[Decision]) -> list[Decision]:
    seen, out = set(), []
    for d in decisions:
        key = (d.node, d.kind, d.value)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return out


def dims_text(dims) -> str:
    return ", ".join(f"dim {dim} of '{name}'" for name, dim in dims)


def message(decision: Decision, where: str) -> str:
    """The guard's error: the condition, its source line, the input dimensions it depends on, the fix."""
    on = f" (it depends on {dims_text(decision.forces)})" if decision.forces else ""
    ones = [(n, i) for n, i in decision.forces if decision.example.get(n, ())[i:i + 1] == (1,)]
    hint = "; an example size of 1 takes size-1 branches, so capture with sizes of 2 or more" if ones else ""
    again = "with the model in the dtype you run it in" if decision.kind == "value" else f"with example inputs like this call's{hint}"
    return (f"'{where or 'the model'}' was captured where {decision.describe()}{on}; this call gives another value, and "
            f"the graph holds only the code for that one; fix: capture again {again}, "
            f"or make the module running that line a leaf (leaf_paths=)")


def add_decision_guards(graph: fx.Graph, decisions: list[Decision], where: str) -> None:
    """After each decided node, assert that it decides the same at run time."""
    for decision in unique(decisions):
        node = decision.node
        if node.graph is not graph:
            continue
        stack = node.meta.get("nn_module_stack")
        with graph.inserting_after(node):
            if decision.kind == "bool":
                test = node if decision.value else graph.call_function(operator.not_, (node,))
            elif decision.kind == "len":
                size = graph.call_function(len, (node,))
                with graph.inserting_after(size):
                    test = graph.call_function(operator.eq, (size, decision.value))
            else:
                test = graph.call_function(operator.eq, (node, decision.value))
        with graph.inserting_after(test):
            guard = decision.guard = graph.call_function(torch._assert, (test, message(decision, where)))
        for made in {test, guard} - {node}:
            made.meta[GUARD] = True
            if stack is not None:
                made.meta["nn_module_stack"] = dict(stack)
        if decision.kind == "len":
            size.meta[GUARD] = True
            if stack is not None:
                size.meta["nn_module_stack"] = dict(stack)


class _Prober(fx.Interpreter):
    """Runs every node it can, skipping guards; values of nodes that failed stay unknown."""

    def run_all(self, *args) -> dict[fx.Node, Any]:
        self.args_iter = iter(args)
        values = {}
        for node in self.graph.nodes:
            if node.meta.get(GUARD) or node.op == "output":
                continue
            try:
                self.env[node] = values[node] = self.run_node(node)
            except Exception:
                continue
        return values


def _groups(inputs: dict[str, torch.Tensor]) -> list[list[tuple[str, int]]]:
    """Input dimensions that change together: same position and same example size (ids and mask)."""
    groups: dict[tuple[int, int], list] = {}
    for name, value in inputs.items():
        for i, size in enumerate(value.shape):
            groups.setdefault((i, int(size)), []).append((name, i))
    return list(groups.values())


def _probes(size: int) -> list[int]:
    return [size + 1, size - 1 if size > 2 else size + 2]


def _same(kind: str, got: Any, value: Any) -> bool:
    try:
        if kind == "value":
            return got == value
        return (bool(got) if kind == "bool" else len(got) if kind == "len" else operator.index(got)) == value
    except Exception:
        return False


def probe(gm: fx.GraphModule, graph: fx.Graph, example: tuple, decisions: list[Decision], where: str) -> None:
    """Fill each decision's `depends` and `forces` (the input dimensions that change what it decided),
    and say them in its guard's message."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    tensors = {p.name: v for p, v in zip(placeholders, example) if isinstance(v, torch.Tensor)}
    if not decisions or not tensors:
        return
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with quiet_fake_tensors():
        root = clone(gm, mode.from_tensor)
        def changes(group, size) -> list[bool]:
            """Which decisions take another value with the group's dims at `size`."""
            changed = {}
            for name, dim in group:
                shape = list(tensors[name].shape)
                shape[dim] = size
                changed[name] = tensors[name].new_zeros(shape)
            args = [mode.from_tensor(changed.get(p.name, v)) if isinstance(v, torch.Tensor) else v
                    for p, v in zip(placeholders, example)]
            with mode, torch.no_grad():
                values = _Prober(root, graph=graph).run_all(*args)
            # a value the probe cannot compute (a conv taking only 3 channels) is the weights' doing, not the decision's
            return [d.node in values and not _same(d.kind, values[d.node], d.value) for d in decisions]

        for group in _groups(tensors):
            outcomes = []
            size = int(tensors[group[0][0]].shape[group[0][1]])
            for probe_size in _probes(size):
                outcomes.append(changes(group, probe_size))
                if not any(outcomes[0]):
                    break  # nothing changed with this dim: a second probe cannot make it pinned
            for i, d in enumerate(decisions):
                if any(o[i] for o in outcomes):
                    d.depends += group
                if len(outcomes) > 1 and all(o[i] for o in outcomes):
                    d.forces += group
            if size > 1 and not all(any(o) for o in outcomes):  # a batch of 1 is the common other size: does it branch?
                for d, other in zip(decisions, changes(group, 1)):
                    if other and not set(group) & set(d.forces):
                        d.ones += group
    for d in decisions:
        d.example = {name: tuple(int(s) for s in v.shape) for name, v in tensors.items()}
        if d.guard is not None and d.forces:
            d.guard.args = (d.guard.args[0], message(d, where))


def specialised(decisions: list[Decision], ones: bool = False) -> dict[str, dict[int, str]]:
    """{input: {dim: why}} for the dimensions some decision forces; with `ones`, also those where a size of 1
    alone takes another branch (every other size works: exports keep such a dim dynamic)."""
    out: dict[str, dict[int, str]] = {}
    for d in unique(decisions):
        for name, dim in d.forces:
            out.setdefault(name, {}).setdefault(dim, d.describe())
    for d in unique(decisions) if ones else ():
        for name, dim in d.ones:
            out.setdefault(name, {}).setdefault(dim, f"a size of 1 takes another branch: {d.describe()}")
    return out


def _size_one(decisions: list[Decision]) -> list[tuple[str, int]]:
    """(input, dim) pairs some decision pins where the example's size was 1."""
    out: list[tuple[str, int]] = []
    for d in unique(decisions):
        out += [(n, i) for n, i in d.forces if d.example.get(n, ())[i:i + 1] == (1,) and (n, i) not in out]
    return out


def _root(result):
    return result.regions[0] if len(result.regions) == 1 and result.regions[0].path == "" else None


def _relax(region, example: tuple, ones: list[tuple[str, int]]) -> None:
    """Let each guard of `region` that decides otherwise on `example` (the size-1 call) pass where one of
    `ones` is 1: the graph then runs its code for sizes >= 2 at size 1 as well."""
    graph, gm = region.graph, region.gm
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with quiet_fake_tensors():
        args = [mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for v in example]
        with mode, torch.no_grad():
            values = _Prober(clone(gm, mode.from_tensor), graph=graph).run_all(*args)
    for d in region.decisions:  # a size of 1 there passes now: not another branch any more
        d.ones = [g for g in d.ones if g not in ones]
    for d in unique(region.decisions):
        if d.guard is None or d.node in values and _same(d.kind, values[d.node], d.value):
            continue
        test, made = d.guard.args[0], []
        with graph.inserting_before(d.guard):
            for name, dim in ones:
                made.append(graph.call_function(getattr, (placeholders[name], "shape")))
                made.append(graph.call_function(operator.getitem, (made[-1], dim)))
                made.append(graph.call_function(operator.eq, (made[-1], 1)))
                test = graph.call_function(operator.or_, (test, made[-1]))
                made.append(test)
        for node in made:  # inside the module the guard is in: a rule on that module takes them with it
            node.meta[GUARD] = True
            node.meta["nn_module_stack"] = dict(d.guard.meta.get("nn_module_stack") or {})
        d.guard.args = (test, d.guard.args[1] + f"; at size 1 of {dims_text(ones)} it runs the code of sizes >= 2, "
                        "checked at capture to give the example's outputs")
    gm.recompile()


def _outputs(gm: nn.Module, example: tuple, kwargs: dict | None = None) -> list:
    """The graph's (or the model's) outputs on the example, on a copy whose buffers are its own (train-mode
    BatchNorm updates them), with a fixed seed (dropout draws the same masks each run)."""
    params = {id(p): p for p in gm.parameters()}
    copy = clone(gm, lambda t: t.detach().clone(), memo=dict(params))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        return pytree.tree_leaves(copy(*example, **(kwargs or {})))


def _equal(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else
                                    (not isinstance(x, torch.Tensor) and not isinstance(y, torch.Tensor) and x == y) for x, y in zip(a, b))


def beyond_size_one(result, inputs: tuple | None, kwargs: dict, recapture):
    """`result` (a Capture), or the capture `recapture(inputs, kwargs)` makes with every size-1 dim a decision
    pins repeated to 2, where that one leaves those dims general and still gives the example's outputs."""
    root = _root(result)
    if root is None or root.example_inputs is None or root.dynamic is None or inputs is None:
        return result
    ones = _size_one(root.decisions)
    if not ones or any(t.is_meta for t in [*result.model.parameters(), *result.model.buffers()]):
        return result  # nothing pinned at 1, or no values to check a second capture against
    names = root.input_names()
    by_id = {id(v): n for n, v in zip(names, root.example_inputs) if isinstance(v, torch.Tensor)}

    def widen(value):
        name = by_id.get(id(value)) if isinstance(value, torch.Tensor) else None
        for dim in (d for n, d in ones if n == name):
            value = torch.cat([value, value], dim)  # repeated: token ids stay ids, masks stay masks
        return value

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            wide = recapture(*pytree.tree_map(widen, (tuple(inputs), dict(kwargs))))
        other = _root(wide)
        if (other is None or other.input_names() != names or set(wide.opaque) != set(result.opaque)
                or bool(wide.calls) != bool(result.calls)
                or any(f in ones for d in other.decisions for f in d.forces)):
            return result
        _relax(other, tuple(root.example_inputs), ones)
        if not _equal(_outputs(other.gm, root.example_inputs), _outputs(root.gm, root.example_inputs)):
            return result
        other.shapes = propagate(other.gm, other.graph, root.example_inputs)
    except (FxsError, PropagationError, AssertionError, RuntimeError):
        return result
    other.traced_at, other.example_inputs = other.example_inputs, root.example_inputs
    wide.example_inputs, wide.example_kwargs, wide.calls = result.example_inputs, result.example_kwargs, result.calls
    return wide


def down_to_one(result, inputs: tuple | None, kwargs: dict):
    """The mirror of beyond_size_one: captured at sizes >= 2, a decision a size of 1 alone takes otherwise (BERT's
    `is_causal = q_length > 1 and mask is None and is_causal`, False either way) refused length 1. Its guard passes
    size 1 too where the graph, run at size 1 past its guards, gives the model's own outputs there, bit for bit."""
    root = _root(result)
    if root is None or root.example_inputs is None or root.dynamic is None or inputs is None:
        return result
    ones: list[tuple[str, int]] = []
    for d in unique(root.decisions):
        ones += [g for g in d.ones if g not in ones]
    if not ones or any(t.is_meta for t in [*result.model.parameters(), *result.model.buffers()]):
        return result
    by_id = {id(v): n for n, v in zip(root.input_names(), root.example_inputs) if isinstance(v, torch.Tensor)}

    def narrow(value):
        name = by_id.get(id(value)) if isinstance(value, torch.Tensor) else None
        for dim in (d for n, d in ones if n == name):
            value = value.narrow(dim, 0, 1)
        return value
    try:
        example = tuple(narrow(v) for v in root.example_inputs)
        past = _unguarded(root.gm, root.graph, example)
        if past is not None and _equal(past, _outputs(result.model, *pytree.tree_map(narrow, (tuple(inputs), dict(kwargs))))):
            _relax(root, example, ones)
    except Exception:  # the model refuses size 1 itself (a train-mode BatchNorm at batch 1): size 1 stays refused
        pass
    return result


def _unguarded(gm: fx.GraphModule, graph: fx.Graph, example: tuple) -> list | None:
    """The graph's outputs on `example` with its guards skipped, as _outputs computes them (None: a node failed)."""
    params = {id(p): p for p in gm.parameters()}
    copy = clone(gm, lambda t: t.detach().clone(), memo=dict(params))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        values = _Prober(copy, graph=graph).run_all(*example)
    output = next(n for n in graph.nodes if n.op == "output")
    known = all(n in values for n in output.all_input_nodes)
    return pytree.tree_leaves(fx.node.map_arg(output.args[0], values.__getitem__)) if known else None
