"""Ties through a weights policy: a replaced module's tensor that the original shares
with another path (GPT's head.weight is wte.weight) stays shared, or the report says why not.

    keep       the replacement takes the new module's copy of the shared tensor itself:
               head.weight is wte.weight again (refused when dtype or device differ)
    otherwise  the values are derived (slice, pad, select...), so the tie ends: the
               report's op says "untied from wte.weight"
"""

from __future__ import annotations

import torch
from torch import nn

from .._util import shape_text
from ..errors import TransferError


class Ties:
    """Where each shared tensor of the original lives in the new module."""

    def __init__(self, paths: dict[int, list[str]], module: nn.Module, copies: dict):
        """`paths`: id(tensor of the original) -> every name it has there."""
        self.paths = paths
        self.now = dict([*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])
        present = {id(t) for t in self.now.values()}
        self.home: dict[int, torch.Tensor] = {id(original): blank for blank, original in copies.values()
                                              if id(blank) in present}

    def partners(self, src: torch.Tensor, path: str) -> list[str]:
        """The original's other paths to `src`, outside the replaced module at `path`."""
        return [n for n in self.paths.get(id(src), []) if not n.startswith(path + ".")]

    def keep(self, label: str, path: str, new: nn.Module, name: str, t: torch.Tensor, src: torch.Tensor,
             policy) -> tuple[bool, str]:
        """(True, '') when `new`'s tensor `name` now is the shared tensor; else (False, a note for the op)."""
        # a partner that holds the replacement's tensor in the new module is still tied (a convention followed the edit)
        partners = [p for p in self.partners(src, path) if self.now.get(p) is not t]
        home = self.home.get(id(src))
        if not partners or home is None:
            return False, ""
        if policy != "keep":
            return False, f"untied from {partners[0]}"
        if (home.shape, home.dtype, home.device, isinstance(home, nn.Parameter)) != \
                (t.shape, t.dtype, t.device, isinstance(t, nn.Parameter)):
            raise TransferError(
                f"{label}: weights 'keep' would untie {path}.{name} from {partners[0]} (one tensor in the original): "
                f"the replacement's is {shape_text(t.shape)} {str(t.dtype).replace('torch.', '')} on {t.device}, "
                f"that one {shape_text(home.shape)} {str(home.dtype).replace('torch.', '')} on {home.device}; "
                f"fix: build the replacement to match it, or use weights: new for an untied tensor")
        owner_path, _, leaf = name.rpartition(".")
        owner = new.get_submodule(owner_path) if owner_path else new
        (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = home
        return True, ""

    def carried(self, src: torch.Tensor, t: torch.Tensor) -> None:
        """A tensor kept from `src` is its home when the new module had none (both sides replaced)."""
        self.home.setdefault(id(src), t)
