"""The original's containers (nn.Sequential, nn.ModuleList, nn.ModuleDict) stay containers in a graph's module tree.

torch.fx installs the parents of what a graph calls as bare `nn.Module()`s, so
`result.features[0]`, `result.layer4[-1]`, `len(result.encoder.layer)` and
`for block in result.blocks:` failed on a result where they work on the
original (per-layer learning rates, hooks on the last block, inspection). Each
such parent whose original was a container becomes one again, its modules in
the original's order (a module a rule inserted follows the one it was
inserted after).

A container traced through is not called by the graph: its code runs inline.
An nn.Sequential whose modules the graph calls one after the other, each on
the one before's output alone, stays callable (calling it computes what that
stretch of the graph does); one where the graph does more between them (a
detach cut, an inserted call, a block traced through, an output read in the
middle) is an `InlineSequential`, indexed and iterated alike but refusing a
call, which could not compute what the graph does.
"""

from __future__ import annotations

import inspect

import torch
from torch import fx, nn

from ._dualgraph import other_graph
from ._pickling import reduce

KINDS = {"Sequential": nn.Sequential, "ModuleList": nn.ModuleList, "ModuleDict": nn.ModuleDict}
INLINE, GAPPED, BLOCK = "InlineSequential", "PositionalModuleList", "InlineBlock"
INLINE_KINDS = (*KINDS, INLINE, GAPPED, BLOCK)  # what a saved graph may name
_INLINE_MESSAGE = ("this nn.Sequential's modules run inline in the result's graph, which does more between them than "
                   "call one after the other (a detach cut, an inserted call, a block traced through); fix: call the "
                   "result, or nn.Sequential(*modules) to run them one after the other")


class InlineSequential(nn.Sequential):
    """An nn.Sequential of the original traced into the graph of the module holding it: indexed, sliced and
    iterated as the original was; called, it refuses (the graph does more between its modules). A slice is a
    plain nn.Sequential, modules one after the other, as the user asks for."""

    @torch.jit.unused  # TorchScript compiles every submodule's forward: this one raises there too
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(_INLINE_MESSAGE)

    def __getitem__(self, idx):
        if not isinstance(idx, slice):
            return super().__getitem__(idx)
        part = nn.Sequential()
        for name, module in list(self._modules.items())[idx]:
            part.add_module(name, module)
        return part


class InlineBlock(nn.Module):
    """A block of the original the graph traced through (a ResNet BasicBlock, a transformer layer): its layers and
    tensors, for indexing, parameter groups and hooks on the layers the graph calls. Called, it refuses (torch said
    only "missing the required forward"); a hook on it never runs, and registering one says so."""

    @torch.jit.unused  # TorchScript compiles every submodule's forward: this one raises there too
    def forward(self, *args, **kwargs):
        raise RuntimeError("this block's code runs inline in the result's graph, which calls the layers inside it, "
                           "not the block; fix: call the result, or Output('<its path>') for its value")

    def register_forward_hook(self, hook, *args, **kwargs):
        import warnings  # model.py holds a copy of this class: what it needs, it imports itself

        warnings.warn("a forward hook on a block the result's graph runs inline never runs; fix: register it on a "
                      "layer the graph calls (the block's last one), or Output('<its path>') for its value", stacklevel=2)
        return super().register_forward_hook(hook, *args, **kwargs)

    def register_forward_pre_hook(self, hook, *args, **kwargs):
        import warnings

        warnings.warn("a forward pre-hook on a block the result's graph runs inline never runs; fix: register it on a "
                      "layer the graph calls (the block's first one)", stacklevel=2)
        return super().register_forward_pre_hook(hook, *args, **kwargs)


class PositionalModuleList(nn.ModuleList):
    """An nn.ModuleList a rule deleted from: its modules keep the original's names (the state_dict's keys), which
    then skip a number, and `[i]` is the i-th module, as after `del layers[j]` on the original (nn.ModuleList
    itself looks `[i]` up by the name str(i))."""

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return super().__getitem__(idx)
        return list(self._modules.values())[idx]


def _graphs(gm: fx.GraphModule) -> list[fx.Graph]:
    other = other_graph(gm)
    return [gm.graph] + ([other[0]] if other is not None else [])


