"""The tracer: torch.fx's, with an extensible leaf policy and the place tracing failed."""

from __future__ import annotations

import builtins
import collections
import contextlib
import fnmatch
import re

import torch
from torch import fx, nn
from torch.fx._symbolic_trace import _wrapped_fns_to_patch
from torch.utils._python_dispatch import TorchDispatchMode

from .._progress import counter
from ._dualgraph import current
from ._gradmode import NO_GRAD, cut, watched
from ._livemodes import read_modes

FIRST_ARGUMENT_OF = "fxs_first_argument_of"  # node meta: the modules (traced through) that took this node first


@contextlib.contextmanager
def _state_kept():
    """`self.n += 1` on a buffer while tracing would leave the graph without it (the result never counts):
    a forward that assigns a buffer or parameter a computed value fails to trace, and stays Python."""
    setattr_ = nn.Module.__setattr__

    def guarded(module, name, value):
        if isinstance(value, fx.Proxy) and (name in module.__dict__.get("_buffers", ()) or name in module.__dict__.get("_parameters", ())):
            raise RuntimeError(f"{type(module).__name__}.forward assigns self.{name} a computed value, state a graph cannot hold "
                               f"from call to call (self.{name}.add_(...) in place can)")
        setattr_(module, name, value)
    nn.Module.__setattr__ = guarded
    try:
        yield
    finally:
        nn.Module.__setattr__ = setattr_


class _Writes(TorchDispatchMode):
    """Refuses an in-place write to the model's own parameters and buffers while tracing (an EMA teacher updated
    in `for pt, ps in zip(teacher.parameters(), ...)`: real tensors, not graph values). The write ran for real on
    the model given, which apply never changes, and the graph held none of it. Its module stays Python."""

    def __init__(self, tracer, root: nn.Module):
        super().__init__()
        self.tracer = tracer
        self.storages = {t.untyped_storage().data_ptr() for t in [*root.parameters(), *root.buffers()]
                         if t.device.type != "meta" and t.untyped_storage().data_ptr()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = getattr(func, "_schema", None)
        if self.storages and getattr(schema, "is_mutable", False) and not getattr(self.tracer, "evaluating", False):
            for i, arg in enumerate(schema.arguments):
                value = args[i] if i < len(args) else kwargs.get(arg.name)
                if (arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, torch.Tensor)
                        and value.device.type != "meta" and value.untyped_storage().data_ptr() in self.storages):
                    raise fx.proxy.TraceError(f"the code writes to a parameter or buffer in place ({func.__name__}) on a "
                                              "tensor the graph does not read (from .parameters()?)")
        return func(*args, **kwargs)


def _len(value):
    if isinstance(value, fx.Proxy):  # a guard of a graph traced again: `len(split)` stays a node
        return value.tracer.create_proxy("call_function", len, (value,), {})
    return len(value)


@contextlib.contextmanager
def _guard_lens(root: nn.Module):
    """A graph made here asserts `len(split) == 3` where Python iterated a split; traced again without example
    values (`fxsurgery inspect` of a saved GPT-2), builtin len of a proxy fails and the whole model stayed Python.
    While tracing, the generated forwards' `len` records itself instead, as torch.fx.wrap would make it."""
    patched = []
    for sub in root.modules():
        if isinstance(sub, fx.GraphModule):
            _ = sub.code  # a lazily compiled module compiles now: its forward is the generated one
            for fn in (type(sub).__dict__.get("forward"), sub.__dict__.get("_fxsurgery_other_forward")):
                names = getattr(fn, "__globals__", None)
                if isinstance(names, dict) and names.get("len", len) is len and not any(p is names for p in patched):
                    names["len"] = _len  # torch.fx put the builtin among the names its code reads
                    patched.append(names)
    try:
        yield
    finally:
        for names in patched:
            names["len"] = len


