"""Crash-safe replacement of an output directory.

A new output is written into `.{name}.fxsurgery-tmp-{hex}` beside the target,
created with the umask's modes and holding the marker file `.fxsurgery-partial`
(the writer's pid) until every file in it is written and fsynced. Then it
takes the target's place:

- where the kernel can swap two paths (Linux renameat2 RENAME_EXCHANGE), in one
  step: the path holds the complete old or the complete new output at every
  instant;
- elsewhere in two renames, target -> `.{name}.fxsurgery-old-{hex}` and
  temp -> target. A run killed between them leaves the path empty for a moment;
  the next run (`recover`) finishes the move, or puts the old output back when
  the new one is not complete.

The displaced output is marked, renamed to `.{name}.fxsurgery-trash-{hex}` and
removed, marker last. `recover` removes only directories with these names that
hold the marker, are empty, or hold a complete output and nothing else: never
a directory fxsurgery did not make, and never the temp directory of a run that
is still alive (the marker holds the writer's pid and host; a marker written
on another host is taken as alive, since its pid cannot be checked here).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import secrets
import shutil
import socket
import sys
from pathlib import Path

from .._util import read_json
from ..errors import SaveError
from ._filehash import edited
from ._ranks import HASHES, Ranks, activated, discard, hand_over

MARKER = ".fxsurgery-partial"
_SHARD = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")  # what a rank hands over (_shards.py names them)
RECORD = "surgery.json"
# Names written before surgery.json listed its files.
LEGACY = ("model.py", "model.safetensors", "graph.json", RECORD, "model.pt2", "model.onnx", "model.onnx.data", "model.torchscript.pt")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step; False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this file system cannot swap
        return False
    raise OSError(code, os.strerror(code), str(b))


def under_a_file(target: Path) -> str | None:
    """What to say where one of `target`'s parents is a file (or a link to one), not a directory; else None."""
    for parent in reversed(Path(target).parents):  # from the root down: the first that is no directory
        if os.path.lexists(parent) and not parent.is_dir():
            return f"{target}: {parent} is a file, not a directory; fix: choose another output path"
    return None


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def finish_tree(directory: Path) -> None:
    """Give every file in `directory` the umask's modes (safetensors makes them private) and flush it, then the directory."""
    mode = 0o666 & ~umask()
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            os.chmod(entry.path, mode)
            fd = os.open(entry.path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(directory)


def listed_files(directory: Path) -> set[str] | None:
    """The files an fxsurgery output in `directory` says it wrote (None: not an output)."""
    try:
        record = read_json(directory / RECORD)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or "fxsurgery" not in record:
        return None
    files = record.get("files")
    if not isinstance(files, list):
        return set(LEGACY)
    return {f for f in files if isinstance(f, str) and f and "/" not in f and "\\" not in f and f not in (".", "..")
            and len(os.fsencode(f)) <= 255}  # a longer name is no file here: looking it up raises "File name too long"


# what torch.distributed.checkpoint writes into model.dcp/ (--format dcp): the one directory an output lists
_DCP_FILE = re.compile(r"\.metadata|__\d+_\d+\.distcp")


def foreign_files(directory: Path) -> list[str]:
    """Entries of an fxsurgery output that fxsurgery did not write (inside a directory it lists, such as
    model.dcp/, what DCP would not have written: --force would delete them with it)."""
    ours = listed_files(directory) or set()
    found = [e for e in os.listdir(directory) if e not in ours and e != RECORD]
    for entry in sorted(ours):
        inside = directory / entry
        if inside.is_dir() and not inside.is_symlink():
            found += [f"{entry}/{e}" for e in os.listdir(inside) if not (_DCP_FILE.fullmatch(e) and (inside / e).is_file())]
    return sorted(found)


def _complete(directory: Path) -> bool:
    return not (directory / MARKER).exists() and listed_files(directory) is not None and not foreign_files(directory)


def _ours(parent: Path, name: str) -> list[tuple[str, str, Path]]:
    pattern = re.compile(rf"\.{re.escape(name)}\.fxsurgery-(tmp|old|trash)-([0-9a-f]{{16}})")
    try:
        entries = os.listdir(parent)
    except OSError:
        return []
    # a link with one of our names is not ours: following it would empty the directory it points to
    return [(m[1], m[2], parent / e) for e in sorted(entries)
            if (m := pattern.fullmatch(e)) and (parent / e).is_dir() and not (parent / e).is_symlink()]


def _alive_elsewhere(directory: Path) -> bool:
    """True when the marker names another live process on this host, or any process on another host: a pid is
    judged only on the host that wrote it (on a shared file system, several nodes of one torchrun launch or two
    machines writing beside each other, another host's pid says nothing here), so its directory is left alone."""
    marker = directory / MARKER
    try:
        if marker.is_symlink() or marker.exists() and (not marker.is_file() or marker.stat().st_size > 4096):
            return True  # no marker this package wrote (a FIFO, a link to /dev/zero): left alone, never read
        pid, host = marker.read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False
    if host != socket.gethostname():
        return True
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def mark(directory: Path) -> None:
    with open(directory / MARKER, "w") as handle:
        handle.write(f"{os.getpid()} {socket.gethostname()}\n")


def remove(directory: Path) -> None:
    """Delete one of our directories, its marker last, so a kill midway leaves it recognisable."""
    if os.path.islink(directory):  # never followed: only the link goes
        os.unlink(directory)
        return
    for entry in os.scandir(directory):
        if entry.name != MARKER:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / MARKER)
    os.rmdir(directory)


