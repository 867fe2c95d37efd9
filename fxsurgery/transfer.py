"""Move weights into the regenerated module and account for every tensor.

Each parameter and buffer of the new module is `transferred` (the original's
values, bit for bit), `adapted` (derived from original values, e.g. a cast)
or `new` (made by a rule that says so); each original tensor that is not used
is `dropped`. The original model is never modified: tensors are copied.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn

from .errors import TransferError
from .match import format_table, label
from .rewrite import Edited, Slot
from .shapes import clone, root_of, shape_text

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

    def counts(self) -> dict[str, int]:
        out = {s: len(self._names(s)) for s in STATUSES}
        out["frozen"] = len(self.frozen)
        return out

    def entry(self, name: str) -> Entry:
        return next(e for e in self.entries if e.name == name and e.status != "dropped")

    def to_dict(self) -> dict:
        entries = []
        for e in self.entries:
            d = asdict(e)
            d["shape"] = list(e.shape)
            entries.append(d)
        return {"counts": self.counts(), "entries": entries}

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
        lines = [format_table(rows)]
        for e in self.entries:
            if e.status == "transferred" and not e.op:
                continue
            why = {"new": f"made by {self.rules.get(e.rule, 'no rule')}" if e.rule else "no rule declared it",
                   "dropped": "not used by the new module",
                   "adapted": f"{e.op} from {e.source}",
                   "transferred": f"{e.op} from {e.source}"}[e.status]
            lines.append(f"  {e.status:<11} {e.name} {shape_text(e.shape)} {e.dtype}: {why}")
        return "\n".join(lines)


def _tensors(module: nn.Module):
    """(name, tensor, kind) for every parameter and buffer, ties listed at each path."""
    for name, t in module.named_parameters(remove_duplicate=False):
        yield name, t, "parameter"
    for name, t in module.named_buffers(remove_duplicate=False):
        yield name, t, "buffer"


def _entry(name, t, kind, status, **kw) -> Entry:
    return Entry(name, status, tuple(t.shape), str(t.dtype).replace("torch.", ""), kind, **kw)


def transfer(edited: Edited, *, strict: bool = False) -> tuple[fx.GraphModule, TransferReport]:
    """Build the regenerated module with copies of the original tensors, and report."""
    model = edited.captured.model
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(new) -> (new, original)

    def blank(t: torch.Tensor) -> torch.Tensor:
        made = torch.empty_like(t, memory_format=torch.preserve_format)
        copies[id(made)] = (made, t)
        return made

    memo: dict = {}  # one memo for all: a tensor tied across modules stays one tensor
    table, sources = {}, {}
    for path, slot in edited.modules.items():
        if slot.rule is None:
            table[path] = clone(slot.value, blank, memo)
            sources[path] = slot.source
        else:
            table[path] = slot.value
    for path, slot in edited.tensors.items():
        table[path] = clone(_Holder(slot.value), blank, memo).value
    gm = fx.GraphModule(root_of(table), edited.graph, class_name=type(model).__name__)
    with torch.no_grad():
        for made, original in copies.values():
            made.copy_(original)
        for path, slot in edited.modules.items():
            if slot.keep:
                _keep(edited, path, slot, gm.get_submodule(path))
    for name in edited.frozen:
        gm.get_parameter(name).requires_grad_(False)
    originals = dict(model.named_modules())
    for path, sub in gm.named_modules():
        if path not in table:  # containers follow the original's mode; leaves kept their own
            sub.training = originals[path].training if path in originals else model.training

    report = TransferReport(rules={m.index: m.label for m in edited.plan.matches})
    used: set[str] = set()
    known = {n for n, _, _ in _tensors(model)}
    for name, t, kind in _tensors(gm):
        owner = _owner(name, edited)
        slot = edited.modules.get(owner) if owner in edited.modules else edited.tensors.get(name)
        frozen = kind == "parameter" and not t.requires_grad
        if slot is None or (slot.rule is not None and not slot.keep):
            rule = slot.rule if slot is not None else None
            report.entries.append(_entry(name, t, kind, "new", rule=rule, frozen=frozen))
            continue
        source = name if owner not in edited.modules else f"{slot.source}{name[len(owner):]}"
        used.add(source)
        op = f"kept by {label(slot.rule, edited.rule_of(slot.rule).rule)}" if slot.keep else ""
        if source not in known:
            op = "constant captured from the forward code"
        report.entries.append(_entry(name, t, kind, "transferred", source=source, rule=slot.rule if slot.keep else None, op=op, frozen=frozen))
    for name, t, kind in _tensors(model):
        if name not in used:
            report.entries.append(_entry(name, t, kind, "dropped"))
    _check_strict(report, strict)
    return gm, report


class _Holder(nn.Module):
    """Lets `clone` copy a lone tensor with the shared memo."""

    def __init__(self, value):
        super().__init__()
        if isinstance(value, nn.Parameter):
            self.value = value
        else:
            self.register_buffer("value", value)


def _owner(name: str, edited: Edited) -> str:
    """The module target of the new graph that holds tensor `name`."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in edited.modules:
            return prefix
    return ""


def _keep(edited: Edited, path: str, slot: Slot, module: nn.Module) -> None:
    """Replace(weights="keep"): copy the replaced module's tensors, names and shapes equal."""
    original = dict((n, t) for n, t, _ in _tensors(edited.captured.model.get_submodule(slot.source)))
    for name, t, _ in _tensors(module):
        src = original.get(name)
        if src is None or src.shape != t.shape:
            have = shape_text(src.shape) if src is not None else "nothing"
            raise TransferError(f"{label(slot.rule, edited.rule_of(slot.rule).rule)}: weights 'keep' cannot fill {path}.{name} {shape_text(t.shape)}: the replaced module has {have} there; fix: use weights: new")
        t.copy_(src)


def _check_strict(report: TransferReport, strict: bool) -> None:
    if not strict:
        return
    undeclared = [e.name for e in report.entries if e.status == "new" and e.rule is None]
    if undeclared:
        shown = ", ".join(undeclared[:5]) + (f" (+{len(undeclared) - 5} more)" if len(undeclared) > 5 else "")
        raise TransferError(f"strict: {len(undeclared)} tensors are new and no rule declared them: {shown}; fix: provide their weights or drop strict")


def transfer_modules(src: nn.Module, dst: nn.Module, *, strict: bool = False) -> TransferReport:
    """Copy every tensor of `src` into `dst` where names and shapes agree; report all.

    This is "filter the state dict by the new model's keys", done right: each
    tensor of `dst` is transferred (or adapted by a dtype cast) or new, each
    unused tensor of `src` is dropped, and nothing is silently left behind.
    """
    source = {n: t for n, t, _ in _tensors(src)}
    report = TransferReport()
    used = set()
    with torch.no_grad():
        for name, t, kind in _tensors(dst):
            s = source.get(name)
            frozen = kind == "parameter" and not t.requires_grad
            if s is None or s.shape != t.shape:
                op = f"source has {shape_text(s.shape)}" if s is not None else ""
                report.entries.append(_entry(name, t, kind, "new", op=op, frozen=frozen))
                continue
            t.copy_(s)
            used.add(name)
            if s.dtype != t.dtype:
                report.entries.append(_entry(name, t, kind, "adapted", source=name, op=f"cast {s.dtype} -> {t.dtype}".replace("torch.", ""), frozen=frozen))
            else:
                report.entries.append(_entry(name, t, kind, "transferred", source=name, frozen=frozen))
    for name, t, kind in _tensors(src):
        if name not in used:
            report.entries.append(_entry(name, t, kind, "dropped"))
    _check_strict(report, strict)
    return report
