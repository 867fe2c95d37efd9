"""Copies that cost nothing until written: the result's tensors share the original's memory, copy-on-write.

Transfer gives the new module its own copy of every original tensor that
reaches it. Copying the bytes was most of a surgery's time on models with
large weights, and doubled their memory. torch's lazy clone makes a tensor
with a storage of its own over the same memory; the first write to either
side copies that side first (an in-place op, an optimizer step, a BatchNorm
update in train mode, and anything asking for a writable pointer: `.numpy()`,
`data_ptr()`). So a frozen backbone never costs a second copy, a trained
tensor costs the copy it always did at its first write, and neither side can
ever see the other's writes.

Only plain dense CPU tensors that span their whole, resizable storage are copied lazily:
a tensor over part of a larger storage would keep all of it alive, and copy
all of it at its first write. Everything else (meta, other devices, views,
inference tensors, subclasses) is copied at transfer, as is everything on a
torch without lazy clones.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

_LAZY_CLONE = getattr(torch, "_lazy_clone", None)


def lazily_copyable(t: torch.Tensor) -> bool:
    return (_LAZY_CLONE is not None and type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu"
            and t.layout == torch.strided and not (t.is_quantized or t.is_nested or t.is_conj() or t.is_neg())
            and not t.is_inference()  # its lazy copy would be an inference tensor too, which never trains
            # memory with no allocator to copy it with (torch.load's storages; never resizable) crashes the
            # process at its first write: torch copies a lazy copy with its storage's allocator
            and t.untyped_storage().resizable()
            and t.numel() > 0 and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size())


def lazy_blank(fallback: Callable, lazily: set[int]) -> Callable:
    """A `blank` for assemble that gives each tensor it can a lazy copy (its values already in place),
    noting its original's id in `lazily`; `fallback` makes room for the others' values."""
    def blank(t: torch.Tensor) -> torch.Tensor:
        if lazily_copyable(t):
            try:
                made = _LAZY_CLONE(t.detach())
            except RuntimeError:  # memory torch cannot share copy-on-write (a file mapped by torch.load(mmap=True))
                return fallback(t)
            lazily.add(id(t))
            return made
        return fallback(t)
    return blank
