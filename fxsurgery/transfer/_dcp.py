"""torch.distributed.checkpoint (DCP) directories as `weights=`, read one tensor at a time.

The directory's `.metadata` is read by DCP's own `FileSystemReader`; each
tensor is loaded by `dcp.load` into a tensor of its declared shape and dtype
(no process group: `no_dist=True`), so only that tensor's chunks are read.
"""

from __future__ import annotations

import os
import warnings
from typing import Iterator

import torch
from torch import nn

from .._util import first_line
from ..errors import ModelError
from ._checkpoint import Checkpoint, strip_prefixes


def is_dcp(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


class DcpCheckpoint(Checkpoint):
    """A Checkpoint over a DCP directory (names, shapes and dtypes from its metadata)."""

    def __init__(self, path: str | os.PathLike):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        self.path = os.fspath(path)
        self.files, self.state = {}, None
        try:
            metadata = FileSystemReader(self.path).read_metadata()
        except Exception as exc:  # DCP reports a damaged directory in many ways
            raise ModelError(f"{self.path}: cannot read the torch.distributed.checkpoint metadata: {type(exc).__name__}: "
                             f"{first_line(exc)}; fix: pass a complete checkpoint directory written by dcp.save") from None
        entries = metadata.state_dict_metadata
        others = sorted(k for k, v in entries.items() if not isinstance(v, TensorStorageMetadata))
        if others:
            raise ModelError(f"{self.path}: holds entries that are not tensors ({', '.join(others[:3])}); "
                             "fix: save the model's state dict alone with dcp.save(model.state_dict(), ...)")
        self.meta = {k: (tuple(v.size), v.properties.dtype) for k, v in entries.items()}
        stripped = strip_prefixes(dict.fromkeys(self.meta), where=self.path)
        self.keys = dict(zip(stripped, self.meta))

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor stored under `key` (its name in the checkpoint)."""
        import torch.distributed.checkpoint as dcp
        shape, dtype = self.meta[key]
        holder = {key: torch.empty(shape, dtype=dtype)}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(holder, storage_reader=dcp.FileSystemReader(self.path), no_dist=True)
        return holder[key]

    def read(self, names) -> Iterator[tuple[str, torch.Tensor]]:
        for name in list(names):
            yield name, self.tensor(self.keys[name])


def open_checkpoint(path) -> Checkpoint:
    """A Checkpoint for a .safetensors file, a sharded index, a weights-only .pt or a DCP directory."""
    if isinstance(path, Checkpoint):
        return path
    return DcpCheckpoint(path) if is_dcp(path) else Checkpoint(path)


def refuse_dtensors(model: nn.Module) -> None:
    """A model whose parameters are DTensors (FSDP2, tensor parallel) cannot be traced rank-locally here."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if type(t).__name__ == "DTensor" or type(getattr(t, "data", None)).__name__ == "DTensor":
            raise ModelError(f"{name} is a DTensor (a sharded model: fully_shard or tensor parallel); fxsurgery works on "
                             "the whole model; fix: build the model inside fxs.empty_weights() without sharding it, save its "
                             "weights with dcp.save(model.state_dict(), DIR) and apply with weights=DIR (--weights DIR) and stream=True")
