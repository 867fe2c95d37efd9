"""Weights as one model.safetensors, or as shards with an index when they outgrow `max_shard_size`.

The sharded layout is the one transformers writes and reads:
`model-00001-of-00003.safetensors`, ... and `model.safetensors.index.json`
({"metadata": {"total_size": bytes}, "weight_map": {name: file}}). Tensors go
into shards in the order given, a new shard starting where the next tensor
would overflow the current one (a tensor larger than the limit has a shard of
its own). A tensor may be given as a function that reads it: it is read when
its shard is written, and the shard is closed before the next one is read,
so a streamed save holds one shard at a time.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .._progress import bar
from .._util import read_json
from ..errors import SaveError
from ._atomic import meet
from ._filehash import sha256
from ._ranks import active
from ._writer import fsync_file, supported, write_file

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX = "5GB"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def parse_size(value: int | str, what: str = "max_shard_size") -> int:
    """Bytes of a size given as an int or as "5GB", "500MB", "2GiB" (GB = 10**9, GiB = 2**30, as transformers)."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value).upper()) if isinstance(value, str) else None
    size = 0 if match is None else int(float(match[1]) * _UNITS[match[2] if match[2].endswith("B") or not match[2] else match[2] + "B"])
    if size < 1:  # "0.5" is no whole byte
        raise SaveError(f"{what} {value!r}: not a size; fix: give bytes as an int, or e.g. '5GB', '500MB', '2GiB'")
    return size


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def plan(sizes: list[tuple[str, int]], limit: int) -> list[list[str]]:
    """Names per shard: in order, a new shard where the next tensor would not fit."""
    shards: list[list[str]] = [[]]
    filled = 0
    for name, size in sizes:
        if shards[-1] and filled + size > limit:
            shards.append([])
            filled = 0
        shards[-1].append(name)
        filled += size
    return shards


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


Value = torch.Tensor | Callable[[], torch.Tensor]


def _real(value: Value) -> torch.Tensor:
    return (value() if callable(value) else value).contiguous()


def write(work: Path, tensors: dict[str, Value], shapes: dict[str, torch.Tensor], limit: int, into=None) -> dict[str, str]:
    """Write `tensors` into `work` as model.safetensors, or as shards + index above `limit` bytes.

    `shapes` gives each tensor's shape and dtype before it is read (a meta
    tensor will do). Returns {shard file: sha256} (empty for one file, whose
    bytes go into the hash object `into` as they are written, where given).
    Of several ranks writing one output (_ranks.py), this one writes the
    shards k with k % N == rank; rank 0 also the index, and it takes the
    other ranks' shards in once they are all written.
    """
    ranks = active()
    rank, size = (ranks.rank, ranks.size) if ranks is not None else (0, 1)
    sizes = [(name, nbytes(shapes[name])) for name in tensors]
    total = sum(size for _, size in sizes)
    metadata = {"format": "pt"}  # one key only: safetensors writes metadata in hash order
    if total <= limit:
        if rank == 0:
            _save({k: _real(v) for k, v in tensors.items()}, work / SINGLE, metadata, into)
        if ranks is not None:
            meet(ranks, work, {})
        return {}
    groups = plan(sizes, limit)
    n = len(groups)
    hashes = {}
    mine = [(k, g) for k, g in enumerate(groups, start=1) if (k - 1) % size == rank]
    with ThreadPoolExecutor(1, thread_name_prefix="fxsurgery-fsync") as flusher:  # a shard goes to disk while the next is written
        flushed = []
        for k, group in bar(mine, "write shards", total=len(mine), unit="shard"):
            file = shard_name(k, n)
            hashes[file] = _save({name: _real(tensors[name]) for name in group}, work / file, metadata)
            flushed.append(flusher.submit(fsync_file, work / file))
        for future in flushed:
            future.result()  # a disk error surfaces here
    if rank == 0:
        weight_map = {name: shard_name(k, n) for k, group in enumerate(groups, start=1) for name in group}
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (work / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    if ranks is not None:
        hashes.update(meet(ranks, work, hashes))
    return dict(sorted(hashes.items()))


def _save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict, into=None) -> str | None:
    """Write one safetensors file; its sha256, computed while writing (_writer.py) where the dtypes
    allow. With `into`, the bytes go into that hash object instead, and nothing is returned."""
    if supported(tensors):
        return write_file(path, tensors, metadata, into)
    save_file(tensors, str(path), metadata=metadata)
    if into is None:
        return sha256(path)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            into.update(block)
    return None


def shard_files(directory: Path) -> list[str] | None:
    """The shard files a saved directory's index names, in order (None: one model.safetensors)."""
    weight_map = _weight_map(directory)
    return None if weight_map is None else _files(directory, weight_map)


