"""The Prune rule: remove output channels (or hidden neurons) of a layer, with every coupled layer following.

Which channels go is said explicitly (`channels=[...]`) or by an amount and
an importance score per output channel of the selected layer's weight W:

    l1     s_c = sum |W[c]|
    l2     s_c = sqrt(sum W[c]^2)
    f      s_c = f(module)[c]     (a callable returning one score per output channel)

`amount=a` removes floor(a * C) channels of lowest score (ties: the lower index
goes first), never all of them.

On an attention module (torch.nn.MultiheadAttention, transformers attention
with q/k/v/o projections) the unit is a head: `heads=[...]` names key/value
heads (with grouped-query attention each takes its group of query heads
along), and `amount=` removes that fraction of them, scored over every
weight the head owns (its q, k and v rows and its output projection columns).
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from typing import Any

import torch
from torch import nn

from ..errors import RuleError
from ._rules import Rule, check_selector

IMPORTANCE = ("l1", "l2")


def _indices(value: Any, origin, key: str) -> tuple:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise RuleError(f"{origin}: prune {key} must be a list of indices, got {value!r}; fix: e.g. {key}=[0, 3, 5]")
    items = tuple(value)
    bad = next((i for i in items if isinstance(i, bool) or not isinstance(i, int) or i < 0), None)
    if bad is not None:
        raise RuleError(f"{origin}: prune {key} holds {bad!r}, not an index; fix: use integers from 0, e.g. {key}=[0, 3, 5]")
    if not items:
        raise RuleError(f"{origin}: prune {key} is empty, so nothing would be removed; fix: list at least one index, or drop the rule")
    dup = next((i for i in items if items.count(i) > 1), None)
    if dup is not None:
        raise RuleError(f"{origin}: prune {key} names {dup} twice; fix: list each index once")
    return tuple(sorted(items))


@dataclass(frozen=True)
class Prune(Rule):
    """Remove output channels of the selected Conv/Linear layers and slice every layer coupled to them.

    The next layer's input channels, normalisation parameters, both sides of a
    residual add, the slices of a concat or split, the Linear after a flatten,
    depthwise convolutions and channel-wise parameters (layer scale) follow.
    The result equals the original with those channels zeroed at their source.

    >>> Prune("layer1.0.conv1", channels=[0, 5])     # conv1 loses 2 filters, bn1 and conv2 follow
    >>> Prune({type: nn.Conv2d}, amount=0.3, importance="l2", optional=True)
    >>> Prune("mlp.0", neurons=[1, 2])               # hidden units of Linear -> act -> Linear
    >>> Prune("encoder.layers.encoder_layer_0.self_attention", heads=[0, 5])   # attention heads
    """

    target: Any
    _: KW_ONLY
    channels: Any = None
    amount: float | None = None
    importance: Any = "l1"
    neurons: Any = None
    heads: Any = None
    optional: bool = False
    origin: Any = None

    def __post_init__(self):
        super().__post_init__()
        check_selector(self, "target")
        given = [k for k in ("channels", "amount", "neurons", "heads") if getattr(self, k) is not None]
        if len(given) != 1:
            raise RuleError(f"{self.origin}: prune needs exactly one of channels=, amount=, neurons= or heads=, got "
                            f"{', '.join(given) or 'none'}; fix: e.g. Prune('conv1', channels=[0, 3]) or Prune('conv1', amount=0.5)")
        for key in ("channels", "neurons", "heads"):
            if getattr(self, key) is not None:
                object.__setattr__(self, key, _indices(getattr(self, key), self.origin, key))
        if self.amount is not None:
            a = self.amount
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a < 1:
                raise RuleError(f"{self.origin}: prune amount must be a fraction between 0 and 1 (exclusive), got {a!r}; fix: e.g. amount=0.5")
        imp = self.importance
        if not (imp in IMPORTANCE or (callable(imp) and not isinstance(imp, (str, type)))):
            raise RuleError(f"{self.origin}: prune importance {imp!r} is not known; fix: use 'l1', 'l2' or a function "
                            "module -> one score per output channel")

    def selectors(self):
        return [self.target]

    @property
    def indices(self) -> tuple | None:
        return next((v for v in (self.channels, self.neurons, self.heads) if v is not None), None)

    @property
    def key(self) -> str:
        return next(k for k in ("channels", "neurons", "heads", "amount") if getattr(self, k) is not None)

    def __str__(self):
        if self.indices is not None:
            key = self.key
            return f"prune {self.target} {key}={list(self.indices)}"
        imp = self.importance if isinstance(self.importance, str) else getattr(self.importance, "__name__", "fn")
        return f"prune {self.target} amount={self.amount} ({imp})"

    def choose(self, module: nn.Module, width: int, where: str, unit: str = "output channel", scores=None) -> list[int]:
        """The output channels (or heads: `unit`, with their `scores`) of `module` (which has `width`) this rule removes."""
        if self.indices is not None:
            out = [i for i in self.indices if i >= width]
            if out:
                raise RuleError(f"{self.origin}: {where} has {width} {unit}s, so {unit.split()[-1]} {out[0]} does not exist; "
                                f"fix: use indices 0 to {width - 1}")
            if len(self.indices) >= width:
                raise RuleError(f"{self.origin}: removing all {width} {unit}s of {where} leaves nothing to compute; "
                                f"fix: keep at least one {unit.split()[-1]}")
            return list(self.indices)
        if scores is None:
            scores = scores_of(self.importance, module, width)
        count = min(int(self.amount * width), width - 1)
        order = sorted(range(width), key=lambda c: (float(scores[c]), c))
        return sorted(order[:count])


def scores_of(importance: Any, module: nn.Module, width: int) -> torch.Tensor:
    """One score per output channel (see the module docstring)."""
    if callable(importance):
        scores = torch.as_tensor(importance(module)).detach().flatten()
    else:
        w = module.weight.detach().flatten(1).float()
        scores = w.abs().sum(1) if importance == "l1" else w.pow(2).sum(1).sqrt()
    if scores.numel() != width:
        raise RuleError(f"importance gave {scores.numel()} scores for a layer with {width} output channels; "
                        "fix: return one score per output channel")
    return scores
