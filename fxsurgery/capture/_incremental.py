"""One shape pass per surgery: after a rewrite only the nodes that changed run again.

Capture propagates shapes once over the whole graph and keeps every node's
meta (or fake) value with what it was computed from: its op, target, the
names and constants it reads, and the module or tensor object its target
held. A later pass over an edited graph walks the nodes in order and runs a
node again only when that record differs (a rule made it, rewired it or
swapped its module) or an input it reads came out with other metadata
(shape, dtype, stride, device, or another non-tensor value); every other node
keeps its value. Meta and fake values carry nothing but metadata, and each op
is a function of its inputs' metadata and of its module, so the result is the
one a full pass gives. Where that cannot be relied on, a full pass runs
instead: data-dependent code (propagated on real values), graphs with ops that
change a tensor's metadata in place (`x.unsqueeze_(0)`, so a kept value could
be read before or after it), and any failure of the partial pass (the full
pass then reports it exactly as it would have).
"""

from __future__ import annotations

import contextlib

import torch
from torch import fx, nn

from .._util import get_path
from ._copying import root_of
from ._shapes import _FAKE_LOGGER, Meta, _quiet, _Recorder, converted_copy, faking, full_pass, to_meta

# In-place ops that change their input's metadata: shape, strides, requires_grad (a kept value would not say when).
_RESHAPING = {"unsqueeze_", "squeeze_", "transpose_", "t_", "resize_", "resize_as_", "as_strided_", "set_",
              "swapdims_", "swapaxes_", "requires_grad_", "detach_"}
_PLAIN = (type(None), bool, int, float, str, torch.dtype, torch.device, torch.layout, torch.memory_format)


class _Same:
    """A value compared by identity (and kept alive, so its id is never another object's)."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __eq__(self, other):
        return type(other) is _Same and other.obj is self.obj

    def __hash__(self):
        return id(self.obj)


def _key(x, ids: dict):
    """What a node argument contributes to its record: for a node, the metadata of its value (by its
    number in `ids`), so that a rewired input with the same metadata changes nothing; plain
    constants by value; anything else by identity."""
    if isinstance(x, fx.Node):
        return ids[x]
    t = type(x)
    if t in _PLAIN:
        return (t, x)
    if isinstance(x, (tuple, list)):
        return (t, tuple(_key(v, ids) for v in x))
    if isinstance(x, dict):
        return (t, tuple((k, _key(v, ids)) for k, v in x.items()))
    if t is slice:
        return (t, _key(x.start, ids), _key(x.stop, ids), _key(x.step, ids))
    return _Same(x)


def _record(node: fx.Node, lookup, ids: dict) -> tuple:
    """What `node`'s value is a function of: its op and target, the module or tensor its target
    holds, its constants and the metadata of the values it reads."""
    held = _Same(lookup(node.target)) if node.op in ("call_module", "get_attr") else None
    target = node.target if isinstance(node.target, str) else _Same(node.target)
    return node.op, target, _key(node.args, ids), _key(node.kwargs, ids), held


def _fingerprint(x):
    """A value's metadata: inputs with equal fingerprints give every op the same output metadata."""
    t = type(x)
    if t is torch.Size:
        return (t, tuple(x))
    if isinstance(x, torch.Tensor):
        return (t, tuple(x.shape), x.dtype, x.device, x.stride(), x.storage_offset(), x.requires_grad)
    if t in _PLAIN:
        return (t, x)
    if isinstance(x, (tuple, list)):
        return (t, tuple(_fingerprint(v) for v in x))
    if isinstance(x, dict):
        return (t, tuple((k, _fingerprint(v)) for k, v in x.items()))
    return _Same(x)


def held_by(table: dict):
    """A target's value: held by the table itself, or inside a module it holds (a pruned
    MultiheadAttention's tensors are read one by one from their module)."""
    def lookup(target: str):
        if target in table:
            return table[target]
        parts = target.split(".")
        for i in range(len(parts) - 1, 0, -1):
            owner = table.get(".".join(parts[:i]))
            if owner is not None:
                try:
                    return get_path(owner, ".".join(parts[i:]))
                except AttributeError:
                    pass
        raise KeyError(target)
    return lookup