def _calls_by_parent(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    by_parent: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            by_parent.setdefault(node.target.rpartition(".")[0], []).append(node)
    return by_parent


def _chained(calls: list[fx.Node], path: str, order: list[str]) -> bool:
    """`calls` (the graph's calls of modules under `path`) call those `order` names, each once, one after the other
    on the output of the one before alone, nothing else reading those outputs: what nn.Sequential.forward does."""
    if not order or [n.target for n in calls] != [f"{path}.{name}" for name in order]:
        return False
    for before, node in zip([None, *calls], calls):
        if node.kwargs or len(node.args) != 1 or (before is not None and (node.args[0] is not before or len(before.users) != 1)):
            return False
    return True


def _ordered(names: list[str], original: list[str]) -> list[str]:
    """`names` in the order of `original`; a name it lacks (a module a rule inserted) right after the one before it."""
    groups: list[list[str]] = []
    for name in names:
        if name in original or not groups:
            groups.append([name])
        else:
            groups[-1].append(name)
    position = {name: i for i, name in enumerate(original)}
    return [name for group in sorted(groups, key=lambda g: position.get(g[0], -1)) for name in group]


def kinds_of(gm: fx.GraphModule, original: nn.Module) -> dict[str, list]:
    """path -> [kind, child names in order] for each parent torch.fx made in `gm` whose counterpart in `original`
    (the module `gm` was captured from) is a container."""
    found = {}
    graphs = [_calls_by_parent(g) for g in _graphs(gm)]
    for path, sub in gm.named_modules():
        if not path or type(sub) is not nn.Module:
            continue
        try:
            theirs = original.get_submodule(path)
        except AttributeError:
            continue
        order = _ordered(list(sub._modules), list(theirs._modules))
        if isinstance(theirs, nn.Sequential):
            kind = "Sequential" if all(_chained(g.get(path, []), path, order) for g in graphs) else INLINE
        else:
            kind = next((k for k, c in KINDS.items() if isinstance(theirs, c)), BLOCK)
            if kind == "ModuleList" and order != [str(i) for i in range(len(order))]:
                kind = GAPPED
        if kind is not None:
            found[path] = [kind, order]
    return found


def container(kind: str, bare: nn.Module, order) -> nn.Module:
    """`bare`'s modules, tensors and attributes in a container of `kind`, its modules in `order` first."""
    made = {"InlineSequential": InlineSequential, "PositionalModuleList": PositionalModuleList,
            "InlineBlock": InlineBlock}.get(kind) or getattr(nn, kind)
    made = made()
    made.__dict__.update(bare.__dict__)
    made._modules = {n: bare._modules[n] for n in [*order, *bare._modules] if n in bare._modules}
    return made


def restore(gm: nn.Module, kinds: dict[str, list]) -> None:
    """Make each bare parent `kinds` names the container it names, with its modules in that order (idempotent)."""
    for path in sorted(kinds, key=lambda p: p.count(".")):
        kind, order = kinds[path]
        try:
            parent, name = gm.get_submodule(path.rpartition(".")[0]), path.rpartition(".")[2]
        except AttributeError:
            continue
        bare = parent._modules.get(name)
        if type(bare) is nn.Module and kind in INLINE_KINDS:  # else already one, or not a parent torch.fx made
            parent._modules[name] = container(kind, bare, order)


class Containers:
    """A deep-copy hook giving `gm` its containers again: torch.fx's deep copy and unpickling rebuild the
    parents bare (capture/_pickling.py pickles it as itself and applies it again)."""

    installs = ()

    def __init__(self, kinds: dict[str, list]):
        self.kinds = kinds

    def __call__(self, gm: nn.Module) -> None:
        restore(gm, self.kinds)


def keep_containers(module: nn.Module, original: nn.Module) -> None:
    """Give every GraphModule inside `module` (the result; the root, or graphs inside kept Python) the containers
    of its counterpart in `original`."""
    for path, gm in list(module.named_modules()):
        if (not isinstance(gm, fx.GraphModule) or getattr(type(gm), "__reduce__", None) is not reduce  # not one made here
                or any(isinstance(h, Containers) for h in gm._deepcopy_hooks)):
            continue
        try:
            theirs = original.get_submodule(path)
        except AttributeError:
            continue
        kinds = kinds_of(gm, theirs)
        if kinds:
            hook = Containers(kinds)
            hook(gm)
            gm._deepcopy_hooks.append(hook)


def containers_of(gm: fx.GraphModule, module: nn.Module | None = None) -> dict[str, list]:
    """path -> [kind, module names] of the containers of `module` (default `gm`; a model.py model `gm` was traced
    from) among the parents of what `gm`'s graphs call or read (not one the graphs call, nor one inside such a
    module), parents first: what save writes down."""
    module = gm if module is None else module
    targets = {n.target for g in _graphs(gm) for n in g.nodes if n.op in ("call_module", "get_attr")}
    parents = {t.rsplit(".", i)[0] for t in targets for i in range(1, t.count(".") + 1)} - targets
    found = {}
    for path, sub in module.named_modules():
        if path not in parents or any(path.startswith(t + ".") for t in targets):
            continue
        named = type(sub).__name__
        ours = (named in (INLINE, GAPPED) and isinstance(sub, (nn.Sequential, nn.ModuleList))) or named == BLOCK
        kind = named if ours else next((k for k, c in KINDS.items() if type(sub) is c), None)
        if kind is not None:
            found[path] = [kind, list(sub._modules)]
    return found


def renamed_containers(containers: dict[str, list], renames: dict[str, str]) -> dict[str, list]:
    """`containers` with their paths and modules' names as model.py renames the graph's targets (a renamed target
    keeps its number of parts, so its prefixes rename its parents); a container two would share is left out."""
    prefixes: dict[str, set[str]] = {}
    for old, new in renames.items():
        old_parts, new_parts = old.split("."), new.split(".")
        for i in range(1, len(old_parts) + 1):
            prefixes.setdefault(".".join(old_parts[:i]), set()).add(".".join(new_parts[:i]))
    out: dict[str, list] = {}
    clash = set()
    for path, (kind, order) in containers.items():
        news = prefixes.get(path, set())
        children = [prefixes.get(f"{path}.{c}", set()) for c in order]
        if len(news) != 1 or any(len(c) > 1 for c in children):
            continue
        new = next(iter(news))
        clash.update([new] if new in out else [])
        out[new] = [kind, [next(iter(c)).rpartition(".")[2] for c in children if c]]
    return {path: value for path, value in out.items() if path not in clash}


# model.py's copy: the class and the function above, and the loop that applies them in Model.__init__
SOURCE = "\n\n".join(inspect.getsource(f) for f in (InlineSequential, InlineBlock, PositionalModuleList, container)).replace(
    "raise RuntimeError(_INLINE_MESSAGE)", f"raise RuntimeError({_INLINE_MESSAGE!r})")
INIT = ("\n        for path, (kind, order) in CONTAINERS.items():  # the original's containers, indexed as there"
        "\n            parent, _, name = path.rpartition('.')"
        "\n            parent = self.get_submodule(parent)"
        "\n            parent._modules[name] = container(kind, parent._modules[name], order)")
