"""Move weights into the regenerated module and account for every tensor.

Each parameter and buffer of the new module is `transferred` (the original's
values, bit for bit), `adapted` (derived from original values, e.g. a cast)
or `new` (made by a rule that says so); each original tensor that is not used
is `dropped`. The original model is never modified: tensors are copied.
"""

from __future__ import annotations

from collections import defaultdict
import os
from dataclasses import asdict, dataclass, field

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .errors import TransferError
from .assemble import assemble
from .checkpoint import Checkpoint
from .match import format_table, frozen_by
from .rewrite import Rewritten
from .shapes import shape_text
from .modules import StayEval, stays_eval
from .policies import carry
from .progress import bar
from .spec import Freeze

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


def transfer(rewritten: Rewritten, *, strict: bool = False, copy: bool = True,
             weights: str | os.PathLike | Checkpoint | None = None) -> tuple[nn.Module, TransferReport]:
    """Build the new module, fill it with copies of the original tensors, freeze, and report.

    `copy=False`: the new module takes the original's tensors (no second copy
    in memory); the original is then consumed, and refuses to run.
    `weights`: a checkpoint of the original whose values fill the new module,
    read tensor by tensor (the original may then be built without weights,
    see `empty_weights`).
    """
    model = rewritten.capture.model
    checkpoint = weights if isinstance(weights, Checkpoint) or weights is None else Checkpoint(weights)
    if checkpoint is not None:
        checkpoint.check({k: (tuple(v.shape), v.dtype) for k, v in model.state_dict(keep_vars=True).items()})
    built = assemble(rewritten, share=not copy and checkpoint is None)
    module = built.module
    kept = {}
    if not copy and checkpoint is None:
        _consume(model)
    with torch.no_grad():
        if copy or checkpoint is not None:
            _fill(module, built, model, checkpoint)
        for path, new, old, rule, policy in built.keeps:
            kept.update(_carry(rewritten, path, new, old, rule, policy, checkpoint))
        derived_from = _derived(rewritten, built, kept)
    rule_of = _maker(module, built.made_by)
    _freeze(rewritten, module, rule_of)
    present = dict(module.named_modules())
    for path in built.frozen:  # an adapter's base; gone when a later rule cut the model short
        for p in present[path].parameters() if path in present else ():
            p.requires_grad_(False)
    _follow_modes(module, model)

    report = TransferReport(rules={m.index: m.label for m in rewritten.plan.matches})
    names: dict[int, list[str]] = {}
    for name, t, _ in _tensors(model):
        names.setdefault(id(t), []).append(name)
    used: set[str] = set()
    for name, t, kind in _tensors(module):
        frozen = kind == "parameter" and not t.requires_grad
        if id(t) in built.copies:
            sources = names[id(built.copies[id(t)][1])]
            source = name if name in sources else sources[0]
            used.add(source)
            report.entries.append(_entry(name, t, kind, "transferred", source=source, frozen=frozen))
        elif id(t) in built.made_tensors:
            rule, sources = built.made_tensors[id(t)]
            status = "adapted" if sources else "new"
            op = f"computed by {rewritten.rule_of(rule).label}" if sources else ""
            report.entries.append(_entry(name, t, kind, status, source=", ".join(sources) or None, rule=rule, op=op,
                                         frozen=frozen))
            derived_from.update(sources)
        elif id(t) in built.constants:
            report.entries.append(_entry(name, t, kind, "transferred", source=name, op="constant captured from the forward code", frozen=frozen))
        elif id(t) in kept:
            source, rule, op = kept[id(t)]
            used.add(source)
            status = "adapted" if op else "transferred"
            report.entries.append(_entry(name, t, kind, status, source=source, rule=rule,
                                         op=f"{op or 'kept'} by {rewritten.rule_of(rule).label}", frozen=frozen))
        else:
            report.entries.append(_entry(name, t, kind, "new", rule=rule_of(name), frozen=frozen))
    used.update(n for n, _, _ in _tensors(model) if any(n.startswith(p + ".") for p in derived_from))
    for name, t, kind in _tensors(model):
        if name not in used:
            report.entries.append(_entry(name, t, kind, "dropped"))
    _check_strict(report, strict)
    return module, report


def _derived(rewritten: Rewritten, built, kept: dict) -> set[str]:
    """Tensors a pattern computed from original modules (a folded convolution):
    adapted, from those modules, whose tensors are then used, not dropped."""
    sources_used: set[str] = set()
    for path, made, sources, rule in built.derived:
        label = rewritten.rule_of(rule).label
        for name, t, _ in _tensors(made):
            if id(t) in built.copies:
                continue  # an original tensor it kept: transferred like any other
            if t.is_meta:
                raise TransferError(f"{label}: {path}.{name} is computed from {', '.join(sources)}, which have no values "
                                    "(the model was built without weights); fix: load the weights into the model "
                                    "before this rule, or leave the rule out")
            kept[id(t)] = (", ".join(sources), rule, "computed")
        sources_used.update(sources)
    return sources_used


class _Consumed:
    """A forward pre-hook on a model whose tensors a copy=False surgery took."""

    def __call__(self, module, args):
        raise RuntimeError("this model's tensors now belong to the result of a surgery made with copy=False; "
                           "use result.module")


