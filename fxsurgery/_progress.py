"""Progress bars (tqdm) for work that may take more than a couple of seconds.

A bar appears only after DELAY seconds, only when stderr is a terminal, and
never when quiet (`--quiet`, or `fxsurgery.progress.quiet()`): short runs,
pipes, logs and tests see nothing. Libraries the model brings (transformers'
"Loading weights", "Writing model shards") are held to the same rule by
`library_bars()`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
DELAY = 2.0     # seconds before a bar shows
TICK = 0.5      # seconds between redraws of a bar that counts no items (`working`)
WIDTH, ROWS = 80, 24   # the size where the terminal reports none (a fresh pseudo-terminal says 0 x 0)
_QUIET = False


def bar(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`items`, with a bar on stderr when the loop runs long enough to want one."""
    if not shown():
        yield from items
        return
    yield from tqdm(items, desc=desc, total=total, unit=unit, **_options())


class _Silent:
    def update(self, n: int = 1) -> None:
        pass


@contextlib.contextmanager
def counter(desc: str, unit: str = "it"):
    """A bar with no known total (`capture: 1234 node`), advanced by `.update()`; silent as `bar` is."""
    if not shown():
        yield _Silent()
        return
    with tqdm(desc=desc, total=None, unit=unit, **_options()) as t:
        yield t


@contextlib.contextmanager
def working(desc: str):
    """One long step with nothing to count (writing a 1.5 GB file, building a model): its elapsed
    time, redrawn by a thread every TICK seconds once DELAY has passed; silent as `bar` is."""
    if not shown():
        yield
        return
    stop = threading.Event()
    with tqdm(desc=desc, total=None, bar_format="{desc}: {elapsed}", **_options()) as t:
        def tick():
            while not stop.wait(TICK):
                t.update(0)   # tqdm draws only past its delay
        thread = threading.Thread(target=tick, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


def shown() -> bool:
    """Whether bars show: stderr is a terminal and nobody asked for quiet."""
    return not _QUIET and _terminal()


def _options() -> dict:
    """tqdm's arguments: the delay, gone when done, on stderr, as wide as the terminal (WIDTH where it says 0)."""
    try:
        columns, lines = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, ValueError, OSError):   # not a real file (a test's stand-in): tqdm measures what it can
        columns = lines = None
    # tqdm draws nothing on a terminal of 0 columns or 0 lines: a size it can draw in instead
    size = {"ncols": columns or WIDTH, "nrows": lines or ROWS} if 0 in (columns, lines) else {"dynamic_ncols": True}
    return {"delay": DELAY, "leave": False, "file": sys.stderr, **size}


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


@contextlib.contextmanager
def library_bars():
    """Inside this block transformers (and huggingface_hub) draw their bars only where ours would show.

    huggingface_hub reads HF_HUB_DISABLE_PROGRESS_BARS when first imported; transformers imported before
    the block is told directly.
    """
    if shown():
        yield
        return
    key = "HF_HUB_DISABLE_PROGRESS_BARS"
    before = os.environ.get(key)
    os.environ[key] = "1"
    logging = sys.modules.get("transformers.utils.logging")
    enabled = logging.is_progress_bar_enabled() if logging is not None else None
    if logging is not None:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before
        if enabled:
            logging.enable_progress_bar()
