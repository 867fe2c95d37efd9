"""safetensors files written from the tensors' own memory, hashed while they are written.

`safetensors.torch.save_file` copies every tensor into a bytes object before
writing it, and a record's sha256 then reads the file back. Here each tensor's
memory goes to the file as it is, and a second thread hashes the same bytes
while the first writes them (both release the GIL), so a save costs about
the writing alone.

The file is a safetensors file as save_file writes it (the same JSON header;
tensors in safetensors' order: dtype, in the order the installed safetensors
uses, read from it once; then name), with two differences that place every
tensor where torch's allocator would. The header is padded with spaces to
end at a multiple of 64 bytes (safetensors pads to 8), and tensors whose
size is a multiple of 64 bytes come first. A reader maps the file at a page
boundary, so each of them starts 64-byte aligned, and loading can hand the
mapped tensor to the module instead of copying it: CPU kernels choose their
vector path by alignment, and a tensor at an odd address computes other bits
(tests/test_save.py checks both the bytes and the alignment).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

ALIGN = 64  # bytes: where torch's CPU allocator places a tensor
_CHUNK = 1 << 24  # 16 MiB: the hashing thread follows the writer one chunk behind
_FLUSH = 1 << 28  # 256 MiB written: hand it to the disk
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
    if not flat.numel():
        return memoryview(b"")
    if is_lazy_copy(flat):
        # numpy() asks for a writable pointer, which makes a lazy copy copy its bytes for good (memory
        # the size of the model, at save): its bytes are read through the read-only pointer instead
        raw = (ctypes.c_char * (flat.numel() * flat.element_size())).from_address(flat.const_data_ptr())
        raw.owner = flat  # the memory lives as long as the view of it
        return memoryview(raw).cast("B")
    return memoryview(flat.view(torch.uint8).numpy())


def is_lazy_copy(t: torch.Tensor) -> bool:
    """A lazy (copy-on-write) copy, whose memory is still shared: asking for a writable pointer
    (data_ptr, numpy) would make it copy its bytes, and keep that copy."""
    return _IS_COW(t) if _IS_COW is not None else False


_IS_COW = getattr(torch._C, "_is_cow_tensor", None)


def header(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """The 8-byte length, the JSON header (padded so the data starts 64-byte aligned), and the names in the order of their data."""
    rank = _rank()
    sizes = {n: t.numel() * t.element_size() for n, t in tensors.items()}
    names = sorted(tensors, key=lambda n: (sizes[n] % ALIGN != 0, rank[_NAMES[tensors[n].dtype]], n))
    entries: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name in names:
        t = tensors[name]
        entries[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + sizes[name]]}
        offset += sizes[name]
    text = json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)  # data starts 64-byte aligned
    return len(text).to_bytes(8, "little") + text, names


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
               into=None) -> str | None:
    """Write `tensors` to `path` as a safetensors file, aligned (see above); return the file's sha256
    ("sha256:..."), computed while writing. `into`: a hash object fed the bytes instead (a record's
    hash that covers the whole file); then nothing is returned, and each byte is hashed once."""
    head, names = header(tensors, metadata)
    own = hashlib.sha256() if into is None else into
    feed = own.update

    with (open(path, "wb", buffering=0) as handle, ThreadPoolExecutor(1, thread_name_prefix="fxsurgery-hash") as pool,
          ThreadPoolExecutor(1, thread_name_prefix="fxsurgery-flush") as flusher):
        pending = [pool.submit(feed, head)]
        _all(handle, head)
        flushing, unflushed = None, 0
        for name in names:
            data = _bytes(tensors[name])
            for start in range(0, len(data), _CHUNK):
                piece = data[start:start + _CHUNK]
                pending.append(pool.submit(feed, piece))
                _all(handle, piece)
                unflushed += len(piece)
                # the disk takes what is written so far while the rest is written: the fsync that
                # makes the output durable then waits for the last part alone, not the whole file
                if unflushed >= _FLUSH and (flushing is None or flushing.done()):
                    flushing, unflushed = flusher.submit(os.fdatasync, handle.fileno()), 0
        for future in [*pending, *([flushing] if flushing else [])]:
            future.result()
    return "sha256:" + own.hexdigest() if into is None else None


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
