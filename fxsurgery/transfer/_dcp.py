"""torch.distributed.checkpoint (DCP) directories as `weights=`, read one tensor at a time.

The directory's `.metadata` is a pickle, which DCP's `FileSystemReader` loads
with `pickle.load` (a hostile file runs code); here it is unpickled by an
allowlist of DCP's own metadata classes, torch.Size and dtypes (`_Reader`),
and every file it names must be a plain name inside the directory. Each
tensor is loaded by `dcp.load` into a tensor of its declared shape and dtype
(no process group: `no_dist=True`), so only that tensor's chunks are read;
a block of rows or a leading slice is loaded alone through a planner (`region`).
"""

from __future__ import annotations

import math
import os
import pickle
import warnings

import torch
from torch import nn

from .._util import first_line
from ..errors import ModelError
from ._checkpoint import Checkpoint, plain_name, shown, stamp, strip_prefixes


def is_dcp(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


_METADATA = "torch.distributed.checkpoint.metadata"
_ALLOWED = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"),
            ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"),
            ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"), ("collections", "OrderedDict")}


class _Unpickler(pickle._Unpickler):
    """Builds DCP metadata and nothing else: any other global in the file is refused before it is looked up.

    The Python unpickler, not the C one, because BUILD (which sets attributes)
    must be refused on anything but an object this file made with NEWOBJ (how
    dataclasses pickle): on a class, a function, a dtype or an enum member it
    would change them for the whole process.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file):
        super().__init__(file)
        self.made: dict[int, object] = {}  # what NEWOBJ built here, by id (held, so no id is reused)

    def _new(self, load) -> None:
        load(self)
        made = self.stack[-1]
        if type(made).__new__ is object.__new__:  # a fresh object; an enum's __new__ returns its shared member
            self.made[id(made)] = made

    dispatch[pickle.NEWOBJ[0]] = lambda self: self._new(pickle._Unpickler.load_newobj)
    dispatch[pickle.NEWOBJ_EX[0]] = lambda self: self._new(pickle._Unpickler.load_newobj_ex)

    def find_class(self, module: str, name: str):
        if "." not in name:  # a dotted name would reach through a module's own imports (the metadata module imports os)
            if (module, name) in _ALLOWED:
                return super().find_class(module, name)
            found = getattr(__import__(_METADATA, fromlist=["_"]), name, None) if module == _METADATA else None
            if isinstance(found, type) and found.__module__ == _METADATA:  # its own dataclasses and enum
                return found
            if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def load_build(self):
        target = self.stack[-2]  # below the state
        if id(target) not in self.made:  # a class, a dtype, a function, an enum member: shared by the whole process
            raise pickle.UnpicklingError(f"refused setting attributes of {_named(target)}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


def _named(target) -> str:
    if isinstance(target, type):
        return f"the class {target.__module__}.{target.__qualname__}"
    return f"a {type(target).__module__}.{type(target).__qualname__}"


def _reader(path: str, read=None):
    """DCP's FileSystemReader, reading `.metadata` through the allowlist and checking the files it names;
    with `read`, the metadata already read so (the checkpoint's stamps say its files are unchanged)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class _Reader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            if read is not None:  # dcp.load asks once per tensor: unpickled once, not once per tensor
                read.storage_meta.load_id = self.load_id
                return read
            with open(os.path.join(path, ".metadata"), "rb") as handle:
                metadata = _Unpickler(handle).load()
            if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict) \
                    or not isinstance(metadata.storage_data, dict):
                raise ValueError(f"holds a {type(metadata).__name__}, not DCP metadata")
            for info in metadata.storage_data.values():
                file = getattr(info, "relative_path", None)
                if not isinstance(file, str) or not plain_name(file):
                    raise ValueError(f"names the data file {file!r}, which is not a file in the directory")
                if not os.path.isfile(os.path.join(path, file)):
                    raise ValueError(f"names the data file {file}, which is missing")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return _Reader(path)


def _tiled(shape: tuple, chunks) -> bool:
    """Whether `chunks` (offsets, sizes) cover a tensor of `shape` exactly: inside it, disjoint, adding up to it."""
    if not isinstance(chunks, list):
        return False
    boxes = []
    for chunk in chunks:
        offsets, sizes = tuple(getattr(chunk, "offsets", ())), tuple(getattr(chunk, "sizes", ()))
        if len(offsets) != len(shape) or len(sizes) != len(shape) or any(
                not isinstance(o, int) or not isinstance(n, int) or o < 0 or n < 0 or o + n > d for o, n, d in zip(offsets, sizes, shape)):
            return False
        if all(sizes):  # an empty chunk covers nothing
            boxes.append((offsets, sizes))
    if sum(math.prod(sizes) for _, sizes in boxes) != math.prod(shape):
        return False
    # disjoint: swept along the dim split into the most pieces, each chunk is compared only with those that
    # start before it ends there (a grid of N ranks' chunks costs about N comparisons, not N squared)
    axis = max(range(len(shape)), key=lambda d: len({o[d] for o, _ in boxes}), default=0)
    boxes.sort(key=lambda box: box[0][axis] if shape else 0)
    for i, (a, m) in enumerate(boxes):
        for b, n in boxes[i + 1:]:
            if shape and b[axis] >= a[axis] + m[axis]:
                break
            if all(x < y + k and y < x + j for x, j, y, k in zip(a, m, b, n)):
                return False  # two chunks overlap
    return True


class DcpCheckpoint(Checkpoint):
    """A Checkpoint over a DCP directory (names, shapes and dtypes from its metadata)."""

    def __init__(self, path: str | os.PathLike):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata
        self.path = os.fspath(path)
        self.files, self.state = {}, None
        try:
            metadata = self.metadata = _reader(self.path).read_metadata()
        except Exception as exc:  # DCP reports a damaged directory in many ways
            raise ModelError(f"{self.path}: cannot read the torch.distributed.checkpoint metadata: {type(exc).__name__}: "
                             f"{first_line(exc)}; fix: pass a complete checkpoint directory written by dcp.save") from None
        files = {os.path.join(self.path, ".metadata")} | {os.path.join(self.path, i.relative_path) for i in metadata.storage_data.values()}
        self.stamps = {f: stamp(f) for f in sorted(files) if os.path.isfile(f)}
        entries = metadata.state_dict_metadata
        others = sorted(k for k, v in entries.items() if not isinstance(v, TensorStorageMetadata))
        if others:
            raise ModelError(f"{self.path}: holds entries that are not tensors ({', '.join(map(shown, others[:3]))}); "
                             "fix: save the model's state dict alone with dcp.save(model.state_dict(), ...)")
        bad = [k for k, v in entries.items() if not isinstance(k, str) or not isinstance(v.size, torch.Size)
               or not isinstance(getattr(v.properties, "dtype", None), torch.dtype)]
        if bad:
            raise ModelError(f"{self.path}: the metadata describes {bad[0]!r} without a shape and dtype; "
                             "fix: pass a complete checkpoint directory written by dcp.save")
        gaps = [k for k, v in entries.items() if not _tiled(tuple(v.size), v.chunks)]
        if gaps:  # a block no chunk covers would be written as whatever memory held
            raise ModelError(f"{self.path}: the saved chunks of {shown(gaps[0])} do not cover it exactly once; "
                             "fix: pass a complete checkpoint directory written by dcp.save")
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
            dcp.load(holder, storage_reader=_reader(self.path, self.metadata), no_dist=True)
        return holder[key]

    def region(self, key: str, index: tuple) -> torch.Tensor:
        """Only `index` (a tuple of slices, step 1, leading dims) of the tensor under `key`.

        A planner asks DCP for that block alone, so only the saved chunks that
        overlap it are read (a checkpoint written by N ranks holds N chunks of a
        tensor); each chunk read is deserialised whole, as DCP stores it.
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
        shape, dtype = self.meta[key]
        bounds = [s.indices(n)[:2] for s, n in zip(index, shape)] + [(0, n) for n in shape[len(index):]]
        block = ChunkStorageMetadata(offsets=torch.Size(a for a, _ in bounds), sizes=torch.Size(b - a for a, b in bounds))

        holder = {key: torch.empty(tuple(block.sizes), dtype=dtype)}

        class Block(dcp.DefaultLoadPlanner):
            def create_local_plan(self):
                return LoadPlan(create_read_items_for_chunk_list(key, self.metadata.state_dict_metadata[key], [block]))

            def lookup_tensor(self, index):  # the block's own tensor (offsets in the reads are relative to it)
                return holder[key]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(holder, storage_reader=_reader(self.path, self.metadata), planner=Block(), no_dist=True)
        return holder[key]

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
