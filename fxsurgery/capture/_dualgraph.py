"""One module, two graphs: the code the original runs in train mode and the code it runs in eval mode.

Where a forward branches on `self.training` (`if self.training: ...`), no
single graph holds both branches. The surgery is then made on the graph of
each mode and the result keeps both: it runs the graph of its current mode,
and both call the same modules and tensors (one set of weights). model.py
gets a forward per mode and one that picks by `self.training`.
"""

from __future__ import annotations

import types

import torch
from torch import fx, nn
from torch.fx.graph_module import _assign_attr, _copy_attr, _forward_from_src

from ..errors import ModeError, SaveError
from ._pickling import graph_data, hidden, keep_hidden, parts, rebuilt, reduce

_OTHER, _OTHER_MODE, _OTHER_FORWARD = "_fxsurgery_other_graph", "_fxsurgery_other_mode", "_fxsurgery_other_forward"


def _targets(graph: fx.Graph) -> list[str]:
    return list(dict.fromkeys(n.target for n in graph.nodes if n.op in ("call_module", "get_attr")))


def _has(root: nn.Module, target: str) -> bool:
    try:
        for part in target.split("."):
            root = getattr(root, part)
        return True
    except AttributeError:
        return False


def _fetch(root: nn.Module, target: str):
    for part in target.split("."):
        root = getattr(root, part)
    return root


