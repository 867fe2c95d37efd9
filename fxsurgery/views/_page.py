"""Writing the diff page: the format chosen by the file's suffix, written atomically, never over a file unasked."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import SaveError
from ..pipeline import SurgeryResult
from ._diff import render_html, render_svg


def check_suffix(path: str | os.PathLike):
    """The renderer a file name asks for; an error before any work when it asks for none."""
    path = Path(path)
    render = {".html": render_html, ".htm": render_html, ".svg": render_svg}.get(path.suffix.lower())
    if render is None:
        raise SaveError(f"{path}: cannot tell the format from the suffix '{path.suffix}'; fix: name the file .html or .svg")
    return render


def check_free(path: str | os.PathLike, force: bool, flag: str = "force=True") -> None:
    """Before any work: a directory is no page, and a file already there is replaced only when asked."""
    path = Path(path)
    if path.is_dir():
        raise SaveError(f"{path}: is a directory; fix: name a file in it, e.g. {path / 'diff.html'}")
    if (path.exists() or path.is_symlink()) and not force:
        raise SaveError(f"{path}: already exists; fix: pass {flag} to replace it, or choose another name")


def diff(result: SurgeryResult, path: str | os.PathLike, force: bool = False) -> Path:
    """Write the diff as HTML or SVG, chosen by the suffix, atomically (a temporary file renamed into place);
    a file already at `path` is replaced only with `force=True`."""
    path = Path(path)
    render = check_suffix(path)
    check_free(path, force)
    text = render(result)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise SaveError(f"{path}: cannot write there: {exc.strerror}; fix: choose a writable directory") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)   # mkstemp makes it private; a page is for sharing
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path

