"""The transfer report: one entry per tensor, transferred, adapted, new or dropped, with where it came from."""

from __future__ import annotations

import difflib
from collections import defaultdict
from dataclasses import asdict, dataclass, field

from torch import nn

from .._util import format_table, shape_text
from ..errors import TransferError

STATUSES = ("transferred", "adapted", "new", "dropped")


@dataclass(frozen=True)
class Entry:
    """The fate of one tensor."""

    name: str
    status: str
    shape: tuple
    dtype: str
    kind: str = "parameter"           # parameter | buffer
    source: str | None = None         # the original tensor it came from
    rule: int | None = None           # the rule that made it (new) or kept it
    op: str = ""                      # how it was derived (adapted)
    frozen: bool = False


@dataclass
class TransferReport:
    """Tensor by tensor: transferred, adapted, new, dropped, and which are frozen."""

    entries: list[Entry] = field(default_factory=list)
    rules: dict[int, str] = field(default_factory=dict)  # rule number -> label
    notes: list[str] = field(default_factory=list)        # the result mode, and what followed the edit (configuration)
    recipes: dict[str, dict] = field(default_factory=dict)  # adapted tensor -> how to make it again (map-weights)

    def _names(self, status: str) -> list[str]:
        return [e.name for e in self.entries if e.status == status]

    @property
    def transferred(self) -> list[str]:
        return self._names("transferred")

    @property
    def adapted(self) -> list[str]:
        return self._names("adapted")

    @property
    def new(self) -> list[str]:
        return self._names("new")

    @property
    def dropped(self) -> list[str]:
        return self._names("dropped")

    @property
    def frozen(self) -> list[str]:
        return [e.name for e in self.entries if e.frozen]

    def join_mode(self, other: "TransferReport", present: set[str]) -> None:
        """Take in the other mode's report where the result joined its graph: a tensor only that mode reads (a
        BatchNorm's num_batches_tracked, counted in training only) is in the result, not dropped."""
        theirs = {e.name: e for e in other.entries if e.status != "dropped"}
        listed = {e.name for e in self.entries if e.status != "dropped"}  # a new head's weight has an old one's name
        taken = {e.name for e in self.entries if e.status == "dropped" and e.name in present and e.name in theirs and e.name not in listed}
        self.entries = [theirs[e.name] if e.status == "dropped" and e.name in taken else e for e in self.entries]
        self.entries += [e for name, e in theirs.items() if name in present and name not in listed and name not in taken]
        self.recipes.update({k: v for k, v in other.recipes.items() if k in present and k not in self.recipes})

    def counts(self) -> dict[str, int]:
        out = {s: len(self._names(s)) for s in STATUSES}
        out["frozen"] = len(self.frozen)
        return out

    def entry(self, name: str) -> Entry:
        """The fate of the new module's tensor `name`, else of the original's (dropped) tensor of that name."""
        for dropped in (False, True):
            found = next((e for e in self.entries if e.name == name and (e.status == "dropped") == dropped), None)
            if found is not None:
                return found
        nearest = difflib.get_close_matches(name, list(dict.fromkeys(e.name for e in self.entries)), n=3, cutoff=0.6)
        raise KeyError(f"no tensor {name!r} in the new module or the original" + (f"; closest: {', '.join(nearest)}" if nearest else ""))

    def to_dict(self) -> dict:
        entries = []
        for e in self.entries:
            d = asdict(e)
            d["shape"] = list(e.shape)
            entries.append(d)
        return {"counts": self.counts(), "notes": list(self.notes), "entries": entries, "recipes": dict(self.recipes)}

    def table(self) -> str:
        """A row per top-level module with counts, then a line per tensor that is not plainly transferred."""
        groups: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for e in self.entries:
            top = e.name.split(".")[0] if "." in e.name else "(root)"
            groups[top][e.status] += 1
            groups[top]["frozen"] += e.frozen
        rows = [("module", *STATUSES, "frozen")]
        for top, c in groups.items():
            rows.append((top, *(str(c[s]) for s in STATUSES), str(c["frozen"])))
        c = self.counts()
        rows.append(("total", *(str(c[s]) for s in STATUSES), str(c["frozen"])))
        lines = [*self.notes, format_table(rows)]
        # one line per tensor, but a run of tensors one rule made the same way (a fold over 53 convolutions)
        # is summarised after its first few: --json lists each
        groups: dict[tuple, list[str]] = {}
        for e in self.entries:
            if e.status == "transferred" and not e.op:
                continue
            why = {"new": f"made by {self.rules.get(e.rule, 'no rule')}" if e.rule else "no rule declared it",
                   "dropped": "not used by the new module",
                   "adapted": f"{e.op} from {e.source}",
                   "transferred": f"{e.op} from {e.source}"}[e.status]
            key = (e.status, e.op if e.status in ("adapted", "transferred") else why)
            groups.setdefault(key, []).append(f"  {e.status:<11} {e.name} {shape_text(e.shape)} {e.dtype}: {why}")
        for (status, _), group in groups.items():
            lines += group if len(group) <= SHOWN + 2 else [
                *group[:SHOWN], f"  {status:<11} ... and {len(group) - SHOWN} more the same way (--json lists each)"]
        return "\n".join(lines)


SHOWN = 4  # lines of a run of alike tensors shown before the summary


def tensors_of(module: nn.Module):
    """(name, tensor, kind) for every parameter and buffer, ties listed at each path."""
    for name, t in module.named_parameters(remove_duplicate=False):
        yield name, t, "parameter"
    for name, t in module.named_buffers(remove_duplicate=False):
        yield name, t, "buffer"


def entry(name, t, kind, status, **kw) -> Entry:
    return Entry(name, status, tuple(t.shape), str(t.dtype).replace("torch.", ""), kind, **kw)


def check_strict(report: TransferReport, strict: bool) -> None:
    if not strict:
        return
    undeclared = [e.name for e in report.entries if e.status == "new" and e.rule is None]
    if undeclared:
        shown = ", ".join(undeclared[:5]) + (f" (+{len(undeclared) - 5} more)" if len(undeclared) > 5 else "")
        raise TransferError(f"strict: {len(undeclared)} tensors are new and no rule declared them: {shown}; fix: provide their weights or drop strict")