def _consume(model: nn.Module) -> None:
    model.register_forward_pre_hook(_Consumed())
    model._fxsurgery_consumed = True


def _maker(module: nn.Module, made_by: dict[int, int]):
    """name -> the rule that made the module holding that tensor (or module), else None."""
    def rule_of(name: str) -> int | None:
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            try:
                holder = module.get_submodule(".".join(parts[:i]))
            except AttributeError:
                continue
            if id(holder) in made_by:
                return made_by[id(holder)]
        return None
    return rule_of


def _is_container(module: nn.Module) -> bool:
    return type(module) is nn.Module or isinstance(module, fx.GraphModule)


def _freeze(rewritten: Rewritten, module: nn.Module, rule_of) -> None:
    """Each Freeze rule acts on the new module's parameters, except those a later rule made."""
    originals = dict(rewritten.capture.model.named_modules())
    modules = dict(module.named_modules())

    def type_of(path):
        here = modules.get(path)
        if here is None or _is_container(here):
            return type(originals[path]) if path in originals else type(here)
        return type(here)

    params = dict(module.named_parameters(remove_duplicate=False))
    for m in rewritten.plan.matches:
        if isinstance(m.rule, Freeze):
            frozen, _ = frozen_by(m.rule, list(params), type_of)
            for name in frozen:
                maker = rule_of(name)
                if maker is None or maker < m.index:
                    params[name].requires_grad_(False)
                    params[name].grad = None
                    owner = modules.get(name.rpartition(".")[0])
                    if m.rule.bn == "eval" and isinstance(owner, _BatchNorm) and not stays_eval(owner):
                        owner.register_forward_pre_hook(StayEval())
                        owner.training = False


def _follow_modes(module: nn.Module, model: nn.Module) -> None:
    """Containers the assembly made take the original's train/eval mode; real modules keep theirs."""
    originals = dict(model.named_modules())
    for path, sub in module.named_modules():
        if _is_container(sub):
            sub.training = originals[path].training if path in originals else model.training


def _fill(module: nn.Module, built, model: nn.Module, checkpoint: Checkpoint | None) -> None:
    """Copy each original tensor that reached the new module into its blank copy;
    from the checkpoint where one is given (one shard open at a time)."""
    names: dict[int, list[str]] = {}
    for name, t, _ in _tensors(model):
        names.setdefault(id(t), []).append(name)
    wanted: dict[str, list[torch.Tensor]] = {}
    done = set()
    listed = list(_tensors(module))
    for _, t, _ in bar(listed, "transfer", total=len(listed), unit="tensor"):
        if id(t) not in built.copies or id(t) in done:
            continue
        done.add(id(t))
        original = built.copies[id(t)][1]
        stored = [n for n in names.get(id(original), []) if checkpoint is not None and n in checkpoint.keys]
        if stored:
            wanted.setdefault(stored[0], []).append(t)
        elif original.is_meta:
            raise TransferError(f"{names.get(id(original), ['a tensor'])[0]} has no values (the model was built without "
                                "weights) and the checkpoint has none for it; fix: pass a checkpoint that holds it")
        else:
            t.copy_(original)
    if checkpoint is not None:
        for name, value in bar(checkpoint.read(wanted), "read checkpoint", total=len(wanted), unit="tensor"):
            for t in wanted[name]:
                t.copy_(value)


def _carry(rewritten: Rewritten, path: str, new: nn.Module, old: nn.Module, rule: int, policy,
           checkpoint: Checkpoint | None = None) -> dict:
    """The replaced module's tensors into the replacement, as the rule's weights policy says."""
    original = {n: t for n, t, _ in _tensors(old)}
    if checkpoint is not None:  # the replaced module may have no values of its own: read them
        prefix = next((p for p, m in rewritten.capture.model.named_modules() if m is old), path)
        stored = {n: f"{prefix}.{n}" for n in original if f"{prefix}.{n}" in checkpoint.keys}
        original.update({n: v for n, v in ((n, dict(checkpoint.read([k]))[k]) for n, k in stored.items())})
    label = rewritten.rule_of(rule).label
    carried = {}
    for name, t, _ in _tensors(new):
        src = original.get(name)
        try:
            if src is None:
                raise ValueError("the replaced module has nothing there")
            op = carry(policy, src, t)
        except ValueError as exc:
            shown = policy if isinstance(policy, str) else "select"
            fix = "use weights: new" if policy == "keep" else "choose another weights policy, or weights: new"
            raise TransferError(f"{label}: weights '{shown}' cannot fill {path}.{name} {shape_text(t.shape)}: {exc}; fix: {fix}") from None
        carried[id(t)] = (f"{path}.{name}", rule, op)
    return carried


def _check_strict(report: TransferReport, strict: bool) -> None:
    if not strict:
        return
    undeclared = [e.name for e in report.entries if e.status == "new" and e.rule is None]
    if undeclared:
        shown = ", ".join(undeclared[:5]) + (f" (+{len(undeclared) - 5} more)" if len(undeclared) > 5 else "")
        raise TransferError(f"strict: {len(undeclared)} tensors are new and no rule declared them: {shown}; fix: provide their weights or drop strict")
