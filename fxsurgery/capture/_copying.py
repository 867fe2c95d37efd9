"""Copies of modules that never touch the user's: structure copied, tensors shared or remade."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from ..errors import ModelError


def assign(root: nn.Module, path: str, value: Any, persistent: bool = True) -> None:
    """Install a module or tensor at a dotted path, creating empty parents (a buffer `persistent` or not)."""
    *parents, name = path.split(".")
    for part in parents:
        child = root._modules.get(part)
        if child is None:
            child = nn.Module()
            root.add_module(part, child)
        root = child
    if isinstance(value, nn.Module):
        root.add_module(name, value)
    elif isinstance(value, nn.Parameter):
        root.register_parameter(name, value)
    elif isinstance(value, torch.Tensor):
        root.register_buffer(name, value, persistent=persistent)
    else:
        setattr(root, name, value)


def root_of(table: dict[str, Any]) -> nn.Module:
    """A bare module holding each module or tensor of `table` at its path."""
    root = nn.Module()
    for path in sorted(table, key=lambda p: p.count(".")):
        assign(root, path, table[path])
    return root


_ATOMIC = (type(None), bool, int, float, str)


def _plain(cls: type) -> bool:
    """A module class copied as nn.Module's own state is (no copy hooks of its own)."""
    # a __setstate__ of its own is fine: it is called with the copied state, as deepcopy would
    # (torch's convolutions have one, and went the slow generic way for it)
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ is nn.Module.__getstate__
            and "__slots__" not in cls.__dict__)


def _copied(value: Any, memo: dict) -> Any:
    """copy.deepcopy(value, memo), with the containers every module has made directly."""
    kind = type(value)
    if kind in (dict, OrderedDict) and id(value) not in memo:
        # a module's _parameters/_buffers: each tensor is already in `memo` (clone, share)
        items = [(k, v if v is None or type(v) in _ATOMIC else memo.get(id(v), memo)) for k, v in value.items()]
        if all(type(k) is str and v is not memo for k, v in items):
            memo[id(value)] = made = kind(items)  # shared containers stay shared, as with deepcopy
            return made
    elif kind is tuple and all(type(v) in _ATOMIC for v in value):
        return value  # a tuple of atomics is its own deep copy
    elif kind is set and id(value) not in memo and all(type(v) in _ATOMIC for v in value):
        memo[id(value)] = made = set(value)
        return made
    return copy.deepcopy(value, memo)


def _copy_tree(module: nn.Module, memo: dict) -> nn.Module:
    """copy.deepcopy(module, memo), module by module without the pickle protocol's detour.

    What deepcopy does for a module (its __dict__ copied, its tensors taken from `memo`)
    costs most of a capture on long graphs when done generically; a class that
    customises copying is handed to copy.deepcopy as it is."""
    if id(module) in memo:
        return memo[id(module)]
    cls = type(module)
    if not _plain(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state = {}
    for key, value in module.__dict__.items():
        if key == "_compiled_call_impl":  # what nn.Module.__getstate__ leaves out
            continue
        if key == "_modules":
            state[key] = type(value)((k, None if c is None else _copy_tree(c, memo)) for k, c in value.items())
        elif type(value) in _ATOMIC:
            state[key] = value
        elif type(value) in (dict, OrderedDict) and not value:
            state[key] = type(value)()
        else:
            state[key] = _copied(value, memo)
    if cls.__setstate__ is nn.Module.__setstate__:
        new.__dict__.update(state)
    else:
        new.__setstate__(state)
    copy._keep_alive(module, memo)  # as deepcopy does: `memo` must keep what it keys by id alive
    return new


def clone(module: nn.Module, make, memo: dict | None = None) -> nn.Module:
    """Deep-copy a module's structure, each tensor replaced by `make(tensor)`.

    Tensors shared between paths stay shared in the copy (one memo entry each).
    """
    memo = {} if memo is None else memo
    for sub in module.modules():
        for tensors, param in ((sub._parameters, True), (sub._buffers, False)):
            for t in tensors.values():
                if t is not None and id(t) not in memo:
                    made = make(t)
                    memo[id(t)] = nn.Parameter(made, requires_grad=t.requires_grad) if param else made
    return _copy_tree(module, memo)


def share(module: nn.Module) -> nn.Module:
    """A copy of the module objects that shares every tensor with the original.

    Tracing runs Python forward code, which may store things on `self`
    (torchvision's AnchorGenerator caches its anchors); tracing a copy keeps
    the user's model exactly as it was.
    """
    memo = {}
    for sub in module.modules():
        for t in [*sub._parameters.values(), *sub._buffers.values()]:
            if t is not None:
                memo[id(t)] = t
    return _copy_tree(module, memo)


def refuse_hooked_weights(model: nn.Module) -> None:
    """Old-style weight_norm / spectral_norm and torch.nn.utils.prune compute a module's weight in a forward
    pre-hook: the weight is then no tensor of the module's own, and cannot be copied or traced."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm
    for path, sub in model.named_modules():
        for hook in sub._forward_pre_hooks.values():
            kind = {WeightNorm: "weight_norm", SpectralNorm: "spectral_norm"}.get(type(hook))
            # Python that runs: model.layer1.0.conv1 does not parse
            where = (f"model.{path}" if all(p.isidentifier() for p in path.split(".")) else f"model.get_submodule({path!r})") if path else "model"
            fix = (f"use torch.nn.utils.parametrizations.{kind}, or call torch.nn.utils.remove_{kind}({where}) first" if kind else
                   f"call torch.nn.utils.prune.remove({where}, {getattr(hook, '_tensor_name', 'weight')!r}) first (the pruned "
                   "weight stays, as a tensor of its own)")
            if kind is not None or isinstance(hook, BasePruningMethod):
                raise ModelError(f"{path or '(the model)'}: uses torch.nn.utils.{kind or 'prune'}, whose weight a hook recomputes "
                                 f"before each call; fix: {fix}")

