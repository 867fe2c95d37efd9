"""Streaming transfer: the plan is made on meta, values are read when they are written.

With `stream=True` the new module keeps every tensor that comes from the
checkpoint on the meta device; each is registered here with a reader that
fetches it (one tensor, straight from its source shard) when the export stage
writes the output shard holding it. A replaced module's tensors carried over
by a weights policy are filled at once, reading only what the policy uses:
`select` reads the selected rows, `slice` the leading block, a pruned tensor
its kept rows and `adapt_input_channels` to fewer (but more than one) input
channels the first ones, through safetensors slices or a DCP planner (`pad`,
`keep` and the sum to one channel need the whole source); the operation and
its checks are those of the in-memory path (the policy runs first on meta tensors).
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from ..errors import TransferError
from ..spec import Kept, carry, replay
from ._checkpoint import Checkpoint, read_block

_PENDING: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> {id(tensor): reader}


def pending_of(module: nn.Module) -> dict:
    """{id(tensor): reader} of a streamed result's meta tensors (empty: everything is in memory)."""
    return _PENDING.get(module, {})


def register(module: nn.Module, pending: dict) -> None:
    if pending:
        _PENDING[module] = pending


def blank(t: torch.Tensor) -> torch.Tensor:
    """Room for a tensor: a meta tensor stays on meta (read later), a real one gets real memory."""
    if t.is_meta:
        return torch.empty(t.shape, dtype=t.dtype, device="meta")
    return torch.empty_like(t, memory_format=torch.preserve_format)


class Read:
    """Reads one tensor of the checkpoint (a picklable value, not a closure: a rank may receive it)."""

    def __init__(self, checkpoint: Checkpoint, name: str):
        self.checkpoint, self.name = checkpoint, name

    def __call__(self) -> torch.Tensor:
        return read_block(self.checkpoint, self.name, None)

    def __repr__(self) -> str:
        return f"Read({self.checkpoint.path!r}, {self.name!r})"


class Missing:
    """A tensor of a plan made without weights: writing it is refused."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self) -> torch.Tensor:
        raise TransferError(f"{self.name} has no values (the model was built without weights) and no checkpoint was given; "
                            "fix: apply with weights= a checkpoint of the model (--weights)")


class Replayed:
    """Computes one tensor a pattern derived (a folded convolution's weight) from the checkpoint, by the recipe
    map-weights replays: the same function as the rewrite, so the same bits."""

    def __init__(self, checkpoint: Checkpoint, recipe: dict, shape: tuple, dtype: torch.dtype):
        self.checkpoint, self.recipe, self.shape, self.dtype = checkpoint, recipe, tuple(shape), dtype

    def __call__(self) -> torch.Tensor:
        value = torch.empty(self.shape, dtype=self.dtype)
        replay(self.recipe, lambda name: read_block(self.checkpoint, name, None), value)
        return value

    def __repr__(self) -> str:
        return f"Replayed({self.checkpoint.path!r}, {sorted(self.recipe['reads'].values())!r})"


def _runs(rows) -> list[tuple[int, int]]:
    """Rows as runs of consecutive rows [a, b), in the order given."""
    runs: list[list[int]] = []
    for r in rows:
        if runs and runs[-1][1] == r:
            runs[-1][1] = r + 1
        else:
            runs.append([r, r + 1])
    return [(a, b) for a, b in runs]


def carry_streamed(policy, checkpoint: Checkpoint, name: str, src: torch.Tensor, dst: torch.Tensor, *, name_in_new: str = "") -> str:
    """`carry(policy, src, dst)` with `src` (meta) read from the checkpoint, only as much as the policy uses."""
    op = carry(policy, src, torch.empty(dst.shape, dtype=dst.dtype, device="meta"), name=name_in_new)  # the checks and the words
    rows = policy["select"] if isinstance(policy, dict) else None
    tail = tuple(slice(0, n) for n in dst.shape[1:])
    if rows is not None and src.dim() > 0:
        parts = [read_block(checkpoint, name, (slice(a, b), *tail)) for a, b in _runs(rows)]
        dst.copy_(torch.cat(parts) if len(parts) > 1 else parts[0])
    elif policy == "slice" and src.dim() > 0:
        dst.copy_(read_block(checkpoint, name, tuple(slice(0, n) for n in dst.shape)))
    elif policy == "adapt_input_channels" and src.shape != dst.shape and 1 < dst.shape[1] < src.shape[1]:
        # fewer input channels, but more than one: the first ones, scaled (the repeat is once; the sum needs all)
        first = read_block(checkpoint, name, (slice(0, src.shape[0]), slice(0, dst.shape[1])))
        dst.copy_(first * (src.shape[1] / dst.shape[1]))
    elif isinstance(policy, Kept) and 0 in policy.axes.get(name_in_new, {}) and src.dim() > 0:
        axes = policy.axes[name_in_new]  # pruned rows: the kept ones alone, then the other axes as in memory
        parts = [read_block(checkpoint, name, (slice(a, b),)) for a, b in _runs(axes[0])]
        rows = torch.cat(parts) if len(parts) > 1 else parts[0]
        Kept({name_in_new: {a: k for a, k in axes.items() if a != 0}}).fill(name_in_new, rows, dst)
    else:  # keep, pad and a sum over input channels use the whole source
        carry(policy, read_block(checkpoint, name, None), dst, name=name_in_new)
    return op
