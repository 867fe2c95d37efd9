"""Move weights into the regenerated module and account for every tensor.

Each parameter and buffer of the new module is `transferred` (the original's
values, bit for bit), `adapted` (derived from original values, e.g. a cast)
or `new` (made by a rule that says so); each original tensor that is not used
is `dropped`. The original model is never modified: tensors are copied.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .._progress import bar
from .._util import shape_text
from ..errors import TransferError
from ..rewrite import Rewritten
from ..spec import Kept, carry, ranges
from ._assemble import _blank, assemble
from ._checkpoint import Checkpoint, empty_weights, read_state_dict, strip_prefixes
from ._conventions import follow_conventions
from ._dcp import DcpCheckpoint, open_checkpoint, refuse_dtensors
from ._freeze import follow_modes, freeze, freeze_derived, hold_norms
from ._hooks import carry_root_hooks, user_hooks
from ._lazycopy import lazy_blank
from ._ownload import refuse_own_loading, with_values
from ._pairwise import transfer_modules
from ._report import TransferReport, check_strict, entry, tensors_of
from ._stream import Missing, Read, Replayed, carry_streamed, pending_of, register
from ._stream import blank as stream_blank
from ._tying import Ties
from ._vocabulary import tie_flag

__all__ = [
    "Checkpoint", "DcpCheckpoint", "TransferReport", "carry_root_hooks", "empty_weights", "hold_norms", "open_checkpoint", "pending_of",
    "read_state_dict", "refuse_dtensors", "refuse_own_loading", "register", "strip_prefixes", "transfer", "transfer_modules", "user_hooks",
    "with_values",
]


def transfer(rewritten: Rewritten, *, strict: bool = False, copy: bool = True,
             weights: str | os.PathLike | Checkpoint | None = None, stream: bool = False) -> tuple[nn.Module, TransferReport]:
    """Build the new module, fill it with copies of the original tensors, freeze, and report.

    `copy=False`: the new module takes the original's tensors (no second copy
    in memory); the original is then consumed, and refuses to run.
    `weights`: a checkpoint of the original whose values fill the new module,
    read tensor by tensor (the original may then be built without weights,
    see `empty_weights`).
    `stream`: tensors read from `weights` stay on meta in the new module, each
    read when export writes it (_stream.py; `pending_of(module)`); without
    `weights`, a model built on meta gives the plan alone (it cannot be saved).
    Copies are lazy where torch allows (_lazycopy.py): they share the original's memory until either is written.
    """
    model = rewritten.capture.model
    checkpoint = None if weights is None else open_checkpoint(weights)
    if checkpoint is not None:
        refuse_own_loading(model, checkpoint)
        checkpoint.check(model)
    filled: set[int] = set()  # ids of the original tensors whose copies hold their values already (lazy copies)
    if stream:
        how = {"blank": stream_blank}
    elif copy and checkpoint is None:
        how = {"blank": lazy_blank(_blank, filled)}
    else:
        how = {}
    built = assemble(rewritten, share=not copy and checkpoint is None, **how)
    module = built.module
    kept, recipes, pending = {}, {}, {}
    originals = list(tensors_of(model))  # walked once: each walk of a large model costs milliseconds
    names: dict[int, list[str]] = {}
    for name, t, _ in originals:
        names.setdefault(id(t), []).append(name)
    if not copy and checkpoint is None:
        _consume(model)
    with torch.no_grad():
        if copy or checkpoint is not None:
            _fill(module, built, names, checkpoint, pending if stream else None, filled)
        # the configuration follows the edit; an adapter may add a module the weights policies then fill
        notes = follow_conventions(module, rewritten, built) if rewritten.capture.kept else []
        ties = Ties(names, module, built.copies)
        for path, new, old, rule, policy in built.keeps:
            kept.update(_carry(rewritten, path, new, old, rule, policy, checkpoint, ties, recipes, stream))
        derived_from = _derived(rewritten, built, kept, recipes, checkpoint, pending if stream else None)
        notes += tie_flag(module, model) if rewritten.capture.kept else []
    present = dict(module.named_modules(remove_duplicate=False))  # one walk, shared by the steps below
    rule_of = _maker(present, built.made_by)
    original_modules = dict(model.named_modules())
    freeze(rewritten, module, rule_of, present, original_modules, built.copies)
    freeze_derived(rewritten, built.derived, original_modules)
    for path in built.frozen:  # an adapter's base; gone when a later rule cut the model short
        for p in present[path].parameters() if path in present else ():
            p.requires_grad_(False)
    follow_modes(module, model, present, original_modules, built.made_by)

    report = TransferReport(rules={m.index: m.label for m in rewritten.plan.matches})
    if rewritten.capture.kept:
        report.notes = [f"result mode: kept class {type(module).__name__}", *notes]
    used: set[str] = set()
    for name, t, kind in tensors_of(module):
        frozen = kind == "parameter" and not t.requires_grad
        if id(t) in built.copies:
            sources = names[id(built.copies[id(t)][1])]
            source = name if name in sources else sources[0]
            used.add(source)
            report.entries.append(entry(name, t, kind, "transferred", source=source, frozen=frozen))
        elif id(t) in built.made_tensors:
            rule, sources, policy = built.made_tensors[id(t)]
            status = "adapted" if sources else "new"
            op = f"computed by {rewritten.rule_of(rule).label}" if sources else ""
            if isinstance(policy, Kept) and len(sources) == 1:  # sliced by Prune: the indices it keeps, replayable
                op, report.recipes[name] = _sliced(model, sources[0], t, policy, rewritten.rule_of(rule).label)
            report.entries.append(entry(name, t, kind, status, source=", ".join(sources) or None, rule=rule, op=op,
                                         frozen=frozen))
            derived_from.update(sources)
            used.update(sources)  # a tensor a rule sliced (Prune) names itself as its source
        elif id(t) in built.constants:
            report.entries.append(entry(name, t, kind, "transferred", source=name, op="constant captured from the forward code", frozen=frozen))
        elif id(t) in kept:
            source, rule, op = kept[id(t)]
            used.add(source)
            status = "adapted" if op else "transferred"
            report.entries.append(entry(name, t, kind, status, source=source, rule=rule,
                                         op=f"{op or 'kept'} by {rewritten.rule_of(rule).label}", frozen=frozen))
            if id(t) in recipes:
                report.recipes[name] = recipes[id(t)]
        else:
            report.entries.append(entry(name, t, kind, "new", rule=rule_of(name), frozen=frozen))
    prefixes = tuple(p + "." for p in derived_from)
    used.update(n for n, _, _ in originals if prefixes and n.startswith(prefixes))
    used.update(n for group in names.values() if used.intersection(group) for n in group)  # one tensor, tied: used at every path
    for name, t, kind in originals:
        if name not in used:
            report.entries.append(entry(name, t, kind, "dropped"))
    check_strict(report, strict)
    register(module, pending)
    return module, report


def _derived(rewritten: Rewritten, built, kept: dict, recipes: dict, checkpoint: Checkpoint | None, pending: dict | None) -> set[str]:
    """Tensors a pattern computed from original modules (a folded convolution):
    adapted, from those modules, whose tensors are then used, not dropped;
    with the pattern's recipe for recomputing them, where it has one."""
    sources_used: set[str] = set()
    model = rewritten.capture.model
    for path, made, sources, rule, computed in built.derived:
        label = rewritten.rule_of(rule).label
        recipe = getattr(getattr(rewritten.rule_of(rule).rule, "pattern", None), "recipe", None)
        try:
            how = recipe(*[model.get_submodule(s) for s in sources]) if recipe is not None else None
        except AttributeError:
            how = None
        for name, t, _ in list(tensors_of(made)):
            if computed is not None and name not in computed and id(t) not in built.copies:
                continue  # made afresh by the rewrite, not from the match (a new layer at its init): reported new
            if how and name in how:
                recipes[id(t)] = _resolved(how[name], sources, model)
            if id(t) in built.copies:
                continue  # an original tensor it kept: transferred like any other
            if id(t) in recipes and checkpoint is not None and not t.is_meta:
                with torch.no_grad():  # the checkpoint's values, not the model's own: weights= gives the original's values
                    t.copy_(Replayed(checkpoint, recipes[id(t)], t.shape, t.dtype)())
            elif t.is_meta and id(t) in recipes and (checkpoint is not None or pending is not None):
                t = _computed(made, name, t, recipes, checkpoint, pending)  # from the checkpoint, as map-weights would
            elif t.is_meta:
                raise TransferError(f"{label}: {path}.{name} is computed from {', '.join(sources)}, which have no values "
                                    "(the model was built without weights); fix: load the weights into the model "
                                    "before this rule, or leave the rule out")
            elif checkpoint is not None:
                raise TransferError(f"{label}: {path}.{name} is computed from the model's own {', '.join(sources)}, not weights= "
                                    "(its pattern has no recipe); fix: load the checkpoint into the model and apply without weights=")
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


