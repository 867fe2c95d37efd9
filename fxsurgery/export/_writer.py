"""safetensors files written from the tensors' own memory, hashed while they are written.

`safetensors.torch.save_file` copies every tensor into a bytes object before
writing it, and a record's sha256 then reads the file back. Here each tensor's
memory goes to the file as it is, and a second thread hashes the same bytes
while the first writes them (both release the GIL), so a save costs about
the writing alone. The bytes are save_file's: the header is the same JSON,
tensors ordered as safetensors orders them (dtype, in the order the installed
safetensors uses, read from it once; then name), padded to 8 bytes with
spaces (tests/test_save.py compares the files byte for byte).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_CHUNK = 1 << 24  # 16 MiB: the hashing thread follows the writer one chunk behind
_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
          torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


@functools.lru_cache(maxsize=1)
def _rank() -> dict[str, int]:
    """safetensors' order of dtypes in a file (first written first), read from the installed version itself."""
    from safetensors.torch import save
    dtypes = list(_NAMES)
    data = save({f"t{i}": torch.zeros(1, dtype=d) for i, d in enumerate(dtypes)})
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    order = sorted((v["data_offsets"][0], k) for k, v in header.items() if k != "__metadata__")
    return {_NAMES[dtypes[int(k[1:])]]: rank for rank, (_, k) in enumerate(order)}


def supported(tensors: dict[str, torch.Tensor]) -> bool:
    """Whether this writer writes these tensors (else save_file does, and the file is hashed after)."""
    return sys.byteorder == "little" and all(t.dtype in _NAMES for t in tensors.values())


def _bytes(t: torch.Tensor) -> memoryview:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """The 8-byte length, the JSON header as safetensors writes it, and the names in the order of their data."""
    rank = _rank()
    names = sorted(tensors, key=lambda n: (rank[_NAMES[tensors[n].dtype]], n))
    entries: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return len(text).to_bytes(8, "little") + text, names


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
               also=None) -> str:
    """Write `tensors` to `path` as save_file(tensors, path, metadata) would; return the file's sha256
    ("sha256:..."), computed while writing. `also`: another hash object fed the same bytes."""
    head, names = header(tensors, metadata)
    own = hashlib.sha256()
    hashers = [own] if also is None else [own, also]

    def feed(piece):
        for h in hashers:
            h.update(piece)

    with ThreadPoolExecutor(1, thread_name_prefix="fxsurgery-hash") as pool, open(path, "wb", buffering=0) as handle:
        pending = [pool.submit(feed, head)]
        _all(handle, head)
        for name in names:
            data = _bytes(tensors[name])
            for start in range(0, len(data), _CHUNK):
                piece = data[start:start + _CHUNK]
                pending.append(pool.submit(feed, piece))
                _all(handle, piece)
        for future in pending:
            future.result()
    return "sha256:" + own.hexdigest()


def _all(handle, piece) -> None:
    view = memoryview(piece)
    while view:
        view = view[handle.write(view):]


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
