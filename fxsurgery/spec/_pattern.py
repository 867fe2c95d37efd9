"""Pattern rules: a chain of calls rewritten as one, and rules that cut the model short.

A pattern is a chain of elements, each a module class, a function or
`"method:NAME"` (a tuple of them is a choice): `(nn.Conv2d, nn.BatchNorm2d)`
matches a convolution whose only consumer is a BatchNorm. Or any DAG,
written as a function of its inputs (`fxs.calls(nn.Linear)(x)` stands for a
call of any Linear):

    def pattern(self, x, y):
        return torch.relu(fxs.calls(nn.Linear)(x)) + y

A `Pattern` says what a match becomes:

    class FoldBN(fxs.Pattern):
        pattern = (nn.Conv2d, nn.BatchNorm2d)
        def check(self, conv, bn):          # a reason to leave this match alone, or None
            return None if bn.track_running_stats else "bn has no running statistics"
        def rewrite(self, conv, bn):        # a module, a function, or None (drop the chain)
            return fold(conv, bn)

Each element of a match is passed as the module it calls (call_module) or as
the fx.Node (functions and methods), in graph order. What `rewrite` returns
takes the chain's first call's arguments, or the DAG's inputs in order; a
Python function or module of your own is traced and inlined. The tensors of what `rewrite` returns are
reported as adapted from the matched modules (`weights = "derived"`: those
the rewrite computed from their tensors, followed op by op while it runs; a
fresh layer left at its init is new) or as new (`weights = "new"`); original
modules it reuses (an adapter around a Linear) are transferred like any others. `freeze_matched` freezes the matched
modules' own parameters (an adapter's base).
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import KW_ONLY, dataclass
from typing import Any, Callable

from torch import fx, nn

from .._util import first_line
from ..errors import RuleError
from ._new import check_kwargs
from ._rules import Rule, check_selector, describe, fresh
from ._selector import Origin, Selector, caller_origin, qualname


class Pattern:
    """A rewrite of a chain of calls; subclass it, or decorate a function with `fxs.pattern`."""

    pattern: tuple = ()
    weights: str = "derived"      # derived | new
    first_only: bool = False      # only the first match in graph order (the input layer)
    freeze_matched: bool = False  # the matched modules' parameters start frozen (an adapter's base)
    name: str = ""                # names what the rewrite adds: <path>_<name>
    constants: Any = None         # DAG patterns: {input name: test or None}: inputs that bind a constant of the code

    def check(self, *matched) -> str | None:
        """Why this match must be left alone, or None to rewrite it."""
        return None

    def check_shapes(self, *shapes) -> str | None:
        """Why this match must be left alone, from the traced output shape of each element (None: unknown)."""
        return None

    def leaves(self, model: nn.Module) -> list[str]:
        """Paths of modules that capture must call as one module (not trace into) for this pattern to see them."""
        return []

    def rewrite(self, *matched) -> Any:
        """What the chain becomes: an nn.Module, a function, or None (consumers read its input)."""
        raise NotImplementedError

    def recipe(self, *modules) -> dict | None:
        """How `fxsurgery map-weights` recomputes what `rewrite` made from another checkpoint
        of the original: {tensor name in what rewrite returns: a recipe `replay` understands,
        its "reads" as (index of the matched module, tensor name)}. None: it cannot."""
        return None

    def describe(self) -> str:
        return type(self).__name__

    def elements(self) -> list[tuple]:
        """The pattern as a list of alternatives per position."""
        return [e if isinstance(e, tuple) else (e,) for e in self.pattern]

    @property
    def is_dag(self) -> bool:
        """A pattern written as a function of its inputs (any DAG), rather than a chain."""
        return callable(self.pattern) and not isinstance(self.pattern, (tuple, list))


class calls:
    """In a DAG pattern, a call of any module of a type: `fxs.calls(nn.Conv2d)(x)`."""

    def __init__(self, cls: type):
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise RuleError(f"{caller_origin()}: fxs.calls needs a torch.nn.Module class, got {cls!r}; fix: e.g. fxs.calls(nn.Conv2d)")
        self.cls, self.__name__ = cls, f"calls_{cls.__name__}"

    def __call__(self, *args):
        proxy = next(a for a in args if isinstance(a, fx.Proxy))
        return proxy.tracer.create_proxy("call_function", self, args, {})

    def __repr__(self) -> str:
        return f"fxs.calls({qualname(self.cls)})"


def dag_graph(p: Pattern, origin: Origin) -> fx.Graph:
    """The graph of a DAG pattern, traced from its function."""
    fn = p.pattern
    try:
        if inspect.ismethod(fn):  # `def pattern(self, x, y)`: trace it with self fixed, then drop self's placeholder
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # fx cannot guard an object argument, and says so
                self_name = next(iter(inspect.signature(fn.__func__).parameters))
                graph = fx.symbolic_trace(fn.__func__, concrete_args={self_name: fn.__self__}).graph
            graph.erase_node(next(n for n in graph.nodes if n.op == "placeholder"))
            return graph
        return fx.symbolic_trace(fn).graph
    except Exception as exc:
        first = first_line(exc, type(exc).__name__)
        raise RuleError(f"{origin}: pattern {p.describe()} cannot be traced: {first}; fix: write it with torch "
                        "functions, tensor methods and fxs.calls(ModuleClass)(x)") from None


def element_text(alternatives: tuple) -> str:
    texts = [a if isinstance(a, str) else qualname(a) for a in alternatives]
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
        return fresh(self.replacement)  # one module per match, never the rule's own object

    def describe(self) -> str:
        return f"[{', '.join(element_text(e) for e in self.elements())}] -> {describe(self.replacement)}"


def check_pattern(p: Pattern, origin: Origin) -> Pattern:
    if p.is_dag:
        graph = dag_graph(p, origin)
        calls_ = [n for n in graph.nodes if n.op in ("call_function", "call_method", "call_module")]
        out = next(n for n in graph.nodes if n.op == "output").args[0]
        outs = list(out) if isinstance(out, (tuple, list)) and out else [out]
        if not calls_ or any(not isinstance(o, fx.Node) or o.op == "placeholder" for o in outs) or len(set(outs)) != len(outs):
            raise RuleError(f"{origin}: pattern {p.describe()} must return the value of a call, or a tuple of distinct calls; fix: e.g. "
                            "def pattern(self, x, y): return torch.relu(x) + y")
        names = [n.name for n in graph.nodes if n.op == "placeholder"]
        unknown = sorted(set(p.constants or {}) - set(names))
        if unknown:
            raise RuleError(f"{origin}: pattern {p.describe()}: constants names {unknown[0]!r}, which is not an input of the pattern; "
                            f"fix: name one of {', '.join(names)}")
        return p
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
        check_selector(self, "select")
        if self.select is not None and self.select.kind not in ("glob", "regex"):
            raise RuleError(f"{self.origin}: select takes a glob or 're:REGEX' over module paths; fix: e.g. select='re:.*attn.*'")

    def selectors(self):
        return [self.select] if self.select is not None else []

    def __str__(self):
        where = f" in {self.select}" if self.select is not None else ""
        return f"rewrite {self.pattern.describe()}{where}"


@dataclass(frozen=True, init=False)
class Output(Rule):
    """End the model at one node, or return several as a dict.

    `Output("layer3")` returns layer3's output. Several selectors, a list, or
    one selector that matches several places return a dict of them, keyed by
    the selectors as written (or by each place's name when one selector matches
    several), in the order given; `Output({"layer1": "feat1", "layer4": "out"})`
    names the keys as torchvision's `create_feature_extractor(return_nodes=...)`
    does. Several Output rules add to one dict. What only fed later layers is
    dropped from the new module (and reported).
    """

    at: tuple                      # one Selector per output
    names: tuple                   # the key of each output in the returned dict
    keyed: bool                    # False: Output(one selector) returns the value itself
    optional: bool = False
    origin: Origin | None = None

    def __init__(self, *at, optional: bool = False, origin: Origin | None = None):
        keyed = len(at) != 1 or isinstance(at[0], (list, tuple, dict))
        if len(at) == 1 and isinstance(at[0], (list, tuple)):
            at = tuple(at[0])
        names = None
        if len(at) == 1 and isinstance(at[0], dict):
            names, at = tuple(at[0].values()), tuple(at[0].keys())
        for field_name, value in (("optional", optional), ("origin", origin), ("keyed", keyed)):
            object.__setattr__(self, field_name, value)
        self.__post_init__()  # the origin first: errors below name it
        if not at:
            raise RuleError(f"{self.origin}: output needs at least one selector; fix: e.g. Output('layer3') or Output('layer1', 'layer2')")
        selectors = tuple(Selector.of(a, self.origin) for a in at)
        names = tuple(sel.text for sel in selectors) if names is None else names
        bad = next((n for n in names if not isinstance(n, str) or not n), None)
        if bad is not None:
            hint = (f"; to select by {bad.__name__ if isinstance(bad, type) else 'it'}, pass it itself, e.g. Output({getattr(bad, '__name__', 'fn')})"
                    if callable(bad) else "")
            raise RuleError(f"{self.origin}: output name {bad!r} is not a non-empty string; fix: name each output with a string, "
                            f"e.g. {{'layer1': 'feat1'}}{hint}")
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise RuleError(f"{self.origin}: output name {twice[0]!r} is given twice; fix: give each output its own name")
        object.__setattr__(self, "at", selectors)
        object.__setattr__(self, "names", names)

    def selectors(self):
        return list(self.at)

    def __str__(self):
        shown = [s.text if n == s.text else f"{s.text} as {n}" for s, n in zip(self.at, self.names)]
        return f"output {', '.join(shown)}"


def takes(cls: type) -> list[str]:
    """The constructor params of a Pattern class, for `fxsurgery rules` and errors."""
    return [n for n, p in inspect.signature(cls.__init__).parameters.items()
            if n != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


__all__ = ["Pattern", "pattern", "calls", "Chain", "Rewrite", "Output", "Selector", "instantiate", "takes"]