def _dispose(directory: Path, parent: Path, name: str, token: str) -> None:
    """Mark a displaced output, move it to a trash name and remove it."""
    mark(directory)
    trash = parent / f".{name}.fxsurgery-trash-{token}"
    os.rename(directory, trash)
    remove(trash)


def recover(target: str | os.PathLike, keep: set[str] = frozenset(), tidy: bool = True) -> None:
    """Finish or roll back a replacement of `target` that a killed run left, and remove its temp directories
    (except those whose token is in `keep`: the other ranks of this run, _ranks.py).

    A reader passes tidy=False: unless it had to put back a missing output, it
    removes nothing, since it cannot tell a killed writer's complete temp
    directory from a live one's between its last two steps (marker gone,
    rename not yet done), and disposing of that one would fail the save."""
    target = Path(target)
    parent, name = target.parent, target.name
    entries = [e for e in _ours(parent, name) if e[1] not in keep]
    if not entries:
        return
    restored = False
    if not os.path.lexists(target):
        for kind, token, path in entries:
            if kind == "old" and _complete(path):
                new = parent / f".{name}.fxsurgery-tmp-{token}"
                os.rename(new if new.is_dir() and _complete(new) else path, target)  # forward, or back
                fsync_dir(parent)
                restored = True
                break
    if not (tidy or restored):
        return
    for kind, token, path in _ours(parent, name):
        if token in keep:
            continue
        marked = (path / MARKER).exists()  # trash too: _dispose marks before it renames, remove() unmarks last
        if marked and (kind == "trash" or not _alive_elsewhere(path)) or not os.listdir(path):
            remove(path)
        elif _complete(path) and kind != "trash":  # a displaced output is renamed old first; trash is always marked
            _dispose(path, parent, name, token)
    fsync_dir(parent)


def check_target(target: str | os.PathLike, force: bool, flag: str = "--force (force=True)", ranks=None) -> None:
    """Refuse an output path that cannot be written or replaced, before any work is done.

    Of several ranks writing one output (`ranks`, _ranks.py) only rank 0 cleans
    up after killed runs, leaving the other ranks' directories alone."""
    target = Path(target)
    if target.name == ".." or (".." in target.parts and not os.path.isdir(target.parent)):
        # new/.. names new's parent, which cannot be renamed into place, and making new/ first leaves it behind
        why = "ends in '..', which names the directory above" if target.name == ".." else "passes '..' after a directory that does not exist"
        raise SaveError(f"{target}: {why}; fix: name the output directory itself, without '..'")
    if ranks is None or ranks.rank == 0:
        with contextlib.suppress(OSError):
            recover(target, ranks.tokens(target) if ranks is not None else frozenset())
    if os.path.islink(target):
        raise SaveError(f"{target}: is a symbolic link (to {os.readlink(target)}); "
                        "fix: pass the directory it points to, or remove the link")
    if not os.path.lexists(target):
        return
    if target.is_dir() and os.path.samefile(target, os.getcwd()) and (force or not any(os.scandir(target))):
        # it is renamed away whole: the system says "busy"
        raise SaveError(f"{target}: is the current directory, which an output replaces whole; fix: run from its parent, "
                        "or name another output directory")
    if target.is_dir() and not any(os.scandir(target)):  # an empty directory (made for the output): nothing to lose
        return
    if not force:
        raise SaveError(f"{target}: already exists; fix: choose another output directory or pass {flag}")
    if not target.is_dir() or listed_files(target) is None:
        raise SaveError(f"{target}: exists and is not an fxsurgery output, refusing to replace it; fix: choose another output directory")
    foreign = foreign_files(target)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise SaveError(f"{target}: holds files fxsurgery did not write ({shown}), refusing to replace it; "
                        "fix: move them out of the directory or choose another output directory")
    changed = _edited_since(target)
    if changed:
        raise SaveError(f"{target}: {' and '.join(changed)} changed since fxsurgery wrote {'it' if len(changed) == 1 else 'them'}, "
                        "so replacing the output would lose that edit; fix: move the edited files out of the directory or "
                        "choose another output directory")