def _reshapes_in_place(graph: fx.Graph) -> bool:
    for node in graph.nodes:
        if node.op in ("call_method", "call_function"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if name in _RESHAPING:
                return True
    return False


class _Partial(_Recorder):
    """Runs single nodes; targets are read from the table, converted once each."""

    def __init__(self, state: "ShapeState", lookup):
        super().__init__(nn.Module(), fx.Graph(), {}, keep=True)
        self.state, self.lookup = state, lookup

    def fetch_attr(self, target: str):
        return self.state.converted(self.lookup(target))

    def read_only(self, target: str):
        # a meta run's shortcuts read the original's attributes (_shapes._same_device); a fake run's, its fake copy's
        return self.lookup(target) if self.state.kind == "meta" else self.fetch_attr(target)


class ShapeState:
    """The values of the last shape pass over a graph, kept for the next pass over an edited copy.

    `run` is `propagate` with the kept values reused. A state is a cache: it
    gives the shapes of a full pass whichever graph it was last run on.
    """

    def __init__(self):
        self.kind: str | None = None          # how the last pass ran: "meta", "fake" or "real"
        self.mode = None                      # the fake tensors' mode (kind "fake")
        self.values: dict[str, tuple] = {}    # node name -> (value, fingerprint number)
        self.records: dict[str, tuple] = {}   # node name -> what its value was computed from
        self.metas: dict[str, Meta] = {}
        self.ran = 0                          # how many nodes the last pass ran
        self._ids: dict = {}                  # fingerprint -> its number
        self._converted: dict[int, tuple] = {}
        self._inputs: tuple = ()

    def fork(self) -> "ShapeState":
        """A state that starts where this one is and moves on without it (each run replaces the dicts)."""
        other = ShapeState()
        other.__dict__.update(self.__dict__)
        other._converted, other._ids = dict(self._converted), dict(self._ids)
        return other

    def converted(self, obj):
        """`obj` (a module or tensor of the table) on meta, or fake in the state's fake mode."""
        return converted_copy(obj, self._converted, None if self.kind == "meta" else faking(self.mode, self._inputs))

    def run(self, root, graph: fx.Graph, inputs: tuple) -> dict[str, Meta]:
        self._inputs = inputs
        table = root if isinstance(root, dict) else None
        lookup = held_by(table) if table is not None else (lambda target: get_path(root, target))
        if self.kind in ("meta", "fake") and not _reshapes_in_place(graph):
            try:
                return self._partial(graph, inputs, lookup)
            except Exception:  # the full pass fails (or not) as it would have: it decides
                pass
        module = root_of(table) if table is not None else root
        full = full_pass(module, graph, inputs, keep=True)
        self.kind, self.mode, self.metas, self.ran = full.kind, full.mode, full.metas, len(graph.nodes)
        self._converted, self.values, self.records = full.converted or {}, {}, {}
        if full.kind != "real":  # real values matter: nothing is kept
            ids = {}
            placeholders = iter(inputs)
            for node in graph.nodes:
                value = full.values[node.name]
                source = next(placeholders, None) if node.op == "placeholder" else None
                record = (node.op, node.target, self._id(source)) if node.op == "placeholder" else _record(node, lookup, ids)
                ids[node] = self._id(value)
                self.values[node.name], self.records[node.name] = (value, ids[node]), record
        return dict(full.metas)

    def _id(self, value) -> int:
        """A number per distinct fingerprint (records compare numbers, not nested tuples)."""
        return self._ids.setdefault(_fingerprint(value), len(self._ids))

    def _partial(self, graph: fx.Graph, inputs: tuple, lookup) -> dict[str, Meta]:
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        if len(placeholders) != len(inputs):
            raise ValueError("the inputs do not match the graph's placeholders")
        runner = _Partial(self, lookup)
        values, records, metas, ids = {}, {}, runner.metas, {}
        env, ran, given = runner.env, 0, iter(inputs)
        with (self.mode if self.kind == "fake" else contextlib.nullcontext()), _quiet(_FAKE_LOGGER), torch.no_grad():
            for node in graph.nodes:
                name = node.name
                if node.op == "placeholder":
                    x = next(given)
                    record = (node.op, node.target, self._id(x))
                else:
                    record = _record(node, lookup, ids)
                kept = self.values.get(name)
                if kept is not None and self.records.get(name) == record:
                    value, ids[node] = kept
                    metas[name] = self.metas[name]
                else:
                    if node.op == "placeholder":
                        value = (to_meta(x) if self.kind == "meta" else self.mode.from_tensor(x)) \
                            if isinstance(x, torch.Tensor) else x
                        metas[name] = Meta.of(value)
                    else:
                        value = runner.run_node(node)
                    ran += 1
                    ids[node] = self._id(value)
                env[node] = value
                values[name], records[name] = (value, ids[node]), record
        self.values, self.records, self.metas, self.ran = values, records, metas, ran
        return dict(metas)
