"""The transfer stage for two arbitrary modules: `fxs.transfer(src, dst)`, matching by name and shape."""

from __future__ import annotations

import torch
from torch import nn

from .._util import shape_text
from ..errors import TransferError
from ._report import TransferReport, check_strict, entry, tensors_of


def narrows(source: torch.dtype, target: torch.dtype) -> bool:
    """A cast that loses information: float to integer, or to fewer bits of the same kind."""
    if source == target:
        return False
    if source.is_floating_point and not target.is_floating_point:
        return True
    if source.is_floating_point == target.is_floating_point:
        return torch.finfo(target).bits < torch.finfo(source).bits if target.is_floating_point else \
            torch.iinfo(target).bits < torch.iinfo(source).bits if target != torch.bool else True
    return False


def _ties(module: nn.Module) -> dict[str, list[str]]:
    """name -> every name of the same tensor, for tensors reachable at several paths."""
    names: dict[int, list[str]] = {}
    for name, t, _ in tensors_of(module):
        names.setdefault(id(t), []).append(name)
    return {n: group for group in names.values() if len(group) > 1 for n in group}


def transfer_modules(src: nn.Module, dst: nn.Module, *, strict: bool = False, allow_cast: bool = False) -> TransferReport:
    """Copy every tensor of `src` into `dst` where names and shapes agree; report all.

    This is "filter the state dict by the new model's keys", done right: each
    tensor of `dst` is transferred (or adapted by a dtype cast) or new, each
    unused tensor of `src` is dropped, and nothing is silently left behind.
    A cast that narrows (float32 -> bfloat16, float -> int) is an error unless
    `allow_cast`; one tensor of `src` at several paths (a tie) must be one
    tensor in `dst` too.
    """
    source = {n: t for n, t, _ in tensors_of(src)}
    src_ties, dst_ties = _ties(src), _ties(dst)
    for name, group in src_ties.items():
        present = [n for n in group if n in dict((m, 1) for m, _, _ in tensors_of(dst))]
        if len(present) > 1 and sorted(dst_ties.get(name, [name])) != sorted(present):
            raise TransferError(f"transfer: {', '.join(present)} are one tensor in the source but separate in the "
                                f"destination, so the tie would split; fix: tie them in the destination first "
                                f"(dst.{present[1]} = dst.{present[0]}), or copy them one by one")
    report = TransferReport()
    used = set()
    with torch.no_grad():
        for name, t, kind in tensors_of(dst):
            s = source.get(name)
            frozen = kind == "parameter" and not t.requires_grad
            if s is None or s.shape != t.shape:
                op = f"source has {shape_text(s.shape)}" if s is not None else ""
                report.entries.append(entry(name, t, kind, "new", op=op, frozen=frozen))
                continue
            if narrows(s.dtype, t.dtype) and not allow_cast:
                cast = f"{s.dtype} -> {t.dtype}".replace("torch.", "")
                raise TransferError(f"transfer: {name} would be cast {cast}, which loses precision; fix: cast the "
                                    "destination to the source's dtype first, or pass allow_cast=True")
            t.copy_(s)
            used.add(name)
            if s.dtype != t.dtype:
                report.entries.append(entry(name, t, kind, "adapted", source=name, op=f"cast {s.dtype} -> {t.dtype}".replace("torch.", ""), frozen=frozen))
            else:
                report.entries.append(entry(name, t, kind, "transferred", source=name, frozen=frozen))
    for name, t, kind in tensors_of(src):
        if name not in used:
            report.entries.append(entry(name, t, kind, "dropped"))
    check_strict(report, strict)
    return report
