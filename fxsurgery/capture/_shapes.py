"""Shape propagation on fake tensors: every node gets a shape, no weight is touched.

Running the real module to learn shapes would update BatchNorm statistics of
the user's model and cost a full forward pass; fake tensors carry only shapes
and dtypes, so the original stays untouched and large models cost nothing.
Code that needs real values (data-dependent control flow) is run on a real
copy instead.
"""

from __future__ import annotations

import contextlib
import logging
import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException, FakeTensorMode, UnsupportedOperatorException
from torch.fx.immutable_collections import immutable_dict, immutable_list

from .._util import shape_text
from ._copying import clone, root_of

# Fake tensors log every failing op with a traceback; the failure is reported
# once, as a one-line error naming the rule, so the log is silenced meanwhile.
_FAKE_LOGGER = logging.getLogger("torch._subclasses.fake_tensor")


@contextlib.contextmanager
def _quiet(logger: logging.Logger):
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


# Ops whose output has the shape, dtype and layout of their tensor inputs when those all agree.
# On meta and fake tensors torch runs them through Python reference code (about a millisecond
# each, most of a long chain's shape pass); here their output is made directly.
_SAME_SHAPE_CALLS = {torch.relu, F.relu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.gelu, F.silu, F.hardswish,
                     F.hardsigmoid, F.relu6, F.mish, torch.neg, operator.neg, torch.exp,
                     operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul, torch.div}
_SAME_SHAPE_METHODS = {"relu", "sigmoid", "tanh", "neg", "exp", "add", "sub", "mul", "div"}
# Elementwise modules of one floating tensor (exact types: a subclass may reshape; Dropout2d and
# kin check the rank, so they run); nn.GELU on meta alone ran Python reference code for
# several milliseconds per call
_SAME_SHAPE_MODULES = {nn.ReLU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.ReLU6, nn.Mish,
                       nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Softplus, nn.Dropout, nn.AlphaDropout}


def _same_shape_op(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The output of an elementwise op whose tensor inputs agree in shape, dtype and device (else None: run it).
    Meta inputs that all are contiguous may differ in shape where they broadcast (a squeeze-excitation's
    scale): the output then has the broadcast shape, contiguous, as torch's meta run makes it."""
    if kwargs and set(kwargs) != {"inplace"} or kwargs.get("inplace"):
        return None
    first = args[0] if args else None
    if not isinstance(first, torch.Tensor) or not first.dtype.is_floating_point:
        return None
    if not _shape_only(first):
        return None
    shape = same = first.shape
    for other in args[1:]:
        if isinstance(other, torch.Tensor):
            if other.dtype != first.dtype or other.device != first.device:
                return None
            if other.shape != shape:
                shape = _broadcast(shape, other.shape) if first.is_meta and first.is_contiguous() and other.is_contiguous() else None
                if shape is None:
                    return None
        elif type(other) not in (int, float):
            return None
    return _empty_as(first) if shape is same else torch.empty(shape, dtype=first.dtype, device="meta")


def _broadcast(a: tuple, b: tuple) -> tuple | None:
    """The broadcast of two shapes without zero sizes, or None (torch.broadcast_shapes costs tens of microseconds)."""
    if len(a) < len(b):
        a, b = b, a
    b = (1,) * (len(a) - len(b)) + tuple(b)
    out = []
    for x, y in zip(a, b):
        if x == 0 or y == 0 or (x != y and x != 1 and y != 1):
            return None
        out.append(x if y == 1 else y)
    return tuple(out)


def _empty_as(x: torch.Tensor) -> torch.Tensor:
    """torch.empty_like(x) for a contiguous tensor: on meta, empty_like runs Python reference code
    (tens of microseconds, most of a long chain's shape pass); empty with the same shape is one call."""
    if x.is_meta and x.is_contiguous():
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    return torch.empty_like(x)


_NEEDS_REAL = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)


