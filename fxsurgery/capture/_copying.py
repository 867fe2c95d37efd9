"""Copies of modules that never touch the user's: structure copied, tensors shared or remade."""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn


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
    return copy.deepcopy(module, memo)


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
    return copy.deepcopy(module, memo)


