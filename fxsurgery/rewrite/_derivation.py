"""Which tensors a pattern's rewrite computed from the matched modules, followed op by op.

A pattern with `weights = "derived"` says its replacement is computed from
what it matched (a folded convolution), but a rewrite may as well build a
fresh layer and leave it at its random init. The report must not call that
"adapted": while `rewrite` runs, every torch call that reads a tensor whose
storage came from the matched modules marks what it returns (and what it
writes in place: `copy_`) as derived; `nn.Parameter(t)`, `.data` and views
share the storage and stay marked. A tensor of the replacement that ends up
unmarked is new.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree


def _storage(t: torch.Tensor) -> int:
    """Where a tensor's bytes live (0: none, an empty or meta tensor, which cannot be followed)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor subclass without storage
        return 0


class Derivation(TorchFunctionMode):
    """The storages computed from `sources` while the mode is on."""

    def __init__(self, sources: list[nn.Module]):
        super().__init__()
        self.marked = {p for m in sources for t in [*m.parameters(), *m.buffers()] if (p := _storage(t))}
        self.followed = bool(self.marked)  # a model without values (meta) cannot be followed
        self.alive: list = []  # a freed storage's address could come back as a fresh layer's: kept until the rewrite ends

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(isinstance(t, torch.Tensor) and _storage(t) in self.marked for t in pytree.tree_leaves((args, kwargs))):
            for t in pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor) and (p := _storage(t)) and p not in self.marked:
                    self.marked.add(p)
                    self.alive.append(t.untyped_storage())
        return out

    def derived(self, made: Any) -> frozenset | None:
        """Names of the tensors of `made` (a module, or "" for a tensor) computed from the sources; None: not followed."""
        if not self.followed:
            return None
        if isinstance(made, torch.Tensor):
            return frozenset({""}) if _storage(made) in self.marked else frozenset()
        if not isinstance(made, nn.Module):
            return None  # a function: its tensors are slots of their own, each asked for as a tensor
        tensors = [*made.named_parameters(remove_duplicate=False), *made.named_buffers(remove_duplicate=False)]
        return frozenset(name for name, t in tensors if _storage(t) in self.marked)
