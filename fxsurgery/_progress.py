"""Progress bars (tqdm) for work that may take more than a couple of seconds.

A bar appears only after DELAY seconds, only when stderr is a terminal, and
never when quiet (`--quiet`, or `fxsurgery.progress.quiet()`): short runs,
pipes, logs and tests see nothing.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
DELAY = 2.0     # seconds before a bar shows
_QUIET = False


def bar(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`items`, with a bar on stderr when the loop runs long enough to want one."""
    if _QUIET or not _terminal():
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, unit=unit, delay=DELAY, leave=False, file=sys.stderr,
                    dynamic_ncols=True)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def counter(desc: str, unit: str = "it"):
    """A bar with no known total (`capture: 1234 node`), advanced by `.update()`; silent as `bar` is."""
    if _QUIET or not _terminal():
        yield _Silent()
        return
    with tqdm(desc=desc, total=None, unit=unit, delay=DELAY, leave=False, file=sys.stderr, dynamic_ncols=True) as t:
        yield t


def _terminal() -> bool:
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


@contextlib.contextmanager
def quiet(on: bool = True):
    """No bars inside this block (the CLI's --quiet)."""
    global _QUIET
    before, _QUIET = _QUIET, on or _QUIET
    try:
        yield
    finally:
        _QUIET = before
