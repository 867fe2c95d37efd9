"""A regenerated module names what it lost of the original's class when asked for it.

The result of a capture is a GraphModule of the original's forward alone: timm's
`model.forward_features(x)`, `model.get_classifier()` and `model.num_classes`
ended in torch's "'ResNet' object has no attribute 'forward_features'", as if
the name were mistyped. Asked for a method or attribute the original had, it
now says why and gives the fix (keep the class, or select the value).
"""

from __future__ import annotations

from torch import fx, nn


class Methods:
    """A deep-copy hook (applied again after a deep copy or a pickle) giving a GraphModule's class a `__getattr__`
    that names, for the original's methods and attributes it lacks, the class they were of and the fix."""

    installs = ()

    def __init__(self, names: frozenset[str], origin: str):
        self.names, self.origin = names, origin

    def __call__(self, gm: nn.Module) -> None:
        # torch.fx gives each GraphModule a class of its own: this is this module's, not every GraphModule's
        type(gm)._fxsurgery_methods = self
        type(gm).__getattr__ = _hinted_getattr
        if self not in gm._deepcopy_hooks:
            gm._deepcopy_hooks.append(self)


def _hinted_getattr(self, name: str):
    try:
        return nn.Module.__getattr__(self, name)
    except AttributeError:
        hook = type(self).__dict__.get("_fxsurgery_methods")
        if hook is None or name not in hook.names:
            raise
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}: the result runs the graph of "
                         f"{hook.origin}.forward alone, without its other methods and attributes; fix: apply with "
                         "keep_class=True (--keep-class) to keep the class, or Output(...) to return an inner value") from None


def hint_methods(module: nn.Module, original: nn.Module) -> None:
    """Give `module`, a GraphModule made from `original`, the hint above for what `original` has and it lacks."""
    if not isinstance(module, fx.GraphModule) or isinstance(original, fx.GraphModule):
        return
    have = set(dir(module))
    theirs = {n for n in [*dir(type(original)), *vars(original)] if not n.startswith("_")}
    names = frozenset(theirs - have)
    if names:
        cls = type(original)
        Methods(names, f"{cls.__module__}.{cls.__qualname__}")(module)
