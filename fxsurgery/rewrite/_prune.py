"""Prune: remove channels of the selected layers and of every tensor axis coupled to them.

The dependency group of each selected layer's output (match's `group_of`)
says which axes of which tensors lose which positions. Each module it touches
is swapped for a copy of itself with the smaller tensors (filled by the
transfer stage from the original's, keeping the listed indices: `Kept`); a
tensor the graph reads directly (layer scale) is sliced here; a split or
chunk along the channels gets its new piece sizes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..errors import RuleError
from ..match import Match, Site, Unprunable, group_of
from ..spec import Kept
from ._edited import Slot


def prune(editor, m: Match, sites: list[Site]) -> None:
    """Apply a Prune rule to one graph (the editor's)."""
    rule = m.rule
    if editor.dirty:
        editor.repropagate()
    shapes = editor.edited.shapes
    if not shapes:
        editor.fail(m, sites[0], "pruning follows the channels by their shapes, which are not known",
                    "pass example inputs (example_inputs= or --input)")
    modules = {t: s.value for t, s in editor.edited.modules.items()}
    cuts: dict[tuple, set] = {}
    splits: dict[str, tuple] = {}
    chosen: dict[frozenset, tuple] = {}
    for site in sites:
        node = editor.node(site.nodes[0])
        try:
            group = group_of(editor.graph, node.name, modules, shapes)
        except Unprunable as err:
            if rule.optional:
                m.skipped.append(f"{site.where}: {err} (group left alone)")
                continue
            editor.fail(m, site, f"the output channels of '{site.path or node.name}' cannot be removed: {err}",
                        "select another layer, or add optional=True to leave such groups alone")
        if rule.neurons is not None and not isinstance(modules[node.target], nn.Linear):
            editor.fail(m, site, f"neurons= prunes a Linear layer's outputs, and '{site.path}' is a {type(modules[node.target]).__name__}",
                        "use channels= for a convolution")
        try:
            channels = tuple(rule.choose(modules[node.target], group.width, site.path or node.name))
        except RuleError as err:
            editor.fail(m, site, err.problem.split(": ", 1)[1], "choose indices that exist, and keep at least one")
        earlier = chosen.setdefault(group.key, (channels, site))
        if earlier[0] != channels:
            editor.fail(m, site, f"'{site.path}' shares its channels with '{earlier[1].path}' (one group), which loses others",
                        "select one layer of the group")
        if earlier[1] is not site:
            continue
        for key, positions in group.removed(channels).items():
            cuts.setdefault(key, set()).update(positions)
        for name, axis in group.splits.items():
            dim, index = group.members[editor.node(name).args[0].name]
            splits.setdefault(name, (axis, set()))[1].update(p for c in channels for p in index[c])
    _shrink_modules(editor, m, cuts)
    _resize_splits(editor, m, splits)
    editor.dirty = True


def _shrink_modules(editor, m: Match, cuts: dict[tuple, set]) -> None:
    by_target: dict[str, dict[str, dict[int, set]]] = {}
    for (target, param, axis), positions in cuts.items():
        if positions:
            by_target.setdefault(target, {}).setdefault(param, {})[axis] = positions
    for target, params in by_target.items():
        if "" in params:  # a tensor the graph reads itself: sliced here, reported as computed from the original
            slot = editor.edited.tensors[target]
            value, kept = slot.value, {}
            for axis, positions in params[""].items():
                kept[axis] = tuple(i for i in range(value.shape[axis]) if i not in positions)
                value = value.index_select(axis, torch.tensor(kept[axis], device=value.device))
            made = nn.Parameter(value.detach().clone(), requires_grad=slot.value.requires_grad) \
                if isinstance(slot.value, nn.Parameter) else value.detach().clone()
            kept = _compose(slot.weights.axes, {"": kept}) if isinstance(slot.weights, Kept) else {"": kept}
            editor.edited.tensors[target] = Slot(made, slot.source, m.index, weights=Kept(kept), sources=(slot.source,))
            continue
        slot = editor.edited.modules[target]
        new, kept = shrink(slot.value, params)
        if isinstance(slot.weights, Kept):  # pruned before: positions count in the original
            kept = _compose(slot.weights.axes, kept)
        editor.edited.modules[target] = Slot(new, slot.source, m.index, weights=Kept(kept))


def _compose(before: dict, now: dict) -> dict:
    out = {name: dict(axes) for name, axes in before.items()}
    for name, axes in now.items():
        for axis, kept in axes.items():
            old = out.setdefault(name, {}).get(axis)
            out[name][axis] = tuple(old[i] for i in kept) if old is not None else kept
    return out


_COUNTS = {nn.Conv1d: ("in_channels", "out_channels"), nn.Conv2d: ("in_channels", "out_channels"),
           nn.Conv3d: ("in_channels", "out_channels"), nn.Linear: ("in_features", "out_features")}


def shrink(module: nn.Module, params: dict[str, dict[int, set]]) -> tuple[nn.Module, dict]:
    """A copy of `module` whose tensors lose the given positions (blank: the transfer fills them),
    its size attributes updated; and, per tensor, the indices each sliced axis keeps."""
    new = copy.copy(module)
    new._parameters, new._buffers, new._modules = dict(module._parameters), dict(module._buffers), dict(module._modules)
    kept: dict[str, dict[int, tuple]] = {}
    for store in (new._parameters, new._buffers):
        for name, t in store.items():
            if t is None:
                continue
            shape = list(t.shape)
            for axis, positions in params.get(name, {}).items():
                kept.setdefault(name, {})[axis] = tuple(i for i in range(shape[axis]) if i not in positions)
                shape[axis] = len(kept[name][axis])
            blank = torch.empty(shape, dtype=t.dtype, device="cpu" if t.is_meta else t.device)
            store[name] = nn.Parameter(blank, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else blank
    weight = new._parameters.get("weight")
    counts = next((v for k, v in _COUNTS.items() if isinstance(module, k)), None)
    if counts is not None:
        depthwise = isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1
        out = weight.shape[0]
        inputs = out // (module.out_channels // module.in_channels) if depthwise else weight.shape[1]
        setattr(new, counts[0], inputs)
        setattr(new, counts[1], out)
        if depthwise:
            new.groups = inputs
    elif isinstance(module, nn.modules.batchnorm._BatchNorm):
        new.num_features = new._buffers["running_mean"].shape[0] if new._buffers.get("running_mean") is not None \
            else weight.shape[0]
    elif isinstance(module, nn.GroupNorm):
        new.num_channels = new.num_groups = weight.shape[0]
    return new, kept


def _resize_splits(editor, m: Match, splits: dict[str, tuple]) -> None:
    """A split or chunk along the channels: torch.split with each piece's new size."""
    for name, (axis, removed) in splits.items():
        node = editor.node(name)
        pieces = sorted((u for u in node.users), key=lambda u: u.args[1])
        sizes, start = [], 0
        for u in pieces:
            width = editor.edited.shapes[u.name].shape[axis]
            sizes.append(sum(1 for p in range(start, start + width) if p not in removed))
            start += width
        node.op, node.target = "call_function", torch.split
        node.args, node.kwargs = (node.args[0], sizes), {"dim": axis}
        node.meta["fxs_rule"] = m.index
