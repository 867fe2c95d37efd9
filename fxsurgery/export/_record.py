"""What a saved directory holds: its files, its record (surgery.json) and the hash over them."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import uuid
from pathlib import Path

from .._util import read_json
from ..errors import SaveError
from ._atomic import recover
from ._filehash import edited, recorded
from ._shards import INDEX, folded, has_weights, shard_files

FILES = ("model.py", "model.safetensors", "surgery.json")  # model.safetensors, or shards and their index


FORMAT = 2  # 2: the hash covers surgery.json too


def digest(directory: Path, record: dict, shard_hashes: dict[str, str] | None = None, written=None) -> str:
    """Over model.py, the weights, graph.json (where written) and the record itself: it detects damage, it proves no origin.

    The record counts without its "hash": map-weights follows its sources and
    recipes, so an edit there changes outputs as much as an edit to the weights.
    A save_pretrained directory counts as the files the record lists. Sharded
    weights count as the index and each shard's own sha256 (`shard_hashes`
    where the writer just computed them), so a shard is read once to check it.
    `written`: a sha256 object the writer fed model.py and then model.safetensors
    (one file) as it wrote them: neither is read again.
    """
    if record.get("saved_by") == "save_pretrained":
        h, names, fed = hashlib.sha256(), pretrained_files(directory, record), False
    else:
        sharded = shard_files(directory) is not None
        fed = written is not None and not sharded
        h = written.copy() if fed else hashlib.sha256()
        names = ("model.py", "model.safetensors", "graph.json")[:3 if (directory / "graph.json").exists() else 2]
    for name in names[2 if fed else 0:]:
        path = directory / name
        if name == "model.safetensors" and not fed and shard_files(directory) is not None:
            h.update(folded(directory, shard_hashes))
            continue
        if path.exists() and not path.is_file():  # a link to /dev/zero or a FIFO would keep the hash reading forever
            raise SaveError(f"{path}: not a regular file; fix: write the directory again with save()")
        h.update(f"\0{name}\0".encode() if record.get("saved_by") == "save_pretrained" else b"")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                h.update(block)
    h.update(b"\0surgery.json\0" + canonical(record))
    return "sha256:" + h.hexdigest()


def canonical(record: dict) -> bytes:
    """The record without its hash, as surgery.json holds it and as read back (keys sorted, objects as strings)."""
    written = json.loads(json.dumps({k: v for k, v in record.items() if k != "hash"}, default=str))
    return json.dumps(written, sort_keys=True, separators=(",", ":")).encode()


def pretrained_files(directory: Path, record: dict) -> list[str]:
    """The files a save_pretrained directory's record lists (surgery.json aside): plain names of regular files."""
    files = record.get("files")
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise SaveError(f"{directory / 'surgery.json'}: its files are not a list of names; fix: write the directory again with save()")
    names = sorted(set(files) - {"surgery.json"})
    for name in names:
        if not _PLAIN_NAME.fullmatch(name) or len(name) > 255:
            raise SaveError(f"{directory / 'surgery.json'}: lists {name!r}, not a file name; fix: write the directory again with save()")
        if not (directory / name).is_file():
            raise SaveError(f"{directory / name}: listed in surgery.json, is missing or not a regular file; fix: write the "
                            "directory again with save()")
        real = os.path.realpath(directory / name)
        if real.startswith(_PSEUDO):
            raise SaveError(f"{directory / name}: is a link to {real}, not a regular file; fix: put the file itself there")
    return names


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def import_source(path: Path):
    """Import a model.py by path under a fresh name (it is source, read it before trusting it)."""
    spec = importlib.util.spec_from_file_location(f"_fxsurgery_saved_{uuid.uuid4().hex}", path)
    code = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(code)
    return code


def _pretrained(directory: Path) -> bool:
    try:
        record = read_json(directory / "surgery.json")
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("saved_by") == "save_pretrained"


# what a load reads of a saved directory, by name; save() writes each as a regular file
_READ = re.compile(r"model\.py|model\.safetensors(\.index\.json)?|graph\.json|surgery\.json|model-\d{5}-of-\d{5}\.safetensors")


_PSEUDO = ("/proc/", "/sys/", "/dev/")  # file systems whose "regular files" never end or hang (/proc/self/pagemap)


