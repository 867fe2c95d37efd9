"""Follow a layer's output channels through a graph: the walk that makes a dependency group (see _groups).

Forward, every reader of the channels: the next Conv/Linear takes them as
input channels (sliced there, the walk stops), anything else carries them on.
Backward, every other writer (the other operand of an add, the other inputs
of a concat): each must lose the same channels. Ops that map a zero channel
to zero and keep channels apart are followed; anything else is `Unprunable`.
A gate (squeeze-excitation: `x * sigmoid(conv(...))`) multiplies the channels
by values that need not be zero: those values only meet zeros, so the layer
that makes them loses the same channels without being zeroed.
"""

from __future__ import annotations

import math

from torch import fx, nn

from ._groupdata import _ADD, _MUL, _NORM, _SIZE, _ZERO_BY_NAME, _ZERO_MODULES, _ZERO_NAMES, CONV, GATES, Group, Index, Slice, Unprunable, _grow, _shift


def _name(node: fx.Node) -> str:
    return node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _arg(node: fx.Node, pos: int, key: str, default=None):
    if key in node.kwargs:
        return node.kwargs[key]
    return node.args[pos] if len(node.args) > pos else default


class Walk:
    """One group, grown from a layer's output until every coupled value is visited."""

    def __init__(self, graph: fx.Graph, modules: dict, shapes: dict):
        self.graph, self.modules, self.shapes = graph, modules, shapes
        self.by_name = {n.name: n for n in graph.nodes}
        self.calls: dict[str, int] = {}
        for n in graph.nodes:
            if n.op == "call_module":
                self.calls[n.target] = self.calls.get(n.target, 0) + 1

    def is_tensor(self, node) -> bool:
        meta = self.shapes.get(node.name) if isinstance(node, fx.Node) else None
        return meta is not None and meta.is_tensor

    def shape(self, node: fx.Node) -> tuple:
        meta = self.shapes.get(node.name)
        if meta is None or not meta.is_tensor or meta.shape is None:
            raise Unprunable(node.name, "its shape is not known; pass example inputs")
        return meta.shape

    def ndim(self, node: fx.Node) -> int:
        return len(self.shape(node))

    def group(self, start: fx.Node) -> Group:
        mod = self.modules.get(start.target) if start.op == "call_module" else None
        if not isinstance(mod, (*CONV, nn.Linear)):
            raise Unprunable(start.name, f"{type(mod).__name__ if mod is not None else start.op} is not a Conv or Linear layer")
        dim = 1 if isinstance(mod, CONV) else self.ndim(start) - 1
        width = self.shape(start)[dim]
        self.g = Group(width, start.name)
        self.queue = [(start, dim, tuple((i,) for i in range(width)), None)]
        while self.queue:
            node, dim, index, via = self.queue.pop()
            if not self._visit(node, dim, index):
                continue
            inputs = [a for a in node.all_input_nodes if a is via or self.is_tensor(a)]
            if via is None or inputs != [via]:  # reached from its only input: nothing else writes these channels
                self._back(node, dim, index)
            for user in list(node.users):
                self._forward(node, user, dim, index)
        return self.g

    # -- bookkeeping --------------------------------------------------------------
    def _visit(self, node: fx.Node, dim: int, index: Index) -> bool:
        seen = self.g.members.get(node.name)
        if seen is not None:
            if seen != (dim, index):
                raise Unprunable(node.name, "the same channels reach it at two different positions")
            return False
        self.g.members[node.name] = (dim, index)
        return True

    def _add(self, node, dim: int, index: Index, via: fx.Node | None = None) -> None:
        if isinstance(node, fx.Node) and any(index):
            self.queue.append((node, dim, index, via))

    def _slice(self, node: fx.Node, param: str, axis: int, index: Index, source: bool) -> None:
        target = node.target
        if self.calls.get(target, 0) > 1 or (node.op == "get_attr" and len(node.users) > 1):
            raise Unprunable(node.name, f"'{target}' is used {max(self.calls.get(target, 0), len(node.users))} times, "
                             "so its weights serve other calls too")
        if param and getattr(self.modules[target], param, None) is None:
            return
        key = (target, param, axis)
        old = self.g.slices.get(key)
        if old is not None and old.index != index:
            raise Unprunable(node.name, f"'{target}' would lose different channels on dim {axis} from two paths")
        self.g.slices[key] = Slice(target, param, axis, index, source or (old is not None and old.source))

    # -- backward: who writes these channels ---------------------------------------------
    def _back(self, node: fx.Node, dim: int, index: Index) -> None:
        if node.op == "placeholder":
            raise Unprunable(node.name, "the channels come from a model input, which keeps its shape")
        if node.op == "get_attr":
            self._slice(node, "", dim, index, True)
            return
        if node.op == "call_module":
            mod = self.modules[node.target]
            if isinstance(mod, CONV):
                if dim != 1:
                    raise Unprunable(node.name, f"dim {dim} of a convolution's output is not its channels")
                self._slice(node, "weight", 0, index, True)
                self._slice(node, "bias", 0, index, True)
                k = self._depthwise(node, mod)
                if k:
                    self._add(node.args[0], 1, tuple(tuple(sorted({p // k for p in ix})) for ix in index))
                return
            if isinstance(mod, nn.Linear):
                if dim != self.ndim(node) - 1:
                    self._add(node.args[0], dim, index)
                    return
                self._slice(node, "weight", 0, index, True)
                self._slice(node, "bias", 0, index, True)
                return
            self._module(node, dim, index, backward=True)
            return
        name = self._function(node)
        if name is None:
            return
        if name in _ZERO_NAMES:
            self._add(node.args[0], dim, index)
        elif name in _ADD or name in _MUL:
            self._operands(node, name, dim, index)
        elif name == "cat":
            parts, axis = self._cat(node)
            offset = 0
            for p in parts:
                width = self.shape(p)[axis]
                self._add(p, dim, _shift(index, offset, width) if axis == dim else index)
                offset += width if axis == dim else 0
        elif name == "getitem" and isinstance(node.args[1], int):
            split = node.args[0]
            if self._function(split) not in ("split", "chunk"):
                raise Unprunable(node.name, f"item {node.args[1]} of '{split.name}' is not followed")
            pieces, axis = self._pieces(split)
            if axis == dim:
                offset = sum(self.shape(u)[axis] for u in pieces[:node.args[1]])
                index = tuple(tuple(x + offset for x in ix) for ix in index)
            self._add(split.args[0], dim, index)
        elif name in ("permute", "transpose"):
            self._add(node.args[0], self._moved(node, dim, backward=True), index)
        elif name == "batch_norm":
            self._batch_norm(node, dim, index)
            self._add(node.args[0], dim, index)
        else:
            raise Unprunable(node.name, f"'{name}' is followed only from its input to its output")

    def _depthwise(self, node: fx.Node, mod) -> int:
        """0 for an ordinary convolution; k for a depthwise one (each input channel makes k outputs)."""
        if mod.groups == 1:
            return 0
        if mod.groups != mod.in_channels:
            raise Unprunable(node.name, f"grouped convolution (groups={mod.groups}) mixes channels within each group; "
                             "only depthwise (groups == in_channels) follows channel by channel")
        return mod.out_channels // mod.in_channels

    # -- forward: who reads them -------------------------------------------------------
    def _forward(self, node: fx.Node, user: fx.Node, dim: int, index: Index) -> None:
        if user.op == "output":
            raise Unprunable(node.name, "its channels reach the model output, whose shape must stay")
        if user.op == "call_module":
            mod = self.modules[user.target]
            if isinstance(mod, CONV):
                if user.args[0] is not node or dim != 1:
                    raise Unprunable(user.name, "a convolution reads these channels other than as its input channels")
                k = self._depthwise(user, mod)
                if not k:
                    self._slice(user, "weight", 1, index, False)
                    return
                out = _grow(index, k)
                self._slice(user, "weight", 0, out, True)
                self._slice(user, "bias", 0, out, True)
                self._add(user, 1, out, node)
                return
            if isinstance(mod, nn.Linear):
                if dim == self.ndim(node) - 1:
                    self._slice(user, "weight", 1, index, False)
                else:
                    self._add(user, dim, index, node)
                return
            self._module(user, dim, index, backward=False, came=node)
            return
        name = self._function(user)
        if name is None:
            return
        if name in _ZERO_NAMES:
            if user.args[0] is not node:
                raise Unprunable(user.name, f"'{name}' reads these channels other than as its input")
            self._add(user, dim, index, node)
        elif name in _ADD or name in _MUL:
            self._add(user, dim + self.ndim(user) - self.ndim(node), index, node)
        elif name == "cat":
            parts, axis = self._cat(user)
            if parts.count(node) != 1:
                raise Unprunable(user.name, "it concatenates one value twice")
            offset = sum(self.shape(p)[axis] for p in parts[:parts.index(node)]) if axis == dim else 0
            self._add(user, dim, tuple(tuple(x + offset for x in ix) for ix in index), node)
        elif name in ("split", "chunk"):
            pieces, axis = self._pieces(user)
            if axis == dim:
                self.g.splits[user.name] = axis
            offset = 0
            for u in pieces:
                width = self.shape(u)[axis]
                self._add(u, dim, _shift(index, offset, width) if axis == dim else index, user)
                offset += width
        elif name == "getitem":
            self._add(user, self._indexed(user, dim), index, node)
        elif name in ("permute", "transpose"):
            self._add(user, self._moved(user, dim, backward=False), index, node)
        elif name == "flatten":
            nd = self.ndim(node)
            self._flatten(user, node, _arg(user, 1, "start_dim", 0) % nd, _arg(user, 2, "end_dim", -1) % nd, dim, index)
        elif name in ("view", "reshape"):
            self._reshape(user, node, dim, index)
        elif name in ("mean", "sum", "amax", "amin"):
            self._reduce(user, node, dim, index)
        elif name == "batch_norm" and user.args[0] is node:
            self._batch_norm(user, dim, index)
            self._add(user, dim, index, node)
        elif name == "layer_norm" and user.args[0] is node:
            if dim >= self.ndim(node) - len(_arg(user, 1, "normalized_shape")):
                raise Unprunable(user.name, "LayerNorm normalises over these channels, so removing one changes the others")
            self._add(user, dim, index, node)
        else:
            raise Unprunable(user.name, f"'{name}' is not known to keep channels apart and zero where they were zero")

    def _function(self, node: fx.Node) -> str | None:
        """The op's name; None for reads of a size or type, which carry no channels."""
        if node.op not in ("call_function", "call_method"):
            raise Unprunable(node.name, f"{node.op} nodes are not followed")
        name = _name(node)
        if name in _SIZE or (name == "getattr" and node.args[1] in ("shape", "dtype", "device", "ndim")):
            return None
        return name

    # -- the ops ------------------------------------------------------------------------
    def _operands(self, node, name, dim, index):
        """add/mul: every operand that holds the channels loses them too; a value added to all of them is refused."""
        out_nd, held = self.ndim(node), []
        for a in [*node.args, *node.kwargs.values()]:
            if not isinstance(a, fx.Node):
                if name in _ADD and a != 0:
                    raise Unprunable(node.name, f"it adds {a!r} to every channel, so a removed channel would not be zero")
                continue
            if not self.is_tensor(a):
                continue
            a_dim = dim - (out_nd - self.ndim(a))
            if a_dim < 0 or self.shape(a)[a_dim] == 1:
                if name in _ADD:
                    raise Unprunable(node.name, "it adds a value broadcast over the channels, so a removed channel would not be zero")
                continue
            held.append((a, a_dim))
        gates = [(a, d) for a, d in held if name in _MUL and self._gate_op(a)] if len(held) > 1 else []
        for a, a_dim in held:
            if (a, a_dim) in gates and len(gates) < len(held):
                self._gate(a, node, a_dim, index)
            else:
                self._add(a, a_dim, index)

    def _batch_norm(self, node: fx.Node, dim: int, index: Index) -> None:
        """F.batch_norm over tensors the graph reads (timm's BatchNormAct2d traced through): each is cut."""
        if dim != 1:
            raise Unprunable(node.name, "batch_norm normalises dim 1, not these channels")
        for key, pos in (("running_mean", 1), ("running_var", 2), ("weight", 3), ("bias", 4)):
            t = _arg(node, pos, key)
            if isinstance(t, fx.Node) and t.op != "get_attr":
                raise Unprunable(node.name, f"its {key} is computed, not a tensor of the model")
            if isinstance(t, fx.Node):
                self._slice(t, "", 0, index, key in ("weight", "bias"))

    def _gate_op(self, node) -> bool:
        mod = self.modules.get(node.target) if node.op == "call_module" else None
        return (type(mod).__name__ in GATES) if mod is not None else node.op != "get_attr" and _name(node) in GATES

    def _gate(self, node: fx.Node, mul: fx.Node, dim: int, index: Index) -> None:
        """A gate's channels only multiply removed (zero) channels: back through the gate activation (and
        elementwise ops) to the layer that makes them, which loses those rows without being zeroed."""
        while True:
            if len(node.users) > 1:
                raise Unprunable(node.name, f"the gate's values are read by more than '{mul.name}', the product they gate")
            if not self._visit(node, dim, index):
                return
            mod = self.modules.get(node.target) if node.op == "call_module" else None
            if isinstance(mod, (*CONV, nn.Linear)) and dim == (1 if isinstance(mod, CONV) else self.ndim(node) - 1):
                if isinstance(mod, CONV) and mod.groups != 1:
                    raise Unprunable(node.name, "a gate made by a grouped convolution is not followed")
                self._slice(node, "weight", 0, index, False)
                self._slice(node, "bias", 0, index, False)
                return
            if not (self._gate_op(node) or isinstance(mod, _ZERO_MODULES)
                    or (mod is None and node.op != "get_attr" and _name(node) in _ZERO_NAMES)):
                raise Unprunable(node.name, "the gate is made by an op that is not followed channel by channel")
            node = node.args[0]

    def _cat(self, node):
        parts = list(_arg(node, 0, "tensors"))
        return parts, _arg(node, 1, "dim", 0) % self.ndim(node)

    def _pieces(self, node):
        pieces = sorted((u for u in node.users if _name(u) == "getitem"), key=lambda u: u.args[1])
        if len(pieces) != len(node.users) or [u.args[1] for u in pieces] != list(range(len(pieces))):
            raise Unprunable(node.name, "the pieces of a split are used other than one by one")
        return pieces, _arg(node, 2, "dim", 0) % self.ndim(node.args[0])

    def _moved(self, node, dim, backward):
        nd = self.ndim(node)
        if _name(node) == "transpose":
            a, b = (x % nd for x in node.args[1:3])
            return b if dim == a else a if dim == b else dim
        dims = node.args[1:]
        dims = tuple(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else tuple(dims)
        dims = tuple(d % nd for d in dims)
        return dims[dim] if backward else dims.index(dim)

    def _indexed(self, node, dim):
        idx = node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        if any(i is Ellipsis or i is None or isinstance(i, fx.Node) for i in idx):
            raise Unprunable(node.name, "indexing with ... / None / tensors is not followed")
        if dim < len(idx) and idx[dim] != slice(None):
            raise Unprunable(node.name, "indexing selects among the channels")
        return dim - sum(isinstance(i, int) for i in idx[:dim])

    def _flatten(self, node, src, start, end, dim, index):
        if dim < start:
            self._add(node, dim, index, src)
        elif dim > end:
            self._add(node, dim - (end - start), index, src)
        elif dim == start:
            self._add(node, start, _grow(index, math.prod(self.shape(src)[dim + 1:end + 1])), src)
        else:
            raise Unprunable(node.name, "the reshape merges the channels into a dimension before them, which mixes them")

    def _reshape(self, node, src, dim, index):
        before, after = self.shape(src), self.shape(node)
        sizes = node.args[1:]
        sizes = tuple(sizes[0]) if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else tuple(sizes)
        fixed = any(isinstance(s, int) and s == after[min(dim, len(after) - 1)] and s != -1 for s in sizes)
        if len(after) == dim + 1 and before[:dim] == after[:dim] and not fixed:
            self._flatten(node, src, dim, len(before) - 1, dim, index)
        elif before == after and not fixed:
            self._add(node, dim, index, src)
        else:
            raise Unprunable(node.name, f"the reshape {list(before)} -> {list(after)} mixes the channels with other "
                             "dimensions (or fixes their count)")

    def _reduce(self, node, src, dim, index):
        axes = _arg(node, 1, "dim")
        if axes is None:
            raise Unprunable(node.name, "it reduces over the channels")
        axes = {a % self.ndim(src) for a in (axes if isinstance(axes, (list, tuple)) else (axes,))}
        if dim in axes:
            raise Unprunable(node.name, "it reduces over the channels")
        keep = _arg(node, 2, "keepdim", False)
        self._add(node, dim if keep else dim - sum(a < dim for a in axes), index, src)

    def _module(self, node, dim, index, backward, came=None):
        """A module that is not a Conv or Linear: its per-channel parameters are cut; the channels pass through."""
        mod = self.modules[node.target]
        if isinstance(mod, _NORM):
            if dim != 1:
                raise Unprunable(node.name, "BatchNorm normalises dim 1, not these channels")
            for p in ("weight", "bias", "running_mean", "running_var"):
                self._slice(node, p, 0, index, p in ("weight", "bias"))
        elif isinstance(mod, nn.GroupNorm):
            if mod.num_groups != mod.num_channels:
                raise Unprunable(node.name, f"GroupNorm ({mod.num_groups} groups) normalises channels together, so removing one "
                                 "changes the others")
            for p in ("weight", "bias"):
                self._slice(node, p, 0, index, True)
        elif isinstance(mod, nn.LayerNorm):
            if dim >= self.ndim(node) - len(mod.normalized_shape):
                raise Unprunable(node.name, "LayerNorm normalises over these channels, so removing one changes the others")
        elif not isinstance(mod, _ZERO_MODULES) and type(mod).__name__ not in _ZERO_BY_NAME:
            raise Unprunable(node.name, f"module '{node.target}' ({type(mod).__name__}) is not known to keep channels apart")
        if backward:
            self._add(node.args[0], dim, index)
        else:
            self._add(node, dim, index, came)


