"""Weight policies: how a replaced module's tensors fill its replacement.

Each function fills `dst` in place from `src` (the same name in the old
module) and returns the operation for the report, or raises ValueError with
what does not fit.

    keep                   dst = src                                (shapes equal)
    slice                  dst = src[:n0, :n1, ...]                 (dst no larger)
    select [i, j, ...]     dst = src[[i, j, ...], :n1, ...]         (rows picked, e.g. classes)
    pad                    dst[:s0, :s1, ...] = src                 (dst no smaller; the rest as initialised)
    adapt_input_channels   W' = sum_c W[:, c]               (3 -> 1)
                           W' = repeat(W)[:, :N] * 3 / N    (3 -> N), other tensors kept
    Kept (prune)           dst = src[kept_0][:, kept_1]...          (the indices each sliced axis keeps)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._util import shape_text


def _block(shape) -> tuple:
    return tuple(slice(0, n) for n in shape)


def keep(src: torch.Tensor, dst: torch.Tensor) -> str:
    if src.shape != dst.shape:
        raise ValueError(f"the replaced module has {shape_text(src.shape)} there")
    dst.copy_(src)
    return ""


def slice_(src: torch.Tensor, dst: torch.Tensor) -> str:
    if src.dim() != dst.dim() or any(d > s for d, s in zip(dst.shape, src.shape)):
        raise ValueError(f"the replaced module's {shape_text(src.shape)} is smaller; use weights: pad")
    dst.copy_(src[_block(dst.shape)])
    return "" if src.shape == dst.shape else f"slice {shape_text(src.shape)} -> {shape_text(dst.shape)}"


def select(rows: tuple, src: torch.Tensor, dst: torch.Tensor) -> str:
    if src.dim() == 0:
        return keep(src, dst)
    # the second argument is the fix (transfer/__init__.py): the sizes, not another policy, are what is wrong
    if dst.shape[0] != len(rows):
        raise ValueError(f"{len(rows)} rows selected for a tensor with {dst.shape[0]}",
                         f"select {dst.shape[0]} rows, or build the new layer with {len(rows)} (out_features, num_embeddings...)")
    if max(rows) >= src.shape[0]:
        raise ValueError(f"row {max(rows)} selected from a tensor with {src.shape[0]}", f"select rows below {src.shape[0]}")
    slice_(src.index_select(0, torch.tensor(rows, device=src.device)), dst)
    return f"select rows {list(rows)} of {shape_text(src.shape)}"


def pad(src: torch.Tensor, dst: torch.Tensor) -> str:
    if src.dim() != dst.dim() or any(d < s for d, s in zip(dst.shape, src.shape)):
        raise ValueError(f"the replaced module's {shape_text(src.shape)} is larger; use weights: slice")
    dst[_block(src.shape)] = src
    return "" if src.shape == dst.shape else f"pad {shape_text(src.shape)} -> {shape_text(dst.shape)}"


def adapt_input_channels(src: torch.Tensor, dst: torch.Tensor) -> str:
    if src.shape == dst.shape:
        return keep(src, dst)
    same_but_inputs = src.dim() == dst.dim() >= 2 and src.shape[0] == dst.shape[0] and src.shape[2:] == dst.shape[2:]
    if not same_but_inputs:
        raise ValueError(f"{shape_text(src.shape)} -> {shape_text(dst.shape)} changes more than the input channels")
    old, new = src.shape[1], dst.shape[1]
    if new == 1:
        dst.copy_(src.sum(dim=1, keepdim=True))
        return f"adapt input channels {old} -> 1 (sum)"
    repeated = src.repeat(1, math.ceil(new / old), *([1] * (src.dim() - 2)))[:, :new]
    dst.copy_(repeated * (old / new))
    return f"adapt input channels {old} -> {new} (repeat, scale {old}/{new})"


def ranges(indices) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8': kept indices in a report stay readable."""
    parts, run = [], []
    for i in indices:
        if run and i != run[-1] + 1:
            parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(i)
    if run:
        parts.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(parts)


@dataclass(frozen=True)
class Kept:
    """A pruned module's tensors: for each tensor name, the indices kept along each sliced axis."""

    axes: dict  # tensor name -> {axis: tuple of kept indices}

    def fill(self, name: str, src: torch.Tensor, dst: torch.Tensor) -> str:
        axes = self.axes.get(name, {})
        out = src
        for axis, kept in sorted(axes.items()):
            out = out.index_select(axis, torch.tensor(kept, dtype=torch.long, device=src.device))
        if out.shape != dst.shape:
            raise ValueError(f"keeping {', '.join(f'{len(k)} on dim {a}' for a, k in sorted(axes.items()))} of "
                             f"{shape_text(src.shape)} does not give {shape_text(dst.shape)}")
        dst.copy_(out)
        return "; ".join(f"dim {a} keeps {len(k)} of {src.shape[a]}: [{ranges(k)}]" for a, k in sorted(axes.items())
                         if len(k) != src.shape[a])


def carry(policy, src: torch.Tensor, dst: torch.Tensor, name: str = "") -> str:
    """Fill `dst` (the tensor `name` of the new module) from `src` by `policy`; the operation ('' when it is a plain copy)."""
    if isinstance(policy, Kept):
        return policy.fill(name, src, dst)
    if isinstance(policy, dict):
        return select(policy["select"], src, dst)
    return {"keep": keep, "slice": slice_, "pad": pad, "adapt_input_channels": adapt_input_channels}[policy](src, dst)
