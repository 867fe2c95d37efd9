"""What will train: each parameter is trainable, frozen, or cut off by a detach.

A parameter trains when it requires grad and some path from it to an
output carries gradients. The paths are read from a graph with networkx:
where one torch.fx graph holds the whole model, that graph, with the edges
into `detach` removed and values that are not floating point (indices,
masks, shapes) carrying nothing; where opaque Python remains, the graph
autograd records for one forward pass on fake tensors (no real compute).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .._util import get_path
from ..capture import Meta, clone, other_graph, quiet_fake_tensors

STATUSES = ("trainable", "frozen", "cut", "unused")
_DETACH = {torch.detach, torch.Tensor.detach}


@dataclass
class GradientFlow:
    """Parameter name -> trainable | frozen | cut | unused (the forward never reads it: no detach is to blame),
    and how that was worked out."""

    status: dict[str, str] = field(default_factory=dict)
    method: str = "graph"

    def names(self, status: str) -> list[str]:
        return [n for n, s in self.status.items() if s == status]

    @property
    def trainable(self) -> list[str]:
        return self.names("trainable")

    @property
    def frozen(self) -> list[str]:
        return self.names("frozen")

    @property
    def cut(self) -> list[str]:
        return self.names("cut")

    def warnings(self) -> list[str]:
        """One line for the cut parameters, naming the modules to freeze (a detach after layer3 cuts 45)."""
        cut = self.cut
        if len(cut) == 1:
            return [f"{cut[0]} requires grad but every path from it to the outputs crosses a detach, so it never "
                    f"gets a gradient; fix: freeze it (Freeze) to save its gradient memory and optimizer state"]
        if not cut:
            return []
        modules = self.cut_modules()
        shown = ", ".join(f"'{m}'" for m in modules[:6]) + (f" and {len(modules) - 6} more" if len(modules) > 6 else "")
        return [f"{len(cut)} parameters require grad but every path from them to the outputs crosses a detach, so they never "
                f"get a gradient ({', '.join(cut[:3])}{', ...' if len(cut) > 3 else ''}); fix: freeze {shown} (Freeze) to save "
                "their gradient memory and optimizer state"]

    def cut_modules(self) -> list[str]:
        """The fewest module paths whose parameters are all cut and cover every cut one (a parameter of the root
        module by its own name), in parameter order."""
        out: list[str] = []
        for name in self.cut:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                prefix = ".".join(parts[:i])
                inside = [n for n in self.status if n == prefix or n.startswith(prefix + ".")]
                if all(self.status[n] == "cut" for n in inside):
                    if prefix not in out:
                        out.append(prefix)
                    break
        return out

    def counts(self) -> dict[str, int]:
        return {s: len(self.names(s)) for s in STATUSES}

    def to_dict(self) -> dict:
        return {"method": self.method, "counts": self.counts(), "status": dict(self.status)}


# Arguments read only for their shape, dtype or device: no gradient flows back into them.
_LIKE_METHODS = {"reshape_as", "view_as", "expand_as", "type_as"}           # all but `self`
_SHAPE_METHODS = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "size", "dim", "numel"}
_SHAPE_FUNCTIONS = {torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like,
                    torch.rand_like, torch.randn_like, torch.randint_like}


def _differentiable_inputs(node: fx.Node) -> list[fx.Node]:
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return []
    if node.op == "call_function" and node.target in _SHAPE_FUNCTIONS:
        return []
    if node.op == "call_method" and node.target in _LIKE_METHODS:
        return [node.args[0]] if isinstance(node.args[0], fx.Node) else []
    return node.all_input_nodes


def in_place(node: fx.Node) -> bool:
    """`x.add_(y)`: a call that writes into its first argument (torch's trailing-underscore convention), or one
    told to (`F.relu(x, inplace=True)`, `F.dropout(x, p, True, True)`), whose result the code may drop."""
    if node.op not in ("call_method", "call_function"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        return True
    if node.kwargs.get("inplace") is True:
        return True
    position = _inplace_position(node.target) if node.op == "call_function" else None
    return position is not None and len(node.args) > position and node.args[position] is True


@functools.lru_cache(maxsize=None)
def _inplace_position(fn) -> int | None:
    """Where `fn` takes `inplace` by position (F.relu's second, F.dropout's fourth), if it does."""
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("inplace") if "inplace" in names else None


def _is_cut(node: fx.Node) -> bool:
    return (node.op == "call_method" and node.target == "detach") or (node.op == "call_function" and node.target in _DETACH)


def _from_graph(gm: fx.GraphModule, shapes: dict[str, Meta], code: fx.Graph | None = None) -> set[int]:
    """ids of the parameters some gradient-carrying path of `code` (default: gm's graph) joins to the output.
    Nodes without shapes are taken to carry gradients."""
    code = gm.graph if code is None else code
    graph = nx.DiGraph()
    output = None
    order = {node: i for i, node in enumerate(code.nodes)}
    for node in code.nodes:
        graph.add_node(node.name)
        mutated = node.args[0] if in_place(node) and node.args and isinstance(node.args[0], fx.Node) else None
        for later in (mutated.users if mutated is not None else ()):
            if order[later] > order[node]:
                graph.add_edge(node.name, later.name)  # `x.add_(p)`: whoever reads x afterwards reads p too
        meta = shapes.get(node.name)
        if meta is None or not meta.is_tensor:  # sizes and numbers carry nothing; containers may hold tensors
            carries = (meta is None or meta.kind in ("tuple", "list", "dict", "immutable_list", "immutable_dict")
                       or node.op == "output" or (node.op == "call_function" and isinstance(node.target, type)))
            # (a NamedTuple or dataclass built as the output)
        else:
            carries = meta.dtype.is_floating_point or meta.dtype.is_complex
        if node.op == "output":
            output = node.name
        if _is_cut(node) or not carries:
            continue  # nothing flows back into a detach, or through an integer or boolean value
        for arg in _differentiable_inputs(node):
            graph.add_edge(arg.name, node.name)
    live = nx.ancestors(graph, output) | {output}
    reached: set[int] = set()
    for node in code.nodes:
        if node.name not in live:
            continue
        if node.op == "call_module":
            reached.update(id(p) for p in gm.get_submodule(node.target).parameters())
        elif node.op == "get_attr":
            value = get_path(gm, node.target)
            if isinstance(value, nn.Parameter):
                reached.add(id(value))
    return reached


def fake_of(mode: FakeTensorMode, t: torch.Tensor) -> torch.Tensor:
    """A fake copy of `t`; a meta tensor (a streamed result's, read at save) as a CPU one, like the rest."""
    if not t.is_meta:
        return mode.from_tensor(t)
    with mode:
        return torch.empty(t.shape, dtype=t.dtype, device="cpu")


class _Reads(TorchFunctionMode):
    """The ids of the tensors in `of` that some torch function was called with."""

    def __init__(self, of: set[int]):
        super().__init__()
        self.of, self.read = of, set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.read.update(id(t) for t in pytree.tree_leaves((args, kwargs or {})) if id(t) in self.of)
        return func(*args, **(kwargs or {}))


def _forward(module: nn.Module, inputs: tuple, fake: bool, kwargs: dict | None = None):
    """A copy of `module` (fake tensors, or real ones), its output on `inputs` with autograd on, and the ids
    of the copy's parameters the forward read."""
    mode = FakeTensorMode(allow_non_fake_inputs=True) if fake else None
    copy = clone(module, (lambda t: fake_of(mode, t)) if fake else (lambda t: t.detach().clone()))
    convert = (lambda x: mode.from_tensor(x) if isinstance(x, torch.Tensor) else x) if fake else (lambda x: x)
    reads = _Reads({id(p) for p in copy.parameters()})
    with (mode or contextlib.nullcontext()), quiet_fake_tensors(), torch.enable_grad():
        args, keywords = pytree.tree_map(convert, (tuple(inputs), dict(kwargs or {})))
        with reads:
            out = copy(*args, **keywords)
        return copy, out, reads.read


def _output_tensors(out) -> list[torch.Tensor]:
    """The tensors of an output, dataclasses (which pytree does not open) included."""
    found = []
    for leaf in pytree.tree_leaves(out):
        if isinstance(leaf, torch.Tensor):
            found.append(leaf)
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):
            found += _output_tensors([getattr(leaf, f.name) for f in dataclasses.fields(leaf)])
    return found


def _from_autograd(module: nn.Module, inputs: tuple, kwargs: dict | None = None) -> tuple[set[int], set[int]]:
    """ids of the parameters autograd links to an output, and of those the forward read, from one forward
    pass (fake tensors where the code allows, else a real copy: data-dependent Python needs real values)."""
    try:
        copy, out, read = _forward(module, inputs, fake=True, kwargs=kwargs)
    except Exception:
        copy, out, read = _forward(module, inputs, fake=False, kwargs=kwargs)
    return _reached(module, copy, out), _originals(module, copy, read)


def _originals(module: nn.Module, copy: nn.Module, ids: set[int]) -> set[int]:
    ours = dict(module.named_parameters(remove_duplicate=False))
    return {id(ours[n]) for n, p in copy.named_parameters(remove_duplicate=False) if id(p) in ids}


def _reached(module: nn.Module, copy: nn.Module, out) -> set[int]:
    """ids of `module`'s parameters whose copies in `copy` autograd links to `out`."""
    ours = dict(module.named_parameters(remove_duplicate=False))
    original = {id(p): id(ours[n]) for n, p in copy.named_parameters(remove_duplicate=False)}
    roots = [t.grad_fn for t in _output_tensors(out) if t.grad_fn is not None]
    graph = nx.DiGraph()
    leaves = {}  # autograd node -> the parameter it accumulates into
    stack, seen = list(roots), set()
    while stack:
        fn = stack.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        graph.add_node(id(fn))
        if getattr(fn, "variable", None) is not None:
            leaves[id(fn)] = fn.variable
        for child, _ in fn.next_functions:
            if child is not None:
                graph.add_edge(id(fn), id(child))
                stack.append(child)
    live = set()
    for root in roots:
        live |= nx.descendants(graph, id(root)) | {id(root)}
    return {original[id(v)] for fid, v in leaves.items() if fid in live and id(v) in original}


def fake_flow(module: nn.Module, inputs: tuple, kwargs: dict | None) -> GradientFlow:
    """The gradient flow from one fake forward pass (the one the check stage makes); raises what
    the forward raises."""
    copy, out, read = _forward(module, inputs, fake=True, kwargs=kwargs)
    return _flow(module, _reached(module, copy, out), "autograd graph of one forward pass", _originals(module, copy, read))


def _flow(module: nn.Module, reached: set[int], method: str, read: set[int] | None = None) -> GradientFlow:
    """`read`: the parameters the forward read (None: every one the graph holds); one it never read is unused, not cut."""
    flow = GradientFlow(method=method)
    for name, p in module.named_parameters():
        unused = read is not None and id(p) not in read
        flow.status[name] = ("frozen" if not p.requires_grad else "trainable" if id(p) in reached else
                             "unused" if unused else "cut")
    return flow


def gradient_flow(module: nn.Module, inputs: tuple | None = None, shapes: dict[str, Meta] | None = None,
                  one_graph: bool = False, kwargs: dict | None = None) -> GradientFlow:
    """Trainable, frozen or cut, for every parameter of `module` (one name per tensor).

    `one_graph`: `module` is a GraphModule holding the whole model, read as it is.
    """
    if one_graph:
        reached, method = _from_graph(module, shapes or {}), "graph"
        other = other_graph(module)
        if other is not None:  # a parameter only the other mode uses (an auxiliary head in train mode) trains there
            reached |= _from_graph(module, {}, other[0])
            method = "graphs of both modes"
    elif inputs is not None:
        (reached, read), method = _from_autograd(module, inputs, kwargs), "autograd graph of one forward pass"
        return _flow(module, reached, method, read)
    else:
        reached, method = {id(p) for p in module.parameters()}, "assumed: no example inputs"
    return _flow(module, reached, method)
