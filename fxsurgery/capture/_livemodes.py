"""Tracing code that fxsurgery wrote keeps its `self.training` reads as graph values.

A result whose graph reads the mode (_modes.py) runs `training = self.training`;
traced again (model.py is re-traced when saved, a loaded model.py when saved
anew), that read would become a constant. While tracing, those modules'
`training` is a proxy of a get_attr node instead; nodes nobody read are removed.
"""

from __future__ import annotations

import contextlib
import contextvars

from torch import fx, nn

_KEEP = contextvars.ContextVar("fxsurgery_keep_mode_reads", default=False)


@contextlib.contextmanager
def keep_mode_reads():
    """Within: tracing code fxsurgery wrote keeps its mode reads (export re-traces its own output).
    Outside (capture), they trace as constants of the mode, which _modes.py makes live again."""
    token = _KEEP.set(True)
    try:
        yield
    finally:
        _KEEP.reset(token)


def reads_mode(module: nn.Module) -> bool:
    """True for modules whose forward fxsurgery wrote to read the mode at run time."""
    if getattr(type(module), "_fxsurgery_live_modes", False):
        return True
    return isinstance(module, fx.GraphModule) and any(
        n.op == "get_attr" and n.target == "training" for n in module.graph.nodes)


class _Modes:
    def __init__(self, tracer: fx.Tracer):
        self.tracer = tracer
        self.saved: list[tuple[nn.Module, bool]] = []
        self.nodes: list[fx.Node] = []

    def restore(self) -> None:
        for module, value in self.saved:
            module.__dict__["training"] = value
        for node in self.nodes:
            if not node.users and node.graph is self.tracer.graph:
                self.tracer.graph.erase_node(node)


def read_modes(tracer: fx.Tracer, root: nn.Module) -> _Modes:
    """Swap `training` for a proxy on every module that reads it live; `.restore()` undoes it."""
    modes = _Modes(tracer)
    if not _KEEP.get() or not isinstance(root, nn.Module):
        return modes
    for path, module in root.named_modules():
        if not reads_mode(module) or not isinstance(module.__dict__.get("training"), bool):
            continue
        if path and tracer.is_leaf_module(module, path):
            continue
        proxy = tracer.create_proxy("get_attr", f"{path}.training" if path else "training", (), {})
        modes.saved.append((module, module.__dict__["training"]))
        modes.nodes.append(proxy.node)
        module.__dict__["training"] = proxy
    return modes
