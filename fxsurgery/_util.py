"""Helpers that several stages need: one of each, in the lowest layer."""

from __future__ import annotations

import json
import os
from typing import Any

# node meta set by capture's mode tracking: the node's arguments are the same in train and eval mode
SAME_IN_BOTH_MODES = "fxsurgery_same_in_both_modes"


def shape_text(shape) -> str:
    """[1, 3, 224, 224]: a shape as people write it."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def format_table(rows: list[tuple]) -> str:
    """Rows as left-aligned columns, the first row a header underlined with dashes."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def first_line(exc: BaseException, default: str = "") -> str:
    """The first line of an exception's message: errors here are one line, whatever a library raised."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else default


def get_path(root: Any, target: str) -> Any:
    """The object at a dotted path below `root` (`layer1.0.conv1.weight`), as torch.fx targets name them."""
    for part in target.split("."):
        root = getattr(root, part)
    return root


MAX_JSON = 256 << 20  # the largest record, index or graph.json read: a model of 100k nodes writes a few tens of MB


def read_json(path) -> Any:
    """A JSON file's value; ValueError for whatever a reader cannot hold: not UTF-8, not JSON, nested
    too deep for the parser (RecursionError), an integer of more than 4300 digits; and, before it is opened,
    what is no regular file (a FIFO blocks the open, /dev/zero never ends) or larger than MAX_JSON (a sparse
    10 GB file is read whole)."""
    import stat
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode) or str(os.path.realpath(path)).startswith(("/proc/", "/sys/", "/dev/")):
        raise ValueError("not a regular file")
    if info.st_size > MAX_JSON:
        raise ValueError(f"{info.st_size:,} bytes, more than the {MAX_JSON >> 20} MB a record holds")
    with open(path, encoding="utf-8") as handle:
        try:
            return json.loads(handle.read(MAX_JSON + 1))
        except (UnicodeDecodeError, RecursionError) as exc:
            raise ValueError(f"{type(exc).__name__}: {str(exc)[:80]}") from None


def shown(text: str) -> str:
    """A name or a file's text for a one-line message or a terminal: as it is when printable, else escaped."""
    return text if text.isprintable() else ascii(text)


def printable(text: str) -> str:
    """Lines for a terminal: each as it is, but for its control characters, escaped (a rule file's name with an
    escape sequence in it, shown in the report, would otherwise drive the terminal)."""
    return "\n".join(line if line.isprintable() else "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line)
                     for line in text.split("\n"))


def machine_memory() -> int | None:
    """This machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


class BuildBudget:
    """At most `limit` modules, parameters and buffers registered meanwhile: a declared size (RNN's num_layers,
    MLP's hidden_channels) costs Python work per layer even on the meta device, so a file of a few hundred bytes
    could ask for hours. Counted on this thread only; `error(text)` is raised past the limit."""

    def __init__(self, limit: int, error=ValueError):
        import threading
        self.limit, self.error, self.count, self.thread = limit, error, 0, threading.get_ident()

    def _seen(self, *_) -> None:
        import threading
        if threading.get_ident() == self.thread:
            self.count += 1
            if self.count > self.limit:
                raise self.error(f"builds more than {self.limit} modules, parameters and buffers")

    def __enter__(self):
        from torch.nn.modules import module as hooks
        self.handles = [register(self._seen) for register in (hooks.register_module_module_registration_hook,
                                                              hooks.register_module_parameter_registration_hook,
                                                              hooks.register_module_buffer_registration_hook)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