def _weight_map(directory: Path) -> dict | None:
    if not (directory / INDEX).is_file():
        return None
    if (directory / SINGLE).is_file():  # fxs.load would read one and model.py's Model.load the other
        raise SaveError(f"{directory}: holds both {SINGLE} and {INDEX}, which save() never writes together; "
                        "fix: write the directory again with save()")
    try:
        weight_map = read_json(directory / INDEX)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SaveError(f"{directory / INDEX}: not a shard index ({type(exc).__name__}); fix: write the directory again with save()") from None
    return weight_map


def _files(directory: Path, weight_map: dict) -> list[str]:
    try:
        files = sorted(set(weight_map.values()))
    except TypeError as exc:
        raise SaveError(f"{directory / INDEX}: not a shard index ({type(exc).__name__}); fix: write the directory again with save()") from None
    if not all(isinstance(f, str) and _SHARD.fullmatch(f) for f in files):
        raise SaveError(f"{directory / INDEX}: names a file that is not a model-0000k-of-0000n.safetensors shard; "
                        "fix: write the directory again with save()")
    for file in files:  # a link to /dev/zero or a FIFO would keep the hash reading forever
        if not (directory / file).is_file():
            raise SaveError(f"{directory / file}: missing or not a regular file; fix: write the directory again with save()")
    return files


def has_weights(directory: Path) -> bool:
    return (directory / SINGLE).is_file() or (directory / INDEX).is_file()


def read(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved directory, from model.safetensors or from its shards, each from the shard the
    index names for it (a tensor also in another shard was taken from the last one read)."""
    weight_map = _weight_map(directory)
    files = None if weight_map is None else _files(directory, weight_map)
    where = directory / (INDEX if files is not None else SINGLE)
    tensors: dict[str, torch.Tensor] = {}
    try:
        for file in files if files is not None else [SINGLE]:
            held = load_file(str(directory / file))
            stray = next((name for name in held if weight_map is not None and weight_map.get(name) != file), None)
            if stray is not None:
                raise SaveError(f"{directory / file}: holds {stray!r}, which {INDEX} puts in {weight_map.get(stray)!r}; "
                                "fix: write the directory again with save()")
            tensors.update(held)
    except (SafetensorError, OSError) as exc:
        raise SaveError(f"{where}: cannot read weights: {exc}; fix: write the directory again with save()") from None
    return tensors


def weight_files(directory: Path) -> Iterator[str]:
    """The files holding a saved directory's weights: model.safetensors, or the index then its shards."""
    files = shard_files(directory)
    if files is None:
        yield SINGLE
    else:
        yield INDEX
        yield from files


def folded(directory: Path, hashes: dict[str, str] | None = None) -> bytes:
    """What the record's hash covers of a sharded output: the index's bytes and each shard's sha256
    (given, when the writer just computed them; else read)."""
    files = shard_files(directory) or []
    known = hashes or {}
    # shards not just written are hashed side by side (hashlib lets go of the GIL): a load checks
    # a sharded directory at the speed of all cores
    with ThreadPoolExecutor(max(1, min(len(files), os.cpu_count() or 1)), thread_name_prefix="fxsurgery-hash") as pool:
        found = list(pool.map(lambda file: known.get(file) or sha256(directory / file), files))
    return b"\n".join([(directory / INDEX).read_bytes(), *(h.encode() for h in found)])



def lazy_names(module: torch.nn.Module, lazy: dict | None) -> dict[str, Callable[[], torch.Tensor]]:
    """name -> reader for each tensor of `module` that `lazy` (id(tensor) -> reader) names."""
    if not lazy:
        return {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    return {name: lazy[id(t)] for name, t in named if id(t) in lazy}


def footprint(module: torch.nn.Module, lazy: dict, limit: int) -> dict:
    """What saving `module` writes and about how much memory it takes, from shapes alone.

    Streamed (`lazy`): the tensors already in memory (made by rules, buffers),
    one output shard as tensors and once more as the bytes safetensors
    serialises, and the largest tensor being read. In memory: the module's bytes.
    """
    seen: set[int] = set()
    sizes, resident, largest = [], 0, 0
    for name, t in module.state_dict(keep_vars=True).items():
        if id(t) in seen:  # a tie: written once
            continue
        seen.add(id(t))
        sizes.append((name, nbytes(t)))
        if id(t) in lazy:
            largest = max(largest, nbytes(t))
        elif not t.is_meta:
            resident += nbytes(t)
    total = sum(b for _, b in sizes)
    groups = plan(sizes, limit) if total > limit else [[n for n, _ in sizes]]
    size = dict(sizes)
    biggest = max((sum(size[n] for n in g) for g in groups), default=0)
    peak = resident + 2 * biggest + largest if lazy else total + biggest
    return {"output_bytes": total, "shards": len(groups) if total > limit else 1, "largest_shard_bytes": biggest,
            "streamed": bool(lazy), "predicted_peak_bytes": peak}