def _edited_since(target: Path) -> list[str]:
    """The small files of an output (model.py, graph.json, ...) whose bytes differ from the record's hash of them:
    someone's edit, which --force would delete. Weights too large to hash on their own are not read."""
    try:
        record = read_json(target / RECORD)
    except (OSError, ValueError):
        return []
    small = record.get("sha256") if isinstance(record, dict) else None
    return edited(target, record, list(small), small=True) if isinstance(small, dict) else []


@contextlib.contextmanager
def replacing(target: str | os.PathLike, force: bool = False, ranks=None):
    """Yield a new directory that becomes `target`, crash-safely, only if the block succeeds.

    The block must write surgery.json last, listing its files. Of several ranks
    writing one output (`ranks`), rank 0 gets that directory; another rank gets
    a directory of its own, which rank 0 empties into it (_ranks.py).
    """
    target = Path(target)
    if ranks is not None and ranks.rank:
        check_target(target, force, ranks=ranks)
        with rank_share(ranks, target) as work:
            yield work
        return
    check_target(target, force, ranks=ranks)
    parent, name = target.parent, target.name
    token = secrets.token_hex(8)
    work = parent / f".{name}.fxsurgery-tmp-{token}"
    try:
        parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(work, 0o777)  # the umask decides the modes, as for any directory the user makes
    except OSError as exc:
        raise SaveError(under_a_file(target) or f"{target}: cannot write there: {exc.strerror}; fix: choose a writable output directory") from None
    try:
        mark(work)
        with activated(ranks, target):
            yield work
        finish_tree(work)
        os.unlink(work / MARKER)
        fsync_dir(work)
        if not os.path.lexists(target):
            os.rename(work, target)
        elif _exchange(work, target):
            fsync_dir(parent)
            _dispose(work, parent, name, token)
        else:
            old = parent / f".{name}.fxsurgery-old-{token}"
            os.rename(target, old)
            os.rename(work, target)
            fsync_dir(parent)
            _dispose(old, parent, name, token)
        fsync_dir(parent)
    except BaseException as exc:
        # `work` holds either the unfinished new output or, after a swap, the old one: neither is needed.
        shutil.rmtree(work, ignore_errors=True)
        discard(ranks)
        with contextlib.suppress(OSError):
            recover(target)  # puts the old output back if the failure came between two renames
        raise_written(target, exc)


def raise_written(target: Path, exc: BaseException):
    """Re-raise a failure while writing `target`: a full disk, a quota, a file system gone read-only in one line."""
    if isinstance(exc, OSError):
        full = exc.errno in (errno.ENOSPC, errno.EDQUOT)
        fix = "free some space, or choose an output directory on another disk" if full else "choose a writable output directory"
        raise SaveError(f"{target}: cannot write: {exc.strerror or exc}; fix: {fix}") from None
    raise exc


# -- several ranks writing one output (_ranks.py) --

@contextlib.contextmanager
def rank_share(ranks: Ranks, target: Path):
    """Rank r > 0: its own directory beside `target`; after the barrier it belongs to rank 0."""
    work = ranks.share(target, ranks.rank)
    if os.path.lexists(work):  # left by a killed launch that had the same master port: its name is this run's now
        remove(work)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(work, 0o777)
    except OSError as exc:
        raise SaveError(under_a_file(target) or f"{target}: cannot write there: {exc.strerror}; fix: choose a writable output directory") from None
    mark(work)
    try:
        with activated(ranks, target):
            yield work
    except BaseException as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise_written(target, exc)


def meet(ranks: Ranks, work: Path, hashes: dict[str, str]) -> dict[str, str]:
    """The one meeting of the ranks: after it rank 0 holds every shard ({shard: sha256} of the others')."""
    if ranks.rank:
        hand_over(work, hashes)
    ranks.barrier()
    return take_over(ranks, work) if ranks.rank == 0 else {}


def take_over(ranks: Ranks, work: Path) -> dict[str, str]:
    """Rank 0, after the barrier: move every other rank's shards into `work`; {shard: sha256}."""
    hashes: dict[str, str] = {}
    for r in range(1, ranks.size):
        share = ranks.share(ranks.target, r)
        try:
            theirs = read_json(share / HASHES)
            if not isinstance(theirs, dict) or not all(isinstance(n, str) and _SHARD.fullmatch(n) for n in theirs):
                raise ValueError  # only shard names: a name with a directory part would move a file elsewhere
            for name in theirs:
                os.rename(share / name, work / name)
        except (OSError, ValueError) as exc:
            raise SaveError(f"rank {r} of {ranks.size}: its shards are not in {share} ({type(exc).__name__}); "
                            "fix: give every rank the same output directory on a shared file system") from None
        hashes.update(theirs)
        remove(share)
    return hashes