def _maker(modules: dict[str, nn.Module], made_by: dict[int, int]):
    """name -> the rule that made the module holding that tensor (or module), else None;
    `modules` lists every path of the new module (named_modules without removing duplicates)."""
    made = {path: made_by[id(sub)] for path, sub in modules.items() if id(sub) in made_by}

    def rule_of(name: str) -> int | None:
        parts = name.split(".")
        for i in range(len(parts), -1, -1):
            rule = made.get(".".join(parts[:i]))
            if rule is not None:
                return rule
        return None
    return rule_of


def _fill(module: nn.Module, built, names: dict[int, list[str]], checkpoint: Checkpoint | None,
          pending: dict | None, filled: set[int] = frozenset()) -> None:
    """Copy each original tensor that reached the new module into its blank copy;
    from the checkpoint where one is given (one shard open at a time); when
    streaming (`pending`), a tensor the checkpoint holds is only noted, read at save.
    `names`: id(original tensor) -> its names in the original; `filled`: ids of originals whose copies hold their values."""
    wanted: dict[str, list[torch.Tensor]] = {}
    done = set()
    listed = list(tensors_of(module))
    for _, t, _ in bar(listed, "transfer", total=len(listed), unit="tensor"):
        if id(t) not in built.copies or id(t) in done:
            continue
        done.add(id(t))
        original = built.copies[id(t)][1]
        stored = [n for n in names.get(id(original), []) if checkpoint is not None and n in checkpoint.keys]
        if stored:
            wanted.setdefault(stored[0], []).append(t)
        elif original.is_meta and pending is not None:  # a plan without weights: saving it says what is missing
            pending[id(t)] = Missing(names.get(id(original), ["a tensor"])[0])
        elif original.is_meta:
            raise TransferError(f"{names.get(id(original), ['a tensor'])[0]} has no values (the model was built without "
                                "weights) and the checkpoint has none for it; fix: pass a checkpoint that holds it")
        elif id(original) not in filled:  # data_ptr() here would make a lazy copy copy its bytes
            t.copy_(original)
    if pending is not None:
        pending.update({id(t): Read(checkpoint, name) for name, ts in wanted.items() for t in ts})
    elif checkpoint is not None:
        for name, value in bar(checkpoint.read(wanted), "read checkpoint", total=len(wanted), unit="tensor"):
            for t in wanted[name]:
                t.copy_(value)


