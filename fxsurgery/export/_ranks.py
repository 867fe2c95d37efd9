"""Several processes writing one output: torchrun's ranks, each writing its share of the shards.

Every rank runs the same surgery (a streamed plan is cheap: the values are
read when written) and writes the shards k with k % N == rank. Rank 0 writes
model.py, graph.json, the index and surgery.json into the temporary directory
that becomes the output (_atomic.py); rank r > 0 writes its shards, and a file
of their sha256, into a directory of its own beside the target,
`.{name}.fxsurgery-tmp-{token}`, named from the launch (MASTER_ADDR,
MASTER_PORT, TORCHELASTIC_RUN_ID), the target and r, so rank 0 knows it
without being told. The ranks meet once, at a barrier (gloo) after their
shards are on disk; then rank 0 renames the other ranks' shards into its
directory (same parent: no copy), writes surgery.json and moves the whole
into place. A rank that fails, or is killed, before the barrier leaves only
hidden temporary directories, which the failing rank, rank 0, or the next
run at the target (`recover`) removes: nothing half-written appears at the target.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import shutil
from datetime import timedelta
from pathlib import Path

from ..errors import SaveError

HASHES = ".fxsurgery-rank-shards.json"
_ACTIVE: contextvars.ContextVar = contextvars.ContextVar("fxsurgery_ranks", default=None)


class Ranks:
    """This process's rank among `size` processes writing one output (torchrun's environment)."""

    def __init__(self, rank: int, size: int, launch: str):
        self.rank, self.size, self.launch = rank, size, launch
        self.target: Path | None = None

    @classmethod
    def from_env(cls) -> Ranks | None:
        """The ranks torchrun set (RANK, WORLD_SIZE); None for a single process."""
        try:
            size = int(os.environ.get("WORLD_SIZE", "1"))
            rank = int(os.environ.get("RANK", "0"))
        except ValueError:
            raise SaveError(f"RANK={os.environ.get('RANK')!r} WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: not integers; "
                            "fix: launch with torchrun --nproc-per-node N, which sets them") from None
        if size <= 1:
            return None
        missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
        if not 0 <= rank < size or missing:
            why = f"RANK={rank} is not below WORLD_SIZE={size}" if missing == [] else f"{' and '.join(missing)} not set"
            raise SaveError(f"{why}: the ranks cannot meet; fix: launch with torchrun --nproc-per-node N, which sets them")
        launch = ":".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))
        return cls(rank, size, launch)

    def token(self, target: Path, rank: int) -> str:
        """The same 16 hex digits in every rank: a live launch holds its master port, so no other run shares them."""
        text = f"{self.launch}\0{Path(os.path.abspath(target))}\0{self.size}\0{rank}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def seed(self) -> int:
        """A seed every rank of this launch derives alike (new tensors' initial values must agree)."""
        return int(hashlib.sha256(self.launch.encode()).hexdigest()[:15], 16)

    def tokens(self, target: Path) -> set[str]:
        return {self.token(target, r) for r in range(1, self.size)}

    def share(self, target: Path, rank: int) -> Path:
        """The directory rank `rank` > 0 writes its shards into."""
        target = Path(target)
        return target.parent / f".{target.name}.fxsurgery-tmp-{self.token(target, rank)}"

    def barrier(self) -> None:
        """Wait until every rank has its shards on disk (gloo: no accelerator needed)."""
        import torch.distributed as dist
        try:
            own = not dist.is_initialized()
            if own:
                dist.init_process_group("gloo", rank=self.rank, world_size=self.size, timeout=timedelta(hours=2))
            group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
            dist.barrier(group=group)
            if own:
                dist.destroy_process_group()
        except Exception as exc:  # a peer gone: gloo and the store report it in several ways
            raise SaveError(f"rank {self.rank} of {self.size}: another rank failed before its shards were written "
                            f"({type(exc).__name__}); fix: see that rank's error; nothing was written") from None


def active() -> Ranks | None:
    """The ranks writing the output being saved now (None: this process alone)."""
    return _ACTIVE.get()


@contextlib.contextmanager
def activated(ranks: Ranks | None, target: Path):
    if ranks is not None:
        ranks.target = Path(target)
    reset = _ACTIVE.set(ranks)
    try:
        yield
    finally:
        _ACTIVE.reset(reset)


def hand_over(work: Path, hashes: dict[str, str]) -> None:
    """Rank r > 0: record the shards written, flushed, for rank 0 to take."""
    (work / HASHES).write_text(json.dumps(hashes), encoding="utf-8")
    for name in [*hashes, HASHES]:
        with open(work / name, "rb") as handle:
            os.fsync(handle.fileno())


def discard(ranks: Ranks | None) -> None:
    """Rank 0 failed: remove the other ranks' directories (a rank still writing fails in turn)."""
    if ranks is None or ranks.target is None:
        return
    for r in range(1, ranks.size):
        shutil.rmtree(ranks.share(ranks.target, r), ignore_errors=True)
