"""Build the new module's structure: a blank copy of the original with the edits in place.

The original is copied whole, every tensor as an empty one of the same
shape, dtype and device (one copy per tensor, so ties stay ties). Each edited
graph becomes a GraphModule installed where its module was, calling the
copies of the original modules it uses; module edits for opaque code are
installed last. Values are filled in afterwards, only for tensors that made it
into the new module.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import fx, nn

from ..capture import clone, install_adapter, picklable, root_of
from ..match import join
from ..rewrite import Around, ModuleEdit, Rewritten


@dataclass
class Assembly:
    """The new module and where each of its tensors and modules came from."""

    module: nn.Module
    copies: dict[int, tuple[torch.Tensor, torch.Tensor]]   # id(blank) -> (blank, original)
    made_by: dict[int, int] = field(default_factory=dict)   # id(module a rule made) -> rule
    constants: set[int] = field(default_factory=set)        # ids of tensors captured from forward code
    keeps: list[tuple] = field(default_factory=list)  # (path, new, old, rule, policy): tensors a policy carries over
    wrappers: set[int] = field(default_factory=set)         # ids of the Around modules made here
    derived: list[tuple] = field(default_factory=list)  # (path, module, source paths, rule): tensors a pattern computed
    frozen: dict[str, int] = field(default_factory=dict)  # module path -> the pattern rule that freezes it
    made_tensors: dict[int, tuple] = field(default_factory=dict)  # id(tensor a rule made) -> (rule, source paths, policy)
    blank: Callable = None  # room for one tensor's values (a streamed result keeps meta tensors on meta)


def put(root: nn.Module, path: str, module: nn.Module) -> nn.Module:
    """Install `module` at `path` (the root itself when `path` is empty); returns the root."""
    if not path:
        return module
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    parent._modules[name] = module
    return root


def _constant(value: torch.Tensor) -> torch.Tensor:
    made = value.detach().clone()
    return nn.Parameter(made, requires_grad=value.requires_grad) if isinstance(value, nn.Parameter) else made


def _blank(t: torch.Tensor) -> torch.Tensor:
    """Room for a tensor's values; a model built without weights (meta) gets them on the CPU."""
    if t.is_meta:
        return torch.empty(t.shape, dtype=t.dtype)
    return torch.empty_like(t, memory_format=torch.preserve_format)


def assemble(rewritten: Rewritten, share: bool = False, blank: Callable = _blank) -> Assembly:
    """`share`: the new module takes the original's tensors themselves instead of blank copies;
    `blank` makes the room for a copy."""
    capture = rewritten.capture
    tensors = [t for sub in capture.model.modules() for t in [*sub._parameters.values(), *sub._buffers.values()]
               if t is not None]
    if share:
        memo: dict = {id(t): t for t in tensors}
        root = copy.deepcopy(capture.model, memo)
    else:
        memo = {}  # one memo for the whole model: a tensor tied across modules stays one tensor
        root = clone(capture.model, blank, memo)
    copies = {id(memo[id(t)]): (memo[id(t)], t) for t in tensors}
    built = Assembly(root, copies, blank=blank)
    for region in sorted(capture.regions, key=lambda r: (bool(r.path), r.path.count("."))):
        edited = rewritten.graphs[region.path]
        table = {}
        # a graph calls copies of the original's modules (they share its tensors): a module a rule
        # made may hold one of those, which must become the new module's copy too
        made = any(slot.rule is not None for slot in edited.modules.values())
        subs = _Submodules(region.model)  # one walk: get_submodule per slot was most of a transfer's time
        seen = {id(sub): memo[id(subs[path])] for path, sub in region.gm.named_modules()
                if path in subs and id(subs[path]) in memo} if made else {}
        copies_of = {**memo, **seen} if made else memo  # once per region: per made module it was quadratic
        for path, slot in edited.modules.items():
            if slot.rule is None:  # the graph calls a copy of the original; use the original's blank copy
                table[path] = memo[id(subs[slot.source])]
                continue
            table[path] = _adopt(slot.value, copies_of)
            built.made_by[id(table[path])] = slot.rule
            if slot.sources and slot.derived != frozenset():  # a rewrite that computed none of its tensors from the match: new
                built.derived.append((join(region.path, path), table[path],
                                      tuple(join(region.path, s) for s in slot.sources), slot.rule, slot.derived))
            if slot.weights != "new":
                built.keeps.append((join(region.path, path), slot.value, subs[slot.source],
                                    slot.rule, slot.weights))
        for path, slot in edited.tensors.items():
            if id(slot.value) in memo:
                table[path] = memo[id(slot.value)]
            elif slot.rule is not None:  # a tensor an inlined replacement holds: made by its rule
                table[path] = slot.value
                sources = tuple(join(region.path, s) for s in slot.sources) if slot.derived != frozenset() else ()
                built.made_tensors[id(slot.value)] = (slot.rule, sources, slot.weights)
            else:
                table[path] = _constant(slot.value)
                built.constants.add(id(table[path]))
        built.frozen.update({join(region.path, p): rule for p, rule in edited.frozen.items()})
        gm = picklable(fx.GraphModule(root_of(table), edited.graph, class_name=type(region.model).__name__))
        if region.call is not None:
            install_adapter(gm, region.call, region.path, _plain_attributes(memo[id(region.model)], gm))
        built.module = put(built.module, region.path, gm)
    for edit in rewritten.edits:
        _apply(built, edit, capture.model, memo)
    _keep_non_persistent(built, capture.model)
    return built