def _computed(made: nn.Module, name: str, t: torch.Tensor, recipes: dict, checkpoint: Checkpoint | None,
              pending: dict | None) -> torch.Tensor:
    """A derived tensor of a model built without weights: computed by its recipe from the checkpoint when the
    output is written (stream) or now, in the module's place of the meta one."""
    recipe = recipes[id(t)]
    if pending is not None:
        pending[id(t)] = Missing(name) if checkpoint is None else Replayed(checkpoint, recipe, t.shape, t.dtype)
        return t
    value = Replayed(checkpoint, recipe, t.shape, t.dtype)()
    owner, _, attr = name.rpartition(".")
    owner = made.get_submodule(owner)
    if attr in owner._parameters:
        value = nn.Parameter(value, requires_grad=t.requires_grad)
        owner._parameters[attr] = value
    else:
        owner._buffers[attr] = value
    recipes[id(value)] = recipes.pop(id(t))
    return value


def _resolved(recipe: dict, sources, model: nn.Module) -> dict:
    """A recipe's reads (matched module index, tensor name) as names of the original's tensors,
    with the shape and dtype each had."""
    reads, read = {}, {}
    for role, (i, name) in recipe["reads"].items():
        t = getattr(model.get_submodule(sources[i]), name)
        reads[role] = f"{sources[i]}.{name}"
        read[reads[role]] = [list(t.shape), str(t.dtype).replace("torch.", "")]
    return {**recipe, "reads": reads, "read": read}


