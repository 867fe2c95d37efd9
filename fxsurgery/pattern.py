"""Pattern rules: a chain of calls rewritten as one, and rules that cut the model short.

A pattern is a chain of elements, each a module class, a function or
`"method:NAME"` (a tuple of them is a choice): `(nn.Conv2d, nn.BatchNorm2d)`
matches a convolution whose only consumer is a BatchNorm. A `Pattern` says
what a match becomes:

    class FoldBN(fxs.Pattern):
        pattern = (nn.Conv2d, nn.BatchNorm2d)
        def check(self, conv, bn):          # a reason to leave this match alone, or None
            return None if bn.track_running_stats else "bn has no running statistics"
        def rewrite(self, conv, bn):        # a module, a function, or None (drop the chain)
            return fold(conv, bn)

Each element of a match is passed as the module it calls (call_module) or as
the fx.Node (functions and methods). The tensors of what `rewrite` returns are
reported as adapted from the matched modules (`weights = "derived"`) or as new
(`weights = "new"`); original modules it reuses (an adapter around a Linear)
are transferred like any others. `freeze` lists parameter globs, relative to
the new module, that start frozen.
"""

from __future__ import annotations

import inspect
from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable

from torch import nn

from .errors import RuleError
from .spec import Origin, Rule, Selector, _qualname, _sel, check_kwargs, describe


class Pattern:
    """A rewrite of a chain of calls; subclass it, or decorate a function with `fxs.pattern`."""

    pattern: tuple = ()
    weights: str = "derived"      # derived | new
    freeze: tuple = ()            # parameter globs of the new module that start frozen
    first_only: bool = False      # only the first match in graph order (the input layer)
    freeze_matched: bool = False  # the matched modules' parameters start frozen (an adapter's base)
    name: str = ""                # names what the rewrite adds: <path>_<name>

    def check(self, *matched) -> str | None:
        """Why this match must be left alone, or None to rewrite it."""
        return None

    def rewrite(self, *matched) -> Any:
        """What the chain becomes: an nn.Module, a function, or None (consumers read its input)."""
        raise NotImplementedError

    def describe(self) -> str:
        return type(self).__name__

    def elements(self) -> list[tuple]:
        """The pattern as a list of alternatives per position."""
        return [e if isinstance(e, tuple) else (e,) for e in self.pattern]


def element_text(alternatives: tuple) -> str:
    texts = [a if isinstance(a, str) else _qualname(a) for a in alternatives]
    return texts[0] if len(texts) == 1 else "(" + " | ".join(texts) + ")"


def pattern(*chain) -> Callable[[Callable], type]:
    """Make a Pattern class from a function of the matched elements.

    @fxs.pattern(nn.Linear, nn.BatchNorm1d)
    def fold_linear_bn(linear, bn): ...
    """
    def wrap(fn: Callable) -> type:
        body = {"pattern": tuple(chain), "rewrite": lambda self, *m: fn(*m),
                "describe": lambda self: fn.__name__, "__doc__": fn.__doc__, "__module__": fn.__module__}
        return type(fn.__name__, (Pattern,), body)
    return wrap


class Chain(Pattern):
    """A chain replaced by one module built per match (`fxs.new` infers its shapes); weights new."""

    weights = "new"

    def __init__(self, chain, replacement):
        self.pattern = tuple(chain)
        self.replacement = replacement

    def rewrite(self, *matched):
        return self.replacement

    def describe(self) -> str:
        return f"[{', '.join(element_text(e) for e in self.elements())}] -> {describe(self.replacement)}"


def check_pattern(p: Pattern, origin: Origin) -> Pattern:
    if not p.elements():
        raise RuleError(f"{origin}: pattern {p.describe()} has no elements; fix: set pattern = (nn.Conv2d, nn.BatchNorm2d) or similar")
    for alternatives in p.elements():
        for e in alternatives:
            ok = (isinstance(e, type) and issubclass(e, nn.Module)) or (isinstance(e, str) and e.startswith("method:")
                                                                        and e[7:].isidentifier()) or (callable(e) and not isinstance(e, type))
            if not ok:
                raise RuleError(f"{origin}: pattern element {e!r} of {p.describe()} is not a Module class, a function or "
                                "'method:NAME'; fix: e.g. pattern = (torch.nn.Conv2d, torch.nn.BatchNorm2d)")
    if p.weights not in ("derived", "new"):
        raise RuleError(f"{origin}: {p.describe()}: weights = {p.weights!r}; fix: 'derived' or 'new'")
    return p


def instantiate(thing: Any, params: dict, origin: Origin) -> Pattern:
    """A Pattern from a class (built with `params`) or an instance (no params)."""
    if isinstance(thing, Pattern):
        if params:
            raise RuleError(f"{origin}: {thing.describe()} is already built and takes no params ({', '.join(params)}); fix: pass the class")
        return check_pattern(thing, origin)
    if isinstance(thing, type) and issubclass(thing, Pattern):
        check_kwargs(thing, params, origin)
        try:
            return check_pattern(thing(**params), origin)
        except RuleError:
            raise
        except (TypeError, ValueError) as exc:
            raise RuleError(f"{origin}: {thing.__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())}) fails: {exc}; fix: correct its params") from None
    raise RuleError(f"{origin}: {thing!r} is not a Pattern; fix: pass a fxs.Pattern subclass or a function decorated with @fxs.pattern(...)")


@dataclass(frozen=True)
class Rewrite(Rule):
    """Rewrite every match of a pattern (see the module docstring).

    `select` limits matches to those whose first element's module path or node
    name it selects. A module called at several places is rewritten only when
    every call is matched the same way; otherwise the match is skipped with a
    reason, or with `per_site=True` each match gets its own copy.
    """

    pattern: Any
    _: KW_ONLY
    select: Any = None
    per_site: bool = False
    optional: bool = False
    origin: Origin | None = None

    def __post_init__(self):
        super().__post_init__()
        p = self.pattern
        if isinstance(p, (list, tuple)):
            raise RuleError(f"{self.origin}: a chain needs a replacement; fix: Rewrite(fxs.Chain([...], fxs.new(...))) or a Pattern")
        object.__setattr__(self, "pattern", instantiate(p, {}, self.origin))
        _sel(self, "select")
        if self.select is not None and self.select.kind not in ("glob", "regex"):
            raise RuleError(f"{self.origin}: select takes a glob or 're:REGEX' over module paths; fix: e.g. select='re:.*attn.*'")

    def selectors(self):
        return [self.select] if self.select is not None else []

    def __str__(self):
        where = f" in {self.select}" if self.select is not None else ""
        return f"rewrite {self.pattern.describe()}{where}"


@dataclass(frozen=True)
class Output(Rule):
    """End the model at a node: the graph returns its value, and everything after it goes.

    A feature extractor: `Output("layer3")` returns layer3's output; modules
    that only fed later layers are dropped from the new module (and reported).
    """

    at: Any
    _: KW_ONLY
    optional: bool = False
    origin: Origin | None = None

    def __post_init__(self):
        super().__post_init__()
        _sel(self, "at")

    def selectors(self):
        return [self.at]

    def __str__(self):
        return f"output {self.at}"


def takes(cls: type) -> list[str]:
    """The constructor params of a Pattern class, for `fxsurgery rules` and errors."""
    return [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


__all__ = ["Pattern", "pattern", "Chain", "Rewrite", "Output", "Selector", "instantiate", "takes"]