def _plain_files(directory: Path) -> None:
    """Refuse a file a load would read that is not a regular file: a FIFO hangs, /dev/zero never ends. A link
    is followed (the Hugging Face cache links each file of a snapshot to a blob) to a regular file only, outside
    the pseudo file systems, whose files claim to be regular."""
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return  # not a directory: the caller says what is missing
    for entry in sorted(entries, key=lambda e: e.name):
        if not _READ.fullmatch(entry.name) or entry.is_file(follow_symlinks=False):
            continue
        if entry.is_symlink():
            real = os.path.realpath(entry.path)
            if os.path.isfile(real) and not real.startswith(_PSEUDO):
                continue
            what = f"a link to {real}, not a regular file"
        else:
            what = "not a regular file"
        raise SaveError(f"{directory / entry.name}: is {what}; fix: put the file itself there, or write the directory again with save()")


def read_record(directory: str | os.PathLike) -> dict:
    directory = Path(directory)
    with contextlib.suppress(OSError):
        recover(directory, tidy=False)  # a replacement a killed run left half done; writers tidy the rest
    _plain_files(directory)
    missing = [f for f in FILES if not (directory / f).is_file() and not (f == "model.safetensors" and has_weights(directory))]
    if missing == ["model.py"] and _pretrained(directory):
        missing = []  # save_pretrained's layout: the library's class rebuilds it (map-weights reads the record)
    if missing:
        raise SaveError(f"{directory}: not an fxsurgery output (missing {', '.join(missing)}); fix: pass a directory written by save()")
    try:
        record = read_json(directory / "surgery.json")
    except OSError as exc:
        raise SaveError(f"{directory / 'surgery.json'}: cannot read: {exc.strerror or exc}; fix: write the directory again with save()") from None
    except ValueError as exc:
        raise SaveError(f"{directory / 'surgery.json'}: not valid JSON ({exc}); fix: write the directory again with save()") from None
    if not isinstance(record, dict):
        raise SaveError(f"{directory / 'surgery.json'}: holds a JSON {type(record).__name__}, not the record save() writes; "
                        "fix: write the directory again with save()")
    return record


def verify_hash(directory: Path, record: dict) -> None:
    """The record's sha256 over model.py, the weights, graph.json and the record: a file changed since save() wrote it is refused."""
    if record.get("format") == 1:  # its hash left the record out: checking it would let an edited record through
        raise SaveError(f"{directory}: written by an older fxsurgery (format 1), whose hash leaves surgery.json out; fix: "
                        "read it, load it with fxs.load(..., verify=False) and save it again")
    if record.get("format") != FORMAT:
        raise SaveError(f"{directory}: unsupported format {record.get('format')!r}; fix: write it again with this fxsurgery")
    if record.get("hash") != digest(directory, record):
        raise SaveError(f"{directory}: {_which(directory, record)} since it was written "
                        "(hash mismatch); fix: write the directory again with save()")


_COVERED = {False: "model.py, model.safetensors, graph.json or surgery.json", True: "a file it lists or surgery.json"}


def _which(directory: Path, record: dict) -> str:
    """The files the broken hash covers that changed, by their own hashes; else those it cannot tell apart
    (a large model.safetensors, hashed only with the rest) and surgery.json. A record from before per-file
    hashes: every file the hash covers."""
    if not isinstance(record.get("sha256"), dict):
        return _COVERED[record.get("saved_by") == "save_pretrained"] + " changed"
    # a file the hash covered when written (graph.json) is left out of it once removed: named as removed
    gone = [name for name in ("model.py", "graph.json") if name in record["sha256"] and not os.path.lexists(directory / name)]
    if gone:
        return f"{' and '.join(gone)} {'was' if len(gone) == 1 else 'were'} removed"
    covered = _covered(directory, record)
    changed = edited(directory, record, covered)
    if changed:
        return " and ".join(changed) + " changed"
    unknown = [name for name in covered if name not in recorded(record)]
    return " or ".join([", ".join(unknown), "surgery.json"] if unknown else ["surgery.json"]) + " changed"


def _covered(directory: Path, record: dict) -> list[str]:
    if record.get("saved_by") == "save_pretrained":
        return pretrained_files(directory, record)
    shards = shard_files(directory)
    weights = [INDEX, *shards] if shards is not None else ["model.safetensors"]
    return ["model.py", *weights, *(["graph.json"] if (directory / "graph.json").exists() else [])]
