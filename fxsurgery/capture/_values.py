"""Tracing with example values: symbolic where torch.fx can be, concrete where Python insists.

Every node also gets the value it takes on the example call, computed on a
fake copy of the module (shapes and dtypes, no weights touched). Python that
plain torch.fx cannot follow then works: `b, t, c = x.shape` unpacks,
`x[..., :n] = y` records a setitem, `for h in heads` iterates a tuple output.
Where Python needs a number (slice bounds, `range`, `if n > 1`), the example's
number is used: the graph is then specialised to the example's input shapes,
and guards in the graph raise a clear error when other shapes come in.
"""

from __future__ import annotations

import contextlib
import operator
import re
from typing import Any

import torch
from torch import fx, nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx._symbolic_trace import _orig_module_call, _orig_module_getattr
from torch.fx.proxy import Attribute
from torch.utils import _pytree as pytree

from .._util import get_path
from ._copying import clone
from ._guards import Decision, render, source_line
from ._shapes import Meta, quiet_fake_tensors
from ._tracer import Tracer

_MISSING = object()
# Tensor attributes that do not change from call to call: read them from the example.
# `device` and `dtype` are not among them: a tensor the forward makes on `x.device`, or casts to `x.dtype`,
# must follow x at run time (a model captured in float32 runs in bfloat16 once `.to(torch.bfloat16)`).
_STATIC = {"ndim", "layout", "is_floating_point", "is_complex"}
# Autograd state: it differs under torch.no_grad() and after a Freeze, which no graph sees (densenet's
# memory_efficient `if any(t.requires_grad ...)`), so a branch on it cannot be asserted: its module is kept opaque.
_AUTOGRAD = {"requires_grad", "grad_fn", "is_leaf"}


# Tensor methods and torch functions giving a tuple of as many tensors as a size or a computed count says.
_SPLITTERS = {"unbind", "split", "chunk", "tensor_split", "hsplit", "vsplit", "dsplit", "split_with_sizes", "unsafe_split",
              "unsafe_chunk", "unsafe_split_with_sizes"}


