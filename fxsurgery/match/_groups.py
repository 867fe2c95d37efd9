"""Dependency groups: the tensors that must lose the same channels when a layer loses output channels.

A group starts at a Conv/Linear output and follows the channels through the
captured graph, forward to every reader and backward to every other writer
(the other side of a residual add, the inputs of a concat): normalisation
parameters, depthwise convolutions, channel-wise parameters (layer scale) and
the input channels of the next Conv/Linear (after a flatten, each channel's
block of features). Each value a group reaches maps group channel i to the
positions it holds there (`index[i]`: a concat shifts them, a split keeps the
ones that fall in its piece, a flatten multiplies them).

Removing channels is exact (the result equals the original with those
channels zeroed at their source) only if every op on the way maps a zero
channel to zero and keeps channels apart; anything else is refused with the
node and the reason (`Unprunable`): a model output or input, a reshape that
mixes channels, normalisation over the channels, an op this analysis does not
know (opaque code included).
"""

from __future__ import annotations

import networkx as nx
import torch
from torch import fx, nn

from ._channels import CONV, Walk
from ._groupdata import Group, Unprunable


def group_of(graph: fx.Graph, node: str, modules: dict, shapes: dict) -> Group:
    """The dependency group of `node`'s output channels (a Conv or Linear call), or Unprunable."""
    walk = Walk(graph, modules, shapes)
    return walk.group(walk.by_name[node])


def groups(graph: fx.Graph, modules: dict, shapes: dict) -> list[tuple[list[str], Group | Unprunable]]:
    """Every Conv/Linear output's group, each group once: ([layers whose outputs it holds], group or refusal).

    Layers whose groups share a tensor axis (both sides of a residual add) form one entry;
    networkx finds them as connected components.
    """
    found: dict[str, Group | Unprunable] = {}
    for n in graph.nodes:
        if n.op == "call_module" and isinstance(modules.get(n.target), (*CONV, nn.Linear)):
            try:
                found[n.name] = group_of(graph, n.name, modules, shapes)
            except Unprunable as err:
                found[n.name] = err
    links = nx.Graph()
    links.add_nodes_from(found)
    owner: dict = {}
    for name, g in found.items():
        if isinstance(g, Group):
            for key, s in g.slices.items():
                if s.source:
                    links.add_edge(name, owner.setdefault(key, name))
    out = []
    for part in sorted(nx.connected_components(links), key=lambda c: min(_order(graph, n) for n in c)):
        names = sorted(part, key=lambda n: _order(graph, n))
        out.append((names, found[names[0]]))
    return out


def _order(graph: fx.Graph, name: str) -> int:
    for i, n in enumerate(graph.nodes):
        if n.name == name:
            return i
    return -1


def zeroed(model: nn.Module, group: Group, channels, prefix: str = "") -> nn.Module:
    """The exactness reference: `model` with group channels `channels` zeroed where they are produced (in place)."""
    with torch.no_grad():
        for (target, param, axis), positions in group.removed(channels).items():
            s = group.slices[(target, param, axis)]
            if not s.source or param in ("running_mean", "running_var") or not positions:
                continue
            owner = model.get_submodule(target) if param else model
            t = getattr(owner, param) if param else _tensor(model, target)
            t.index_fill_(axis, torch.tensor(sorted(positions)), 0.0)
    return model


def _tensor(model: nn.Module, target: str) -> torch.Tensor:
    path, _, leaf = target.rpartition(".")
    return getattr(model.get_submodule(path) if path else model, leaf)