def _dispatch(self, *args, **kwargs):
    if self.training == self.__dict__[_OTHER_MODE]:
        return self._fxsurgery_other_forward(self, *args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


class ModeGraphModule(fx.GraphModule):
    """A GraphModule that runs `graph` in one mode and `other` in the other (`other_mode`)."""

    def __init__(self, root, graph: fx.Graph, class_name: str = "GraphModule", other: fx.Graph | None = None,
                 other_mode: bool | None = None):
        super().__init__(root, graph, class_name)
        if other is None:  # a deep copy: GraphModule.__deepcopy__ rebuilds from the copied attributes
            other, other_mode = root.__dict__[_OTHER], root.__dict__[_OTHER_MODE]
        for target in _targets(other):
            if not _has(self, target):
                if isinstance(root, dict):
                    _assign_attr(root[target], self, target)
                else:
                    _copy_attr(root, self, target)
        self.__dict__[_OTHER], self.__dict__[_OTHER_MODE] = other, other_mode
        code = other.python_code(root_module="self")
        self.__dict__[_OTHER_FORWARD] = _forward_from_src(code.src, code.globals)
        self.forward = types.MethodType(_dispatch, self)

    def _deepcopy_init(self):
        return ModeGraphModule.__init__

    __reduce__ = reduce

    def pickled_parts(self) -> tuple:
        # the second graph travels as the first does (capture/_pickling.py)
        body, graph, hooks, kept_out = parts(self, "forward", _OTHER, _OTHER_MODE, _OTHER_FORWARD)
        other = (graph_data(self.__dict__[_OTHER]), graph[1])
        return _unpickled, (body, graph, other, self.__dict__[_OTHER_MODE], hooks, kept_out)


def _unpickled(body: dict, graph: tuple, other: tuple, other_mode: bool, hooks: list,
               kept_out: dict[str, bool]) -> ModeGraphModule:
    first = rebuilt(body, graph)
    joined = combine(first, rebuilt(body, other), other_mode)
    for name, value in first.__dict__.items():  # attributes torch.fx kept beyond its graph's own
        joined.__dict__.setdefault(name, value)
    keep_hidden(joined, kept_out)
    for hook in hooks:
        hook(joined)
    return joined


def current(gm: nn.Module) -> nn.Module:
    """The graph `gm` runs in its current mode, as a plain GraphModule sharing its modules
    (what torch.export, ONNX and TorchScript take: they record one mode)."""
    if not isinstance(gm, ModeGraphModule):
        return gm
    graph = gm.__dict__[_OTHER] if gm.training == gm.__dict__[_OTHER_MODE] else gm.graph
    one = fx.GraphModule(gm, graph, type(gm).__name__)
    for sub in one.modules():
        if type(sub) is nn.Module or sub is one:  # containers made here; the shared modules keep their mode
            sub.training = gm.training
    return one


def other_graph(gm: nn.Module) -> tuple[fx.Graph, bool] | None:
    """The graph a two-mode module runs in its other mode and that mode (True: train); None for a module of one graph."""
    if not isinstance(gm, ModeGraphModule):
        return None
    return gm.__dict__[_OTHER], gm.__dict__[_OTHER_MODE]


def _shape(plan) -> list:
    return [(m.count, tuple(s.path for s in m.sites), tuple(m.modules)) for m in plan.matches]


def join(primary: nn.Module, other, other_mode: bool, plan) -> ModeGraphModule:
    """`primary` (a GraphModule) with the graph of `other` (the same surgery in the other mode) added.

    Modules and tensors at the same path are `primary`'s: both graphs share them.
    """
    mode, theirs_mode = ("eval", "train") if other_mode else ("train", "eval")   # other_mode: the mode `other` runs in
    for ours, theirs in zip(plan.matches, other.plan.matches):
        if _shape(plan)[ours.index - 1] != _shape(other.plan)[theirs.index - 1]:
            raise ModeError(f"{ours.label}: matches {ours.count} in {mode} mode and {theirs.count} in {theirs_mode} mode, where "
                            "the model runs other code; fix: write the rule for modules both modes run, or keep only the "
                            f"{mode} mode's code, which the result then runs in both modes (modes=False; --no-modes)")
    second = other.module
    if not isinstance(primary, fx.GraphModule) or not isinstance(second, fx.GraphModule):
        raise ModeError(f"{type(primary).__name__}: runs other code in train and eval mode and the surgery did not give "
                        "one graph; fix: capture it in the mode you will run it in")
    return combine(primary, second, other_mode)


def recompile(gm: fx.GraphModule) -> None:
    """Compile `gm` again after its graphs were edited in place: its own forward, the other mode's, and an
    adapter that holds the compiled forward (shim.py)."""
    gm.recompile()
    if isinstance(gm, ModeGraphModule):
        code = gm.__dict__[_OTHER].python_code(root_module="self")
        gm.__dict__[_OTHER_FORWARD] = _forward_from_src(code.src, code.globals)
        gm.forward = types.MethodType(_dispatch, gm)
    for hook in list(getattr(gm, "_deepcopy_hooks", ())):
        hook(gm)


def combine(primary: fx.GraphModule, second: fx.GraphModule, other_mode: bool) -> ModeGraphModule:
    """One module running `primary`'s graph, and `second`'s in `other_mode`; `primary`'s objects win."""
    ours = _counterparts(primary, second)
    table = {}
    for target in _targets(primary.graph) + _targets(second.graph):
        if target not in table:
            table[target] = _fetch(primary, target) if _has(primary, target) else _fetch(second, target)
            table[target] = ours.get(id(table[target]), table[target])
    mine = {id(m) for m in primary.modules()}
    for module in second.modules():  # a module only the other mode calls may share a tensor with one both call
        if id(module) not in mine:
            for slots in (module._parameters, module._buffers):
                slots.update({name: ours[id(t)] for name, t in slots.items() if id(t) in ours})
    joined = ModeGraphModule(table, primary.graph, type(primary).__name__, second.graph, other_mode)
    # torch.fx registers each buffer a graph reads as persistent: one the model keeps out of its state_dict stays out
    keep_hidden(joined, hidden(second, primary))
    modes = {p: m.training for p, m in primary.named_modules()}
    for path, sub in joined.named_modules():
        if type(sub) is nn.Module or isinstance(sub, fx.GraphModule):
            sub.training = modes.get(path, primary.training)
    joined.meta = dict(getattr(primary, "meta", {}))
    return joined


def _counterparts(primary: nn.Module, second: nn.Module) -> dict[int, torch.Tensor]:
    """id of each tensor of `second` -> `primary`'s tensor at the same path: where `second` ties a tensor of a
    module only it calls to one at such a path (a weight shared by a train-only head), the joined module
    keeps the tie to `primary`'s."""
    def tensors(module):
        return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    theirs = dict(tensors(primary))
    return {id(t): theirs[name] for name, t in tensors(second) if name in theirs and theirs[name] is not t}


def _split(src: str) -> tuple[str, str]:
    """model.py up to Model's forward, and that forward (a helper class before Model has a forward of its own)."""
    at = src.find("\nclass Model(")
    head, sep, forward = src[at:].partition("\n    def forward(")
    if at < 0 or not sep:
        raise SaveError("cannot write model.py: the generated source has no forward; fix: report this as a bug")
    return src[:at] + head, "    def forward(" + forward


def dual_source(gm: ModeGraphModule, generate, **facts) -> tuple[str, dict[str, str]]:
    """model.py with a forward per mode and one that picks by `self.training`."""
    other_mode = gm.__dict__[_OTHER_MODE]
    first, renames = generate(gm, **facts)
    second, other_renames = generate(fx.GraphModule(gm, gm.__dict__[_OTHER], type(gm).__name__), **facts)
    if any(renames.get(t, r) != r or (t not in renames and r != t) for t, r in other_renames.items()):
        raise SaveError("cannot write model.py: a module path used only in one mode needs renaming; fix: rename that "
                        "submodule to a plain name")
    head, own = _split(first)
    other_head, theirs = _split(second)
    lines = head.splitlines()
    imports = [line for line in other_head.splitlines() if line.startswith(("import ", "from ")) and line not in lines]
    puts = [line for line in other_head.splitlines() if line.startswith("        _put(self, ") and line not in lines]
    at = lines.index("from torch import nn") + 1
    lines[at:at] = imports
    at = lines.index("        for alias, owner in TIES.items():")
    lines[at:at] = puts
    names = {True: "_forward_train", False: "_forward_eval"}
    dispatch = ("    def forward(self, *args, **kwargs):\n"
                "        \"\"\"The original runs other code in train and eval mode: so does this model.\"\"\"\n"
                "        if self.training:\n"
                "            return self._forward_train(*args, **kwargs)\n"
                "        return self._forward_eval(*args, **kwargs)\n")
    forwards = {not other_mode: own.replace("    def forward(", f"    def {names[not other_mode]}(", 1),
                other_mode: theirs.replace("    def forward(", f"    def {names[other_mode]}(", 1)}
    source = ("\n".join(lines) + "\n\n" + dispatch + "\n" + forwards[True].rstrip() + "\n\n"
              + forwards[False].rstrip() + "\n")
    source = source.replace("    _fxsurgery_class = ", "    _fxsurgery_modes = (\"_forward_train\", \"_forward_eval\")\n"
                            "    _fxsurgery_class = ", 1)
    return source, renames


def trace_both(module: nn.Module, trace_one) -> fx.GraphModule:
    """`module` (a kept class) traced in its mode and, `.train()` flipped, in the other, its modes put back after:
    one graph where both trace the same code, else a ModeGraphModule of both. A forward that branches on
    `self.training` (timm's BatchNormAct2d, DropPath, a train-only term) traced once held one mode's code, which
    model.py then ran in both."""
    first = trace_one(module)
    if not isinstance(first, fx.GraphModule):  # Python kept at the root: the caller says what it cannot write
        return first
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.train(not module.training)
        second = trace_one(module)
    finally:
        for m, training in modes:
            m.training = training
    if not isinstance(second, fx.GraphModule):  # the other mode's code keeps Python: refused as the first would be
        return second
    if second.code == first.code:
        return first
    return combine(first, second, not module.training)


def trace_modes(module: nn.Module, trace_one) -> ModeGraphModule:
    """A loaded model.py with a forward per mode, traced again: `trace_one(module)` per forward."""
    import copy

    graphs = {}
    for mode, name in zip((True, False), type(module)._fxsurgery_modes):
        view = copy.copy(module)  # the same submodules, another class: torch.fx traces the class's forward
        view.__class__ = type(type(module).__name__, (type(module),), {"forward": getattr(type(module), name)})
        graphs[mode] = trace_one(view)
    return combine(graphs[module.training], graphs[not module.training], not module.training)
