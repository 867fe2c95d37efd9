"""Outputs made without running the op: a shape pass's shortcuts.

On meta and fake tensors torch runs many ops through Python reference code or
Python meta kernels, a tenth of a millisecond to a millisecond a call, most of
a shape pass. Where an op's output metadata (shape, dtype, strides) follows
from its inputs' metadata and its module's attributes alone, it is made here
directly. Each shortcut takes only the plain case, checked first; anything
else returns None and the op runs, for its output or its error
(tests/test_speed_paths.py compares every shortcut with running the op).
A shortcut reads a module's attributes and never runs it, so on a meta pass
it may read the original module itself (`_same_device`).
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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
    w, b = module.weight, module.bias
    # sizes from the weight, not from in_features/out_features: a weight replaced by hand leaves those stale
    if (w.dim() != 2 or x.dim() < 1 or x.shape[-1] != w.shape[1] or x.dtype != w.dtype or not _same_device(x, w)
            or (b is not None and tuple(b.shape) != (w.shape[0],))):
        return None
    shape = (*x.shape[:-1], w.shape[0])
    return torch.empty(shape, dtype=x.dtype, device="meta") if x.is_meta else x.new_empty(shape)


def _layer_norm(module: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor | None:
    """LayerNorm's output without running it (on meta it runs reference code: milliseconds a call);
    anything the module would refuse, or compute in another dtype, runs it."""
    shape = tuple(module.normalized_shape)
    if not x.dtype.is_floating_point or tuple(x.shape[x.dim() - len(shape):]) != shape or x.dim() < len(shape):
        return None
    if any(t is not None and (t.dtype != x.dtype or not _same_device(x, t) or tuple(t.shape) != shape)
           for t in (module.weight, module.bias)):
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
            or not module._qkv_same_embed_dim or {t.dtype for t in args} != {w.dtype}  # all meta (above): any device
            or module.bias_k is not None or module.add_zero_attn):  # each adds a key: the weights are L x (L + 1)
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
    w, b = module.weight, module.bias
    # channels and kernel from the weight, not the attributes: a weight replaced by hand (pruned) leaves them stale
    if (not _plain_meta(x, n) or module.padding_mode != "zeros" or x.dtype != w.dtype or not w.is_contiguous()
            or module.transposed or w.dim() != n + 2 or x.shape[1] != w.shape[1] * module.groups
            or (b is not None and tuple(b.shape) != (w.shape[0],))
            or not all(isinstance(v, tuple) and len(v) == n for v in (module.stride, module.dilation))):
        return None
    if module.padding == "same":
        spatial = tuple(x.shape[2:])
    else:
        padding = (0,) * n if module.padding == "valid" else module.padding
        if not (isinstance(padding, tuple) and len(padding) == n):
            return None
        spatial = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s
                        in zip(x.shape[2:], padding, module.dilation, w.shape[2:], module.stride))
        if any(size < 1 for size in spatial):
            return None
    return torch.empty((x.shape[0], w.shape[0], *spatial), dtype=x.dtype, device="meta")


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
    if x.dim() < 2 or any(t is not None and tuple(t.shape) != (x.shape[1],)
                          for t in (module.weight, module.bias, module.running_mean, module.running_var)):
        return None  # running it raises the error a real run would (num_features may be stale: not read)
    if module.training or module.running_mean is None:
        F._verify_batch_size(x.size())  # batch statistics need more than one value per channel
    return _empty_as(x)


def module_output(module: nn.Module, args: tuple, kwargs: dict):
    """The output of calling `module`, made from its attributes and the inputs' metadata, or None: run it."""
    if _hooked(module) or "forward" in vars(module):
        return None  # a hook, or a forward of the instance's own, may change what comes out: only running it tells
    made = None
    if len(args) == 1 and not kwargs and _shape_only(args[0]):
        kind, x = type(module), args[0]
        if kind in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
            made = _same_shape_norm(module, x)
        elif kind is nn.Linear:
            made = _linear(module, x)
        elif kind in _SAME_SHAPE_MODULES and x.dtype.is_floating_point:
            made = _empty_as(x)
        elif kind is nn.LayerNorm:
            made = _layer_norm(module, x)
        elif kind in _CONVOLUTIONS:
            made = _convolution(module, x)
        elif kind in _ADAPTIVE_POOLS:
            made = _adaptive_pool(x, module.output_size, _ADAPTIVE_POOLS[kind])
    elif type(module) is nn.MultiheadAttention and args:
        made = _self_attention(module, args, kwargs)
    return made


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or nn.modules.module._global_forward_hooks
                or nn.modules.module._global_forward_pre_hooks)


def function_output(target, args: tuple, kwargs: dict):
    """The output of calling function `target`, made from the inputs' metadata, or None: run it."""
    if target in _SAME_SHAPE_CALLS:
        return _same_shape_op(args, kwargs)
    if target is torch.cat:
        return _cat(*args, **kwargs)
    if target in _ADAPTIVE_POOL_CALLS and len(args) == 2 and not kwargs:
        return _adaptive_pool(args[0], args[1], _ADAPTIVE_POOL_CALLS[target])
    return None


def method_output(target: str, args: tuple, kwargs: dict):
    """The output of calling tensor method `target`, made from the inputs' metadata, or None: run it."""
    return _same_shape_op(args, kwargs) if target in _SAME_SHAPE_METHODS else None