class Tracer(fx.Tracer):
    """torch.fx's tracer with a leaf policy the user can extend.

    Leaves are torch.nn's own modules (torch.fx's default), instances of
    `leaf_types`, and modules whose path matches a glob in `leaf_paths`.
    """

    def __init__(self, leaf_types=(), leaf_paths=(), opaque=(), prefix: str = ""):
        # Buffers read in traced code become get_attr nodes (not constants frozen at
        # trace time), so they transfer and save like parameters.
        super().__init__()
        # a function torch.fx.wrap registered is a leaf whatever name calls it: model.py imports torchvision's
        # stochastic_depth as torchvision_ops_stochastic_depth_stochastic_depth, a name wrap() does not patch
        self._autowrap_function_ids |= {id(scope[name]) for (_, name), scope in _wrapped_fns_to_patch.items() if name in scope}
        self.proxy_buffer_attributes = True
        self.leaf_types = tuple(leaf_types)
        self.leaf_paths = tuple(leaf_paths)
        self.opaque = set(opaque)  # exact paths kept as Python (their forward could not be traced)
        self.prefix = prefix       # the traced root sits under a shim at this prefix
        self.failed_in: str | None = None
        self._open: list[str] = []

    def _relative(self, qualname: str) -> str | None:
        if not self.prefix:
            return qualname
        if qualname == self.prefix.rstrip("."):
            return None
        return qualname[len(self.prefix):] if qualname.startswith(self.prefix) else qualname

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        args = super().create_args_for_root(root_fn, is_module, concrete_args)
        for node in self.graph.find_nodes(op="placeholder"):
            if isinstance(node.type, str):  # `from __future__ import annotations`: code can only name a builtin type
                node.type = getattr(builtins, node.type, None) if isinstance(getattr(builtins, node.type, None), type) else None
        self._modes = read_modes(self, self.root)  # code fxsurgery wrote reads the mode as a graph value
        return args

    def trace(self, root, concrete_args=None):
        self._modes = None
        try:
            root = current(root)  # a graph per mode: its mode's
            with counter("capture", unit="node") as self._count, _state_kept(), watched(self), _guard_lens(root), \
                    _Writes(self, root):
                graph = super().trace(root, concrete_args=concrete_args)  # a large model takes a while to trace
            cut(graph, getattr(self, "values", None), self.root)  # the forward's own torch.no_grad
            return graph
        finally:
            self._count = None
            if self._modes is not None:
                self._modes.restore()

    def create_node(self, *args, **kwargs):
        node = super().create_node(*args, **kwargs)
        if node.name == "self":  # a submodule named `self`: the generated forward's own argument would be shadowed
            node._rename("self_")
        if getattr(self, "_count", None) is not None:
            self._count.update(1)
        if getattr(self, "grad_off", False) and node.op in ("call_function", "call_method", "call_module"):
            node.meta[NO_GRAD] = True
        return node

    def create_arg(self, a):
        # torch.fx writes every dict as a plain one: an OrderedDict (torchvision's segmentation models return
        # one) becomes a node that builds it, so the result returns the type the original did
        if type(a) is collections.OrderedDict:
            return self.create_node("call_function", collections.OrderedDict, (super().create_arg(dict(a)),), {})
        return super().create_arg(a)

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        qualname = self._relative(qualname)
        if qualname is None:
            return False  # the module the shim calls is always traced through
        if qualname in self.opaque:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        if any(fnmatch.fnmatchcase(qualname, p) for p in self.leaf_paths):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m, forward, args, kwargs):
        try:
            path = self.path_of_module(m)
        except NameError:
            # made by the forward itself (`loss_fct = CrossEntropyLoss()`): no path to call it by, so its code is traced
            return forward(*args, **kwargs)
        self._open.append(path)
        relative = self._relative(path)
        if relative and args and isinstance(args[0], fx.Proxy):  # what Delete of a traced-through block passes on
            args[0].node.meta.setdefault(FIRST_ARGUMENT_OF, []).append(relative)
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            # The innermost module open when tracing failed is the one to make a leaf.
            if self.failed_in is None:
                self.failed_in = self._relative(self._open[-1]) or ""
            raise
        finally:
            self._open.pop()


_FX_SUFFIX = re.compile(r"_[0-9]+$")


def qualified_names(graph: fx.Graph) -> dict[str, str]:
    """Node name -> module-qualified name, as torchvision's feature extraction names nodes.

    A module call is named by its path (`layer1.0.relu`), a function or
    method call by the module it was made in and its op (`layer1.0.add`);
    the n-th repeat of a name gets `_n` (`layer1.0.relu_1`, the block's
    second call of its ReLU). Unlike torchvision, a module path keeps its own
    digits (a module named `conv_1` is `conv_1`): only torch.fx's
    graph-wide counter is taken off op names. Computed from
    `nn_module_stack`, so it holds for graphs edited after tracing too.
    """
    names: dict[str, str] = {}
    seen: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "output":
            continue
        if node.op == "call_module":
            base = str(node.target)
        else:
            stack = list((node.meta.get("nn_module_stack") or {}).values())
            owner = stack[-1][0] if stack and node.op != "placeholder" else ""
            op = _FX_SUFFIX.sub("", node.name)
            base = f"{owner}.{op}" if owner else op
        k = seen.get(base, 0)
        seen[base] = k + 1
        names[node.name] = base if k == 0 else f"{base}_{k}"
    return names