def _carry(rewritten: Rewritten, path: str, new: nn.Module, old: nn.Module, rule: int, policy,
           checkpoint: Checkpoint | None, ties: Ties, recipes: dict, stream: bool = False) -> dict:
    """The replaced module's tensors into the replacement, as the rule's weights policy says;
    a tensor the original shares with another path stays shared (_tying.py)."""
    original = {n: t for n, t, _ in tensors_of(old)}
    identity = dict(original)
    prefix = next((p for p, m in rewritten.capture.model.named_modules() if m is old), path)
    stored = {}
    if checkpoint is not None:  # the replaced module may have no values of its own: read them
        stored = {n: f"{prefix}.{n}" for n in original if f"{prefix}.{n}" in checkpoint.keys}
    if checkpoint is not None and not stream:
        original.update({n: v for n, v in ((n, dict(checkpoint.read([k]))[k]) for n, k in stored.items())})
    label = rewritten.rule_of(rule).label
    carried = {}
    for name, t, _ in list(tensors_of(new)):
        src = original.get(name)
        tied, note = ties.keep(label, path, new, name, t, identity[name], policy) if src is not None else (False, "")
        if tied:
            continue  # the new module's copy of the shared tensor: transferred like any other
        try:
            if src is None:
                raise ValueError("the replaced module has nothing there")
            op = (carry_streamed(policy, checkpoint, stored[name], src, t, name_in_new=name) if stream and name in stored
                  else carry(policy, src, t, name=name))
            if not op and policy == "keep":
                ties.carried(identity[name], t)
            op = f"{op} ({note})" if op and note else op or note
            if note:  # GPT-2's lm_head keeps the full vocabulary beside a trimmed wte: said, not only in the report
                partner = note.removeprefix("untied from ")
                rewritten.plan.warnings.append(
                    f"{label}: {path}.{name} and {partner} are one tensor in the original; its weights policy makes a new "
                    f"{path}.{name}, so they are untied ({partner} keeps the original's); fix: replace {partner.rpartition('.')[0] or partner} "
                    "too to keep them one tensor (a kept transformers model trims both)")
        except ValueError as exc:
            shown = policy if isinstance(policy, str) else "select"
            fix = ("use weights: new" if policy == "keep" else exc.args[1] if len(exc.args) > 1
                   else "choose another weights policy, or weights: new")
            raise TransferError(f"{label}: weights '{shown}' cannot fill {path}.{name} {shape_text(t.shape)}: {exc.args[0]}; "
                                f"fix: {fix}") from None
        carried[id(t)] = (f"{path}.{name}", rule, op)
        if op:  # how map-weights makes it again from another checkpoint
            recipes[id(t)] = {"op": "policy", "policy": _recorded(policy, name),
                              "reads": {"src": f"{prefix}.{name}"},
                              "read": {f"{prefix}.{name}": [list(src.shape), str(src.dtype).replace("torch.", "")]}}
    return carried


def _sliced(model: nn.Module, source: str, t: torch.Tensor, policy: Kept, label: str) -> tuple[str, dict]:
    """A tensor the graph reads, sliced by Prune (a layer scale): its op names the kept indices; its recipe replays them."""
    src = dict((n, v) for n, v, _ in tensors_of(model))[source]
    op = "; ".join(f"dim {a} keeps {len(k)} of {src.shape[a]}: [{ranges(k)}]" for a, k in sorted(policy.axes[""].items()))
    recipe = {"op": "policy", "policy": _recorded(policy, ""), "reads": {"src": source},
              "read": {source: [list(src.shape), str(src.dtype).replace("torch.", "")]}}
    return f"{op} by {label}", recipe


def _recorded(policy, name: str):
    """A weights policy as surgery.json holds it: a name, the rows selected, or (Prune) the indices kept per axis."""
    if isinstance(policy, Kept):
        return {"kept": {str(axis): list(kept) for axis, kept in policy.axes.get(name, {}).items()}}
    return {"select": list(policy["select"])} if isinstance(policy, dict) else policy