def _keep_non_persistent(built: Assembly, original: nn.Module) -> None:
    """A buffer the original keeps out of its state_dict (Llama's rotary inv_freq) stays out of the new one.

    A graph reads such a buffer with get_attr, and torch.fx registers what it
    copies as an ordinary (persistent) buffer: the mark is put back here. A
    constant captured from forward code was in no state_dict either.
    """
    hidden = {id(b) for sub in original.modules() for name, b in sub._buffers.items()
              if b is not None and name in sub._non_persistent_buffers_set}
    if not hidden and not built.constants:
        return
    for sub in built.module.modules():
        for name, b in sub._buffers.items():
            if b is not None and (id(b) in built.constants or id(built.copies.get(id(b), (None, b))[1]) in hidden):
                sub._non_persistent_buffers_set.add(name)


class _Submodules:
    """`root.get_submodule(path)` from one walk of the tree; a path the walk did not list
    (a module reachable only by attribute) is still looked up the slow way."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.paths = dict(root.named_modules(remove_duplicate=False))

    def __contains__(self, path: str) -> bool:
        try:
            self[path]
            return True
        except AttributeError:
            return False

    def __getitem__(self, path: str) -> nn.Module:
        found = self.paths.get(path)
        return found if found is not None else self.root.get_submodule(path)


def _adopt(module: nn.Module, memo: dict) -> nn.Module:
    """A module a rule made may hold modules or tensors of the original (a pattern that wraps
    one, or copies its structure): those become their copies, so the user's model is never part of the result."""
    if id(module) in memo:
        return memo[id(module)]
    for table in (module._parameters, module._buffers):
        for name, held in table.items():
            if held is not None and id(held) in memo:
                table[name] = memo[id(held)]
    for name, child in module._modules.items():  # an original child is swapped whole, never entered: it is the user's
        if child is not None:
            module._modules[name] = _adopt(child, memo)
    return module


_MODULE_STATE = set(vars(nn.Module())) | {"forward"}


def _plain_attributes(source: nn.Module, gm: fx.GraphModule) -> dict:
    """Opaque code may read plain attributes of a module a graph now stands for
    (RAFT reads `update_block.hidden_state_size`): the graph module gets those too."""
    return {name: value for name, value in vars(source).items()
            if name not in _MODULE_STATE and not name.startswith("_") and not hasattr(gm, name)}


def _rearrange(built: Assembly, edit: ModuleEdit) -> None:
    """Layer i of the new list is layer order[i]; a layer's second use is a blank copy of
    its own, whose tensors are filled from the same original tensors (transferred from it)."""
    layers = built.module.get_submodule(edit.path)
    used: set[int] = set()
    rearranged = []
    for at, i in enumerate(edit.order):
        if at == edit.inserted:  # a layer an Insert made
            built.made_by[id(edit.module)] = edit.rule
            rearranged.append(edit.module)
            continue
        layer = layers[i]
        if i in used:
            memo: dict = {}
            layer = clone(layer, built.blank, memo)
            built.copies.update({id(new): (new, built.copies[old][1]) for old, new in memo.items()
                                 if isinstance(new, torch.Tensor) and old in built.copies})
        used.add(i)
        rearranged.append(layer)
    built.module = put(built.module, edit.path, nn.Sequential(*rearranged) if isinstance(layers, nn.Sequential) else type(layers)(rearranged))


def _apply(built: Assembly, edit: ModuleEdit, original: nn.Module, memo: dict) -> None:
    if edit.kind == "layers":
        _rearrange(built, edit)
        return
    if edit.kind in ("replace", "delete"):
        made = _adopt(edit.module, memo)
        built.module = put(built.module, edit.path, made)
        built.made_by[id(made)] = edit.rule
        if edit.sources:
            built.derived.append((edit.path, made, edit.sources, edit.rule, edit.computed))
        built.frozen.update({join(edit.path, p): edit.rule for p in edit.freeze})
        if edit.weights != "new":
            built.keeps.append((edit.path, made, original.get_submodule(edit.path), edit.rule, edit.weights))
        return
    current = built.module.get_submodule(edit.path)
    for part in (edit.before, edit.after):
        if part is not None:
            built.made_by[id(part)] = edit.rule
    free = (isinstance(current, Around) and id(current) in built.wrappers
            and not (edit.before is not None and current.before is not None)
            and not (edit.after is not None and current.after is not None))
    if free:  # one wrapper per module while its slots last: names stay module.<...>
        current.before = edit.before if edit.before is not None else current.before
        current.after = edit.after if edit.after is not None else current.after
        current.cut_in, current.cut_out = current.cut_in or edit.cut_in, current.cut_out or edit.cut_out
        return
    wrapper = Around(current, edit.before, edit.after, edit.cut_in, edit.cut_out)
    built.wrappers.add(id(wrapper))
    built.module = put(built.module, edit.path, wrapper)