@dataclass(frozen=True)
class Meta:
    """What flows along an edge: a tensor's shape and dtype, or another kind of value."""

    shape: tuple | None
    dtype: torch.dtype | None
    kind: str = "tensor"

    @property
    def is_tensor(self) -> bool:
        return self.kind == "tensor"

    @classmethod
    def of(cls, value: Any) -> "Meta":
        if isinstance(value, torch.Tensor):
            return cls(tuple(int(d) for d in value.shape), value.dtype)
        return cls(None, None, type(value).__name__)

    def __str__(self) -> str:
        return shape_text(self.shape) if self.is_tensor else self.kind


class PropagationError(Exception):
    """A node failed while shapes were propagated (wrapped by the caller)."""

    def __init__(self, node: fx.Node, exc: BaseException, metas: dict | None = None):
        super().__init__(f"{node.name}: {exc}")
        self.node, self.exc, self.metas = node, exc, metas or {}


def _mutable(value):
    if isinstance(value, immutable_list):
        return [_mutable(v) for v in value]
    if isinstance(value, immutable_dict):
        return {k: _mutable(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(_mutable(v) for v in value)
    return value


class _Recorder(fx.Interpreter):
    def __init__(self, module, graph, metas, keep: bool = False):
        # `keep`: every node's value stays in `env` (a later pass re-runs only what changed)
        super().__init__(module, garbage_collect_values=not keep, graph=graph)
        self.metas = metas

    def map_nodes_to_values(self, args, n):
        # torch.fx hands functions immutable lists; wrapped functions may mutate theirs
        # (torchvision's swin3d does), as they can when the generated code calls them
        return _mutable(super().map_nodes_to_values(args, n))

    def read_only(self, target: str):
        """The module at `target` for a shortcut, which reads its attributes and never runs it."""
        return self.fetch_attr(target)

    def call_module(self, target, args, kwargs):
        module = self.read_only(target)
        if len(args) == 1 and not kwargs and _shape_only(args[0]):
            made = None
            if type(module) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
                made = _same_shape_norm(module, args[0])
            elif type(module) is nn.Linear:
                made = _linear(module, args[0])
            elif type(module) in _SAME_SHAPE_MODULES and args[0].dtype.is_floating_point:
                made = _empty_as(args[0])
            elif type(module) is nn.LayerNorm:
                made = _layer_norm(module, args[0])
            elif type(module) in _CONVOLUTIONS:
                made = _convolution(module, args[0])
            elif type(module) in _ADAPTIVE_POOLS:
                made = _adaptive_pool(args[0], module.output_size, _ADAPTIVE_POOLS[type(module)])
            if made is not None:
                return made
        elif type(module) is nn.MultiheadAttention and args:
            made = _self_attention(module, args, kwargs)
            if made is not None:
                return made
        return super().call_module(target, args, kwargs)

    def call_function(self, target, args, kwargs):
        made = None
        if target in _SAME_SHAPE_CALLS:
            made = _same_shape_op(args, kwargs)
        elif target is torch.cat:
            made = _cat(*args, **kwargs)
        elif target in _ADAPTIVE_POOL_CALLS and len(args) == 2 and not kwargs:
            made = _adaptive_pool(args[0], args[1], _ADAPTIVE_POOL_CALLS[target])
        if made is not None:
            return made
        return super().call_function(target, args, kwargs)

    def call_method(self, target, args, kwargs):
        if target in _SAME_SHAPE_METHODS:
            same = _same_shape_op(args, kwargs)
            if same is not None:
                return same
        return super().call_method(target, args, kwargs)

    def run_node(self, n):
        try:
            # fx.Interpreter.run_node without its context manager that records the current node for
            # tracing machinery (none runs here): a tenth of a long chain's shape pass
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            value = getattr(self, n.op)(n.target, args, kwargs)
        except PropagationError:
            raise
        except Exception as exc:  # any failure of user code is reported against its node
            raise PropagationError(n, exc, self.metas) from exc
        self.metas[n.name] = Meta.of(value)
        return value


def _shape_only(x: Any) -> bool:
    """A tensor without values (meta or fake): real ones run, data-dependent code needs their values."""
    return isinstance(x, torch.Tensor) and (x.is_meta or isinstance(x, torch._subclasses.FakeTensor))


def _same_device(x: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether a module's tensor `t` is where `x` is: on a meta run every tensor counts as meta, and the
    module a shortcut reads may be the original (not copied to meta: it only reads its attributes)."""
    return x.is_meta or x.device == t.device


def _linear(module: nn.Linear, x: torch.Tensor) -> torch.Tensor | None:
    """nn.Linear's output without running it: on meta tensors a 2-d input decomposes into Python
    reference code (milliseconds per call). Anything that would fail runs the module for its error."""
    if x.dim() < 1 or x.shape[-1] != module.in_features or x.dtype != module.weight.dtype or not _same_device(x, module.weight):
        return None
    shape = (*x.shape[:-1], module.out_features)
    return torch.empty(shape, dtype=x.dtype, device="meta") if x.is_meta else x.new_empty(shape)


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor | None:
    """LayerNorm's output without running it (on meta it runs reference code: milliseconds a call);
    anything the module would refuse, or compute in another dtype, runs it."""
    shape = tuple(module.normalized_shape)
    if not x.dtype.is_floating_point or tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        return None
    if any(t is not None and (t.dtype != x.dtype or not _same_device(x, t)) for t in (module.weight, module.bias)):
        return None
    return _contiguous(x, x.shape)  # as layer_norm makes it, whatever the input's strides


_ATTENTION_KWARGS = {"need_weights", "average_attn_weights", "key_padding_mask", "attn_mask", "is_causal"}


def _self_attention(module: nn.MultiheadAttention, args: tuple, kwargs: dict) -> tuple | None:
    """nn.MultiheadAttention's outputs for batched self-attention without masks, without running it:
    its run on meta decomposes every projection, softmax and matmul into reference code."""
    if len(args) != 3 or set(kwargs) - _ATTENTION_KWARGS or any(kwargs.get(k) is not None for k in ("key_padding_mask", "attn_mask")):
        return None
    q, k, v = args
    # meta only: on fake CPU tensors the module may take its fused path, whose outputs differ in strides
    if kwargs.get("is_causal") or not all(isinstance(t, torch.Tensor) and t.is_meta for t in args):
        return None
    w = module.in_proj_weight
    if (q.dim() != 3 or q.shape != k.shape or q.shape != v.shape or q.shape[-1] != module.embed_dim or w is None
            or not module._qkv_same_embed_dim or {t.dtype for t in args} != {w.dtype}):  # all meta (above): any device
        return None
    n, length = (q.shape[0], q.shape[1]) if module.batch_first else (q.shape[1], q.shape[0])
    # strides as the module's own shape-only run makes them: batch_first transposes its (L, N, E) result
    out = _contiguous(q, (length, n, q.shape[2]))
    out = out.transpose(0, 1) if module.batch_first else out
    if not kwargs.get("need_weights", True):
        return out, None
    heads = () if kwargs.get("average_attn_weights", True) else (module.num_heads,)
    return out, _contiguous(q, (n, *heads, length, length))


_CONVOLUTIONS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_ADAPTIVE_POOLS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3}
_ADAPTIVE_POOL_CALLS = {F.adaptive_avg_pool1d: 1, F.adaptive_avg_pool2d: 2, F.adaptive_avg_pool3d: 3,
                        torch.adaptive_avg_pool1d: 1}


def _plain_meta(x: torch.Tensor, spatial: int) -> bool:
    """A batched, contiguous meta tensor with no empty dim: torch's meta kernels then make contiguous outputs."""
    return (x.is_meta and x.dim() == spatial + 2 and x.is_contiguous() and x.dtype.is_floating_point
            and all(d > 0 for d in x.shape))


def _convolution(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """A convolution's output without running it: its meta kernel is Python (about 0.1 ms a call, most
    of a CNN's shape pass). Only the plain case (zero padding, contiguous meta input and weight,
    matching dtype and channels); anything else runs the module, for its output or its error."""
    n = _CONVOLUTIONS[type(module)]
    w = module.weight
    if (not _plain_meta(x, n) or module.padding_mode != "zeros" or x.dtype != w.dtype or not w.is_contiguous()
            or x.shape[1] != module.in_channels or module.transposed):
        return None
    if module.padding == "same":
        spatial = tuple(x.shape[2:])
    else:
        padding = (0,) * n if module.padding == "valid" else module.padding
        spatial = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s
                        in zip(x.shape[2:], padding, module.dilation, module.kernel_size, module.stride))
        if any(size < 1 for size in spatial):
            return None
    return torch.empty((x.shape[0], module.out_channels, *spatial), dtype=x.dtype, device="meta")


def _adaptive_pool(x: torch.Tensor, size, n: int) -> torch.Tensor | None:
    """An adaptive average pool's output (its meta kernel is Python reference code: about 0.35 ms a call)."""
    if not isinstance(x, torch.Tensor) or not _plain_meta(x, n):
        return None
    size = (size,) * n if isinstance(size, int) else tuple(size)
    if len(size) != n or not all(s is None or (type(s) is int and s > 0) for s in size):
        return None
    out = tuple(x.shape[2 + i] if s is None else s for i, s in enumerate(size))
    return torch.empty((*x.shape[:2], *out), dtype=x.dtype, device="meta")


def _cat(tensors=None, dim=0, **rest) -> torch.Tensor | None:
    """torch.cat's output for contiguous meta tensors of one dtype and rank that agree but in `dim`
    (its meta kernel is Python: a quarter of a millisecond a call, most of a DenseNet's shape pass)."""
    if rest or type(tensors) not in (list, tuple) or not tensors or type(dim) is not int:
        return None
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or first.dim() == 0 or not -first.dim() <= dim < first.dim():
        return None
    dim %= first.dim()
    total = 0
    for t in tensors:
        if (not isinstance(t, torch.Tensor) or not t.is_meta or t.dtype != first.dtype or t.dim() != first.dim()
                or not t.is_contiguous() or any(d == 0 for d in t.shape)
                or any(a != b for i, (a, b) in enumerate(zip(t.shape, first.shape)) if i != dim)):
            return None
        total += t.shape[dim]
    return torch.empty((*first.shape[:dim], total, *first.shape[dim + 1:]), dtype=first.dtype, device="meta")


def _contiguous(x: torch.Tensor, shape: tuple) -> torch.Tensor:
    return torch.empty(shape, dtype=x.dtype, device="meta") if x.is_meta else x.new_empty(shape)


def _same_shape_norm(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """BatchNorm's output without running it: on meta and fake tensors it runs a decomposition that
    costs milliseconds per call (most of a ResNet's shape pass), for an output shaped as its input.
    The checks the module itself makes come first; anything unusual runs the module."""
    if not x.dtype.is_floating_point:
        return None
    if module.weight is not None and module.weight.dtype != x.dtype:
        return None
    module._check_input_dim(x)  # the module's own error for a wrong rank
    if x.dim() < 2 or x.shape[1] != module.num_features:
        return None  # running it raises the error a real run would
    if module.training or module.running_mean is None:
        F._verify_batch_size(x.size())  # batch statistics need more than one value per channel
    return _empty_as(x)


def _structure(root: nn.Module) -> nn.Module:
    """What an interpreter of `root`'s graph reads (its modules and tensors), without the GraphModule:
    copying one deep-copies and recompiles its code, a large part of a long graph's shape pass."""
    if not isinstance(root, fx.GraphModule):
        return root
    shell = nn.Module()
    shell._modules.update(root._modules)
    shell._parameters.update(root._parameters)
    shell._buffers.update(root._buffers)
    for name, value in vars(root).items():  # constants torch.fx attached as plain attributes
        if isinstance(value, torch.Tensor) and name not in vars(shell):
            vars(shell)[name] = value
    return shell


class _OnMeta(_Recorder):
    """A run on meta tensors over the original modules: each module or tensor a node uses is copied
    to meta when first used (`converted`), and not at all where a shortcut makes the node's output
    from its attributes. Copying the whole tree to meta first was a third of a shape pass."""

    def __init__(self, root: nn.Module, graph: fx.Graph, keep: bool):
        super().__init__(root, graph, {}, keep)
        self.converted: dict[int, tuple] = {}  # id(original) -> (original, its meta copy)

    def read_only(self, target: str):
        return super().fetch_attr(target)

    def fetch_attr(self, target: str):
        return meta_copy(super().fetch_attr(target), self.converted)


def meta_copy(obj, converted: dict):
    """`obj` (a module or tensor) on meta, made once per object and kept in `converted`."""
    hit = converted.get(id(obj))
    if hit is not None and hit[0] is obj:
        return hit[1]
    if isinstance(obj, nn.Module):
        made = clone(obj, to_meta)
    elif isinstance(obj, torch.Tensor):
        made = to_meta(obj)
        if isinstance(obj, nn.Parameter):
            made = nn.Parameter(made, requires_grad=obj.requires_grad)
    else:
        made = obj
    converted[id(obj)] = (obj, made)
    return made


def _on_meta(root: nn.Module, graph: fx.Graph, inputs: tuple, keep: bool) -> _Recorder | None:
    """Shapes on the meta device: the cheapest run there is, when the code allows it."""
    try:
        recorder = _OnMeta(root, graph, keep)
        with _quiet(_FAKE_LOGGER), torch.no_grad():
            recorder.run(*(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs))
        return recorder
    except Exception:  # data-dependent code, or tensors made on another device: fake tensors know better
        return None


def to_meta(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("meta")


@dataclass
class Pass:
    """One full shape pass: a Meta per node name; with `keep`, each node's value and how it was made."""

    metas: dict[str, Meta]
    kind: str                                # "meta", "fake" or "real"
    values: dict[str, Any]                   # node name -> its meta or fake value (`keep` only)
    mode: FakeTensorMode | None = None       # the fake tensors' mode (kind "fake")
    converted: dict | None = None            # id(original) -> (original, its meta copy) (kind "meta")


def full_pass(root: nn.Module, graph: fx.Graph, inputs: tuple, keep: bool = False) -> Pass:
    """Run `graph` over `root` on shape-only copies of `inputs` (meta, else fake, else a real copy)."""
    recorder = _on_meta(root, graph, inputs, keep)
    if recorder is not None:
        return Pass(recorder.metas, "meta", {n.name: v for n, v in recorder.env.items()} if keep else {},
                    converted=recorder.converted)
    metas = {}
    mode = FakeTensorMode(allow_non_fake_inputs=False)
    try:
        fake_root = clone(_structure(root), mode.from_tensor)
        recorder = _Recorder(fake_root, graph, metas, keep)
        with mode, _quiet(_FAKE_LOGGER):
            fake_inputs = tuple(mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in inputs)
            recorder.run(*fake_inputs)
        return Pass(metas, "fake", {n.name: v for n, v in recorder.env.items()} if keep else {}, mode)
    except PropagationError as err:
        if not isinstance(err.exc, _NEEDS_REAL):
            raise
    # Data-dependent code needs real values: run on a real copy, never the original.
    metas.clear()
    real_root = clone(root, lambda t: t.detach().clone())
    with torch.no_grad():
        _Recorder(real_root, graph, metas).run(*inputs)
    return Pass(metas, "real", {})


def propagate(root: nn.Module | dict, graph: fx.Graph, inputs: tuple, state=None) -> dict[str, Meta]:
    """A Meta per node name of `graph` run over `root` (a module, or a {target: module or tensor}
    table) on shape-only copies of `inputs`. With `state` (a ShapeState), the pass it kept is
    reused: only the nodes that changed since, and what their change reaches, run again."""
    if state is not None:
        return state.run(root, graph, inputs)
    return full_pass(root_of(root) if isinstance(root, dict) else root, graph, inputs).metas


def adapt(value: torch.Tensor, shape: tuple) -> torch.Tensor:
    """An example input cut or zero-padded to `shape`; values kept where dims overlap."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) == tuple(shape):
        return value
    if value.dim() != len(shape):
        return torch.zeros(shape, dtype=value.dtype, device=value.device)
    out = torch.zeros(shape, dtype=value.dtype, device=value.device)
    common = tuple(slice(0, min(a, b)) for a, b in zip(value.shape, shape))
    out[common] = value[common]
    return out


def quiet_fake_tensors():
    """Silence fake-tensor failure logs while a failure is expected and handled."""
    return _quiet(_FAKE_LOGGER)


