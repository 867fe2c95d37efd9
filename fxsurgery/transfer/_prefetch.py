"""Copies of the original's tensors, made on another thread while the surgery's Python runs.

Transfer copies every tensor of the original into the new module. Most of
that time is the kernel handing out and zeroing fresh pages for the copies,
work that holds no Python lock; capture, match and rewrite before it are
Python that holds it. So `apply` starts a thread that makes the copies from
the first moment, and transfer takes a copy made ahead in place of a blank.

A copy made ahead is used only where the original tensor is still the same
object, at the same version and over the same memory (an in-place change
since bumps the version, `.data = ...` moves the memory: that tensor is then
copied again at transfer, as without this). Only plain dense CPU
tensors are copied ahead; meta tensors (a model built without weights),
other devices and tensor subclasses go the ordinary way.

The copies are made before the rules say which tensors the result keeps: a
surgery that drops most of a model holds a copy of all of it until `apply`
returns. So copies are made ahead only where the whole copy takes at most half
of the memory the system (and the process's cgroup) can still give; elsewhere
every tensor is copied at transfer, as before.
"""

from __future__ import annotations

import threading

import torch
from torch import nn


def _eligible(t: torch.Tensor) -> bool:
    return (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu" and t.layout == torch.strided
            and not t.is_quantized and not t.is_inference() and t.numel() > 0)  # inference tensors keep no version


_GROUP = 1 << 28  # bytes copied per call of the thread (between its checks for a stop)


def _state(t: torch.Tensor) -> tuple[int, int]:
    return t._version, t.data_ptr()


def available_memory() -> int | None:
    """Bytes the system can still give this process: Linux's MemAvailable, capped by the cgroup's
    limit less its use where one is set; None where neither can be read."""
    found = []
    try:
        with open("/proc/meminfo") as f:
            found += [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            bound = limit.read().strip()
            if bound != "max":
                found.append(max(0, int(bound) - int(used.read().strip())))
    except (OSError, ValueError):
        pass
    return min(found) if found else None


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    seen: set[int] = set()
    tensors = []
    for sub in model.modules():
        for t in [*sub._parameters.values(), *sub._buffers.values()]:
            if t is not None and id(t) not in seen and _eligible(t):
                seen.add(id(t))
                tensors.append(t)
    return tensors


class Prefetch:
    """A thread copying `model`'s tensors, started at once; `take()` waits for it and hands the copies over.

    The copies' memory is asked for here (no page is touched yet) and the thread copies a few
    hundred megabytes per call: a thread that needs the Python lock for each tensor waits for the
    main thread to let go of it each time, and makes the main thread wait in turn."""

    @classmethod
    def start(cls, model: nn.Module) -> Prefetch | None:
        """Copies of `model`'s tensors under way, or None where they would take more than half of the
        memory still free (or that is unknown)."""
        tensors = _tensors(model)
        size = sum(t.numel() * t.element_size() for t in tensors)
        free = available_memory()
        if not tensors or free is None or 2 * size > free:
            return None
        return cls(tensors)

    def __init__(self, tensors: list[torch.Tensor]):
        # (original, (version, address) before the copy, copy): the state is read first, so a change
        # made during the copy shows as a newer version
        with torch.no_grad():
            items = [(t, _state(t), torch.empty_like(t, memory_format=torch.preserve_format)) for t in tensors]
        self._groups, group, size = [], [], 0
        for item in items:
            group.append(item)
            size += item[0].numel() * item[0].element_size()
            if size >= _GROUP:
                self._groups.append(group)
                group, size = [], 0
        self._groups += [group] if group else []
        self._copied: list[list] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fxsurgery-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread: a copy of a parameter must not join its graph
                for group in self._groups:
                    if self._stop.is_set():
                        return
                    torch._foreach_copy_([c for _, _, c in group], [t.detach() for t, _, _ in group])
                    self._copied.append(group)
        except Exception:  # out of memory, say: what was not copied ahead is copied at transfer
            return

    def take(self) -> dict[int, tuple]:
        """The copies made (the thread finished first), by id of the original; each may be used once."""
        self._thread.join()
        made = {id(t): (t, state, copy) for group in self._copied for t, state, copy in group}
        self._groups, self._copied = [], []
        return made

    def close(self) -> None:
        """Stop early (the surgery failed, or did not use the copies) and free what was made."""
        self._stop.set()
        self._thread.join()
        self._groups, self._copied = [], []


def blank_from(made: dict, fallback, filled: set[int]):
    """A `blank` for assemble that hands out each copy made ahead once (a layer used twice gets a
    blank of its own for its second use), noting the storage of each in `filled`."""
    def blank(t: torch.Tensor) -> torch.Tensor:
        got = made.pop(id(t), None)
        if got is not None and got[0] is t and got[1] == _state(t):
            filled.add(got[2].data_ptr())
            return got[2]
        return fallback(t)
    return blank
