"""Each written file's own sha256 (surgery.json's "sha256"): a load that finds the record's hash broken names
the file that changed, and --force refuses to replace an output whose files someone edited.

The record's one hash (_record.py) stays what proves the directory whole; these say which part is not.
Weights files above SMALL are left out: hashing them on their own would read every weight byte a second
time, at save and at --force, where the shards' hashes (written while writing) already name a shard.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

SMALL = 16 << 20


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            h.update(block)
    return "sha256:" + h.hexdigest()


def file_hashes(directory: Path, names, known: dict | None = None) -> dict[str, str]:
    """{name: sha256} of the regular files among `names` of at most SMALL bytes (`known`: already hashed, skipped)."""
    out = {}
    for name in sorted(names):
        path = directory / name
        if name in (known or {}) or path.is_symlink() or not path.is_file() or path.stat().st_size > SMALL:
            continue
        out[name] = sha256(path)
    return out


def recorded(record: dict) -> dict[str, str]:
    """The per-file hashes a record keeps: its small files' and its shards' ({} for a record from before them)."""
    found = {}
    for key in ("shards", "sha256"):
        value = record.get(key)
        if isinstance(value, dict):
            found.update({k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)})
    return found


def edited(directory: Path, record: dict, names=None, small: bool = False) -> list[str]:
    """The files among `names` (default: every file the record hashed) whose bytes differ from the record's hash
    of them. Only plain names of regular files are read: a record naming ../x, a FIFO or /proc/self/pagemap reads
    nothing; `small`: nor one above SMALL (a record edited to list the weights must not make --force read them all)."""
    known = recorded(record)
    out = []
    for name in sorted(known if names is None else [n for n in names if n in known]):
        path = directory / name
        try:  # a link is followed, as the record's hash follows it (a hub cache links each file to a blob)
            if (os.path.basename(name) != name or name in (".", "..") or not path.is_file()
                    or os.path.realpath(path).startswith(_PSEUDO) or (small and path.stat().st_size > SMALL)):
                continue
            if sha256(path) != known[name]:
                out.append(name)
        except OSError:  # a name too long for the system, a file gone meanwhile: nothing of it to compare
            continue
    return out


_PSEUDO = ("/proc/", "/sys/", "/dev/")  # "regular files" there never end or hang