def _splits(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target is operator.getitem and isinstance(node.args[1], slice):
        return isinstance(node.args[0], fx.Node) and _splits(node.args[0])  # `steps[1:]`: as many less one
    name = node.target if node.op == "call_method" else getattr(node.target, "__name__", "") if node.op == "call_function" else ""
    return isinstance(name, str) and name.partition(".")[0] in _SPLITTERS  # aten's unbind.int too


class ValueProxy(fx.Proxy):
    """A proxy that knows its example value."""

    def _value(self):
        return self.tracer.values.get(self.node, _MISSING)

    def _concrete(self):
        value = self._value()
        if value is _MISSING:
            raise fx.proxy.TraceError("symbolically traced variables cannot be used as inputs to control flow")
        return value

    def _decided(self, kind: str, value):
        """Python took `value` for this node: the graph asserts it (_guards.py), unless a value is being computed."""
        if not self.tracer.evaluating:
            self.tracer.decisions.append(Decision(self.node, kind, value, source_line()))
        return value

    def __getattr__(self, name):
        if name.startswith("__") and name.endswith("__"):  # protocol probes (numpy, cuda), not tensor attributes
            raise AttributeError(name)
        value = self._value()
        if name in _AUTOGRAD and isinstance(value, torch.Tensor) and not self.tracer.evaluating:
            raise fx.proxy.TraceError(f"the code reads `.{name}`, which differs under torch.no_grad() and after a freeze; "
                                      "a graph cannot hold a branch on it")
        if name in _STATIC and isinstance(value, torch.Tensor):
            return getattr(value, name)
        return ValueAttribute(self, name)

    def concrete_value(self):
        """The example's value where Python needs a real one (`torch.finfo(x.dtype)`): the graph asserts it."""
        return self._decided("value", self._concrete())

    def __bool__(self):
        return self._decided("bool", _decide(bool, self._concrete()))

    def __index__(self):
        return self._decided("index", _decide(operator.index, self._concrete()))

    def __len__(self):
        value = self._value()
        if isinstance(value, (tuple, list, torch.Size)):
            if _splits(self.node):  # as many pieces as a size gives: `for t in x.unbind(1)` ran the example's count
                return self._decided("len", len(value))
            return len(value)  # structure, not shape: nothing to guard
        return self._decided("len", len(self._concrete()))

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __setitem__(self, key, value):
        self.tracer.create_proxy("call_function", operator.setitem, (self, key, value), {})


def _decide(convert, value):
    """A Python value from an example value; tensor contents are unknown on fake tensors."""
    try:
        return convert(value)
    except Exception:
        raise fx.proxy.TraceError("control flow depends on tensor values (data-dependent), which no graph can hold") from None


class ValueAttribute(ValueProxy, Attribute):
    """`proxy.attr`, created lazily as torch.fx does, with a value."""



@contextlib.contextmanager
def _real_dtypes():
    """`torch.finfo(x.dtype)` / `torch.iinfo(...)` take the example's dtype (a decision the graph asserts):
    a mask's minimum is a number of the model's code, not a value that follows x."""
    finfo, iinfo = torch.finfo, torch.iinfo

    def real(info):
        def call(dtype=None, *args):
            return info(dtype.concrete_value() if isinstance(dtype, ValueProxy) else dtype, *args) if dtype is not None else info()
        return call
    torch.finfo, torch.iinfo = real(finfo), real(iinfo)
    try:
        yield
    finally:
        torch.finfo, torch.iinfo = finfo, iinfo


@contextlib.contextmanager
def _unpatched_modules():
    """torch.fx patches Module.__call__/__getattr__ while tracing; the fake copy must run unpatched."""
    patched = nn.Module.__call__, nn.Module.__getattr__
    nn.Module.__call__, nn.Module.__getattr__ = _orig_module_call, _orig_module_getattr
    try:
        yield
    finally:
        nn.Module.__call__, nn.Module.__getattr__ = patched


class ValueTracer(Tracer):
    """Our tracer, computing each node's value on a fake copy of the root."""

    def __init__(self, *args, example: tuple = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.values: dict[fx.Node, Any] = {}
        self.decisions: list[Decision] = []
        self.evaluating = False  # computing a value: numbers Python reads then are not decisions of the graph
        self.example = list(example)
        self.mode = FakeTensorMode(allow_non_fake_inputs=True)
        self.fake_root = None

    def trace(self, root, concrete_args=None):
        self.fake_root = clone(root, self.mode.from_tensor)
        self._inputs = iter(self.example)
        with quiet_fake_tensors(), _real_dtypes():
            return super().trace(root, concrete_args=concrete_args)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ValueProxy(node, self)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        self.values[proxy.node] = self._evaluate(kind, target, args, kwargs)
        return proxy

    def _fake(self, value):
        if isinstance(value, fx.Proxy):
            return self.values.get(value.node, _MISSING)
        if isinstance(value, slice):  # `x[:, :n]`: the graph keeps n; the value needs its number
            return slice(*(self._fake(v) for v in (value.start, value.stop, value.step)))
        if isinstance(value, torch.Tensor) and not isinstance(value, torch._subclasses.FakeTensor):
            return self.mode.from_tensor(value)
        return value

    def _evaluate(self, kind, target, args, kwargs):
        if kind == "placeholder":
            value = next(self._inputs, _MISSING)
            return self.mode.from_tensor(value) if isinstance(value, torch.Tensor) else value
        if kind == "output":
            return _MISSING
        args, kwargs = pytree.tree_map(self._fake, (args, kwargs), is_leaf=lambda x: isinstance(x, fx.Proxy))
        if any(v is _MISSING for v in pytree.tree_leaves((args, kwargs))):
            return _MISSING
        self.evaluating = True
        try:
            with self.mode, _unpatched_modules():
                if kind == "call_function":
                    return target(*args, **kwargs)
                if kind == "call_method":
                    return getattr(args[0], target)(*args[1:], **kwargs)
                if kind == "call_module":
                    return self.fake_root.get_submodule(target)(*args, **kwargs)
                if kind == "get_attr":
                    try:
                        return get_path(self.fake_root, target)
                    except AttributeError:  # a constant torch.fx attached to the root while tracing
                        return self.mode.from_tensor(get_path(self.root, target))
        except Exception:  # the value stays unknown; tracing goes on symbolically
            return _MISSING
        finally:
            self.evaluating = False
        return _MISSING


def add_shape_guards(graph: fx.Graph, inputs: tuple, where: str) -> None:
    """Assert, in the graph itself, that each tensor input has the example's shape."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    anchor = placeholders[-1]
    for node, value in zip(placeholders, inputs):
        if not isinstance(value, torch.Tensor):
            continue
        shape = tuple(int(d) for d in value.shape)
        message = (f"'{where or 'the model'}' was traced on input '{node.name}' of shape {list(shape)} and its code "
                   f"reads that shape; capture it again with example inputs of the shape you will use")
        with graph.inserting_after(anchor):
            size = graph.call_function(getattr, (node, "shape"))
        with graph.inserting_after(size):
            same = graph.call_function(operator.eq, (size, shape))
        with graph.inserting_after(same):
            anchor = graph.call_function(torch._assert, (same, message))


_PROXY_TEXT = re.compile(r"Proxy\(([A-Za-z_][A-Za-z0-9_]*)\)")


def live_messages(graph: fx.Graph, shapes: dict[str, Meta]) -> bool:
    """Make assert messages the forward built from traced values say the value of the call that fails.

    `torch._assert(h == 224, f"Expected 224 but got {h}!")` is traced with the message already
    formatted, and the proxy reads "Proxy(getitem_2)" in it. Such a message becomes a `%` format of
    the graph's values, made on each call: "Expected 224 but got 48!", as the original says. A
    value that is a tensor (or of unknown kind, without example inputs) is not formatted on every call:
    the message names where it comes from instead (`x.shape[2]`). True when the graph changed.
    """
    nodes = {n.name: n for n in graph.nodes}
    changed = False
    for node in list(graph.find_nodes(op="call_function", target=torch._assert)):
        text = node.args[1] if len(node.args) > 1 else None
        if not isinstance(text, str) or not any(name in nodes for name in _PROXY_TEXT.findall(text)):
            continue
        parts = _PROXY_TEXT.split(text)   # text, name, text, name, ..., text
        values = [nodes[name] for name in parts[1::2] if name in nodes and _printable(shapes.get(name), nodes[name])]
        pieces = []
        for i, part in enumerate(parts):
            if i % 2 and part in nodes and _printable(shapes.get(part), nodes[part]):
                pieces.append("%s")
                continue
            piece = part if i % 2 == 0 else f"`{render(nodes[part])}`" if part in nodes else f"Proxy({part})"
            pieces.append(piece.replace("%", "%%") if values else piece)
        template = "".join(pieces)
        message = template
        if values:
            with graph.inserting_before(node):
                message = graph.call_function(operator.mod, (template, tuple(values)))
            # the message belongs to the module whose assert it is: sites (a Detach after that
            # module) must not see it as a second way out of the module
            message.meta.update({k: node.meta[k] for k in ("nn_module_stack", "stack_trace") if k in node.meta})
            shapes[message.name] = Meta(None, None, "str")
        node.args = (node.args[0], message, *node.args[2:])
        changed = True
    return changed


def _printable(meta: Meta | None, node: fx.Node) -> bool:
    """A value cheap and short to format on every call: a size, a number, a shape (known from the
    example call, or, without one, by being a size read)."""
    if meta is not None:
        return meta.kind in ("int", "float", "bool", "Size", "SymInt", "str", "NoneType", "dtype")
    return _size_read(node)


def _size_read(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    if node.op == "call_method":
        return node.target in ("size", "dim", "numel")
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return node.args[1] in ("shape", "ndim")
    if node.target in (operator.getitem, len):
        return _size_read(node.args[0])
    return False
