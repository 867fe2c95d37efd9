"""Which tensors a pattern's rewrite computed from the matched modules, followed op by op.

A pattern with `weights = "derived"` says its replacement is computed from
what it matched (a folded convolution), but a rewrite may as well build a
fresh layer and leave it at its random init. The report must not call that
"adapted": while `rewrite` runs, every torch call that reads a tensor whose
storage came from the matched modules marks what it returns (and what it
writes in place: `copy_`) as derived; `nn.Parameter(t)`, `.data` and views
share the storage and stay marked. A tensor of the replacement that ends up
unmarked is new. What leaves torch (`.tolist()`, `.item()`, numpy) is not
followed: a tensor made again from those values counts as new.
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


# calls that read their first argument's shape, dtype and device only (a fresh tensor like it)
_LIKE = frozenset({torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
                   torch.randint_like, *(getattr(torch.Tensor, n) for n in ("new_zeros", "new_ones", "new_empty", "new_full"))})
# in-place calls (by name: Tensor methods and nn.init alike) that overwrite their first argument whole
_OVERWRITES = frozenset({"zero_", "zeros_", "ones_", "fill_", "constant_", "uniform_", "normal_", "trunc_normal_", "eye_",
                         "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_",
                         "sparse_", "random_", "bernoulli_", "exponential_", "geometric_", "log_normal_", "cauchy_", "copy_"})


_FLAGS = frozenset({"share_memory_"})  # in-place by name, yet it changes nothing a model computes (requires_grad_ does)
_IN_PLACE_OPERATORS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
                                 "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__"})


class WroteSource(Exception):
    """A rewrite wrote into a tensor of the matched modules (`linear.weight.mul_(2)`), which the original model holds."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


class Derivation(TorchFunctionMode):
    """The storages computed from `sources` while the mode is on."""

    def __init__(self, sources: list[nn.Module]):
        super().__init__()
        tensors = [t for m in sources for t in [*m.parameters(), *m.buffers()]]
        self.marked = {p for t in tensors if (p := _storage(t))}
        self.given = {id(t) for t in tensors}  # held as they are by what the rewrite makes: transferred, not computed
        self.sources = {p: f"{type(m).__name__}.{n}" for m in sources for n, t in [*m.named_parameters(), *m.named_buffers()]
                        if (p := _storage(t))}
        self.followed = not any(t.is_meta for t in tensors)  # a match without values (meta) cannot be followed
        self.alive: list = []  # a freed storage's address could come back as a fresh layer's: kept until the rewrite ends

    def _mark(self, t: torch.Tensor) -> None:
        p = _storage(t)
        if p and p not in self.marked:
            self.marked.add(p)
            self.alive.append(t.untyped_storage())

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rest = dict(kwargs)
        # nn.init passes its tensor by keyword (`tensor=`) when it hands itself to a mode
        first = args[0] if args and isinstance(args[0], torch.Tensor) else rest.pop("tensor", None) if not args else None
        name = getattr(func, "__name__", "")
        in_place = name.endswith("_") and not name.endswith("__") and name not in _FLAGS  # mul_, copy_, nn.init's
        writes = first is not None and (in_place or name in _IN_PLACE_OPERATORS)
        if writes and _storage(first) in self.sources:  # before it runs: the matched modules' tensors are the original's
            raise WroteSource(self.sources[_storage(first)])
        out = func(*args, **kwargs)
        read = any(_storage(t) in self.marked for t in pytree.tree_leaves((args[1:], rest)) if isinstance(t, torch.Tensor))
        if writes:  # it writes its first argument
            if read:
                self._mark(first)  # copy_ of the match, `w[:] = x`, mul_ by a derived scale
            elif name in _OVERWRITES:
                self.marked.discard(_storage(first))  # re-initialised: nothing of the match is left in it
            return out
        if func not in _LIKE and first is not None and _storage(first) in self.marked:
            read = True
        if read:
            given = {_storage(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
            for t in pytree.tree_leaves(out):
                # an argument returned as it is or viewed (`fresh.type_as(w)`, `fresh.to(w)`) keeps its own story
                if isinstance(t, torch.Tensor) and _storage(t) not in given:
                    self._mark(t)
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
        return frozenset(name for name, t in tensors if _storage(t) in self.marked and id(t) not in self.given)
