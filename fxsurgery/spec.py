"""Rules as data: frozen dataclasses that know where they were written.

A rule reads `what => action`: a selector says what (module paths, node
names, module types, functions, methods) and the rule class says the action.
Rules are checked when they are built, never first while rewriting.
"""

from __future__ import annotations

import copy
import fnmatch
import inspect
import os
import re
import sys
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Callable

from torch import nn

from .errors import RuleError

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


@dataclass(frozen=True)
class Origin:
    """Where a rule was written: a file and line, or nothing known."""

    file: str | None = None
    line: int | None = None

    def __str__(self) -> str:
        if self.file is None:
            return "<python>"
        return f"{self.file}:{self.line}" if self.line else self.file


def _display_path(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _caller_origin() -> Origin:
    # The first frame outside the package is the user's line that built the rule.
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        path = os.path.abspath(name)
        if not name.startswith("<") and not path.startswith(_PACKAGE_DIR) and "dataclasses" not in path:
            return Origin(_display_path(path), frame.f_lineno)
        frame = frame.f_back
    return Origin()


def _qualname(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", repr(obj))
    short = getattr(obj, "__name__", name)
    for public in ("torch.nn.functional", "torch.nn", "torch"):  # F.gelu lives in torch._C._nn, torch.sigmoid elsewhere
        if (module.startswith("torch") or not module) and getattr(sys.modules.get(public), short, None) is obj:
            return f"{public}.{short}"
    return f"{module}.{name}" if module else name


@dataclass(frozen=True)
class Selector:
    """What a rule acts on.

    - a string is a glob over module paths and node names (`layer1.*`);
      `re:` starts a regular expression, `method:` names a tensor method;
    - a class selects every module of that type;
    - a function (`torch.relu`) selects every call of it.

    >>> Selector.of("layer1.*").kind
    'glob'
    """

    kind: str  # glob | regex | type | function | method
    value: Any
    text: str

    @classmethod
    def of(cls, spec: Any, origin: Origin | None = None) -> "Selector":
        if isinstance(spec, Selector):
            return spec
        where = f"{origin}: " if origin else ""
        if isinstance(spec, str):
            if spec.startswith("re:"):
                try:
                    return cls("regex", re.compile(spec[3:]), spec)
                except re.error as exc:
                    raise RuleError(f"{where}bad regular expression {spec!r}: {exc}; fix: correct the pattern after 're:'") from None
            if spec.startswith("method:"):
                name = spec[len("method:"):]
                if not name.isidentifier():
                    raise RuleError(f"{where}bad method selector {spec!r}; fix: write method:NAME, e.g. method:view")
                return cls("method", name, spec)
            if not spec.strip() or spec != spec.strip():
                raise RuleError(f"{where}bad glob {spec!r}: empty or padded with spaces; fix: write a module path such as 'layer1.*' or '*'")
            return cls("glob", spec, spec)
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            return cls("type", spec, _qualname(spec))
        if isinstance(spec, type):
            raise RuleError(f"{where}{_qualname(spec)} is not a torch.nn.Module class; fix: select modules by a Module subclass, a path glob or a function")
        if callable(spec):
            return cls("function", spec, _qualname(spec))
        raise RuleError(f"{where}cannot select by {spec!r} ({type(spec).__name__}); fix: use a path glob, 're:REGEX', 'method:NAME', a Module class or a function")

    def matches_name(self, name: str) -> bool:
        """True when a module path or node name is selected (glob and regex only)."""
        if self.kind == "glob":
            return fnmatch.fnmatchcase(name, self.value)
        if self.kind == "regex":
            return self.value.fullmatch(name) is not None
        return False

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class New:
    """A module to build per match, shape arguments inferred from the graph.

    `fxs.new(nn.Linear, out_features=10)` on an input of shape [N, 512]
    builds `nn.Linear(in_features=512, out_features=10)`.
    """

    cls: type
    kwargs: dict = field(default_factory=dict)

    # constructor argument -> how it is read from the incoming shape
    INFERRED = {
        "in_features": lambda shape: shape[-1],
        "in_channels": lambda shape: shape[1],
        "num_features": lambda shape: shape[1],
        "num_channels": lambda shape: shape[1],
        "normalized_shape": lambda shape: shape[-1],
        "embed_dim": lambda shape: shape[-1],
        "d_model": lambda shape: shape[-1],
    }

    def missing(self) -> list[str]:
        """Constructor arguments that will be inferred from the incoming shape."""
        params = inspect.signature(self.cls).parameters
        return [p for p in self.INFERRED if p in params and p not in self.kwargs]

    def build(self, shape: tuple[int, ...] | None) -> nn.Module:
        kwargs = dict(self.kwargs)
        needed = self.missing()
        if needed and shape is None:
            raise RuleError(f"cannot infer {', '.join(needed)} of {self.cls.__name__} without example inputs; fix: pass example_inputs (--input) or give {needed[0]} explicitly")
        for name in needed:
            kwargs[name] = int(self.INFERRED[name](shape))
        return self.cls(**kwargs)

    def __str__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.kwargs.items())
        return f"{self.cls.__name__}({args})"


def new(cls: type, **kwargs) -> New:
    """A module spec whose shape arguments are inferred from the traced shapes."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise RuleError(f"{_caller_origin()}: fxs.new needs a torch.nn.Module class, got {cls!r}; fix: pass a class such as torch.nn.Linear")
    check_kwargs(cls, kwargs, _caller_origin())
    return check_new(New(cls, dict(kwargs)), _caller_origin())


_PROBE_SIZE = 8  # stands in for an inferred size when a spec is checked


def check_new(spec: New, origin: Origin) -> New:
    """Build the module once with small stand-ins for the inferred sizes: a value the
    class rejects (Dropout(p=2.0)) or an argument it needs (Conv2d's kernel_size) is
    reported when the rule is written, not when it is applied."""
    probe = {name: (_PROBE_SIZE,) if name == "normalized_shape" else _PROBE_SIZE for name in spec.missing()}
    try:
        spec.cls(**spec.kwargs, **probe)
    except TypeError as exc:
        missing = re.findall(r"missing \d+ required positional arguments?: (.*)", str(exc))
        if not missing:
            raise RuleError(f"{origin}: {_qualname(spec.cls)}({', '.join(f'{k}={v!r}' for k, v in spec.kwargs.items())}) is rejected: "
                            f"{str(exc).strip().splitlines()[0]}; fix: change the arguments") from None
        raise RuleError(f"{origin}: {_qualname(spec.cls)} needs {missing[0]}; fix: give it in the rule (e.g. kernel_size: 3)") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RuleError(f"{origin}: {_qualname(spec.cls)}({', '.join(f'{k}={v!r}' for k, v in spec.kwargs.items())}) is rejected: {first}; fix: change the arguments") from None
    return spec


def check_kwargs(cls: type, kwargs: dict, origin: Origin) -> None:
    """Reject constructor arguments the class does not take, at load time."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    unknown = [k for k in kwargs if k not in params]
    if unknown:
        takes = ", ".join(p for p in params if p not in ("self", "device", "dtype"))
        raise RuleError(f"{origin}: {_qualname(cls)} does not take {', '.join(map(repr, unknown))}; fix: use its arguments ({takes})")


def _module_like(value: Any, origin: Origin, what: str) -> Any:
    if isinstance(value, (New, nn.Module)):
        return value
    if isinstance(value, type) and issubclass(value, nn.Module):
        return New(value, {})
    if what == "replacement" and callable(value) and not isinstance(value, type):
        return value
    raise RuleError(f"{origin}: {what} {value!r} is not a module, a module class, fxs.new(...) spec{' or a function' if what == 'replacement' else ''}; fix: pass e.g. nn.Dropout(0.2) or fxs.new(nn.Linear, out_features=10)")


WEIGHT_POLICIES = ("new", "keep", "slice", "pad", "adapt_input_channels")


def check_policy(weights: Any, origin: Origin) -> Any:
    """A weights policy: one of WEIGHT_POLICIES, or {"select": [indices]} (keep those rows)."""
    if isinstance(weights, str) and weights in WEIGHT_POLICIES:
        return weights
    if isinstance(weights, dict) and list(weights) == ["select"]:
        rows = weights["select"]
        if isinstance(rows, (list, tuple)) and rows and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in rows):
            return {"select": tuple(rows)}
    raise RuleError(f"{origin}: unknown weights policy {weights!r}; fix: use one of {', '.join(WEIGHT_POLICIES)}, "
                    "or {select: [row indices]}")


@dataclass(frozen=True)
class Rule:
    """Base of all rules: where it was written and whether it must match."""

    def __post_init__(self):
        if self.origin is None:
            object.__setattr__(self, "origin", _caller_origin())

    @property
    def action(self) -> str:
        return type(self).__name__.lower()

    def selectors(self) -> list[Selector]:
        raise NotImplementedError


def _sel(rule: Rule, name: str) -> None:
    value = getattr(rule, name)
    if value is not None:
        object.__setattr__(rule, name, Selector.of(value, rule.origin))


def _anchor(rule: Rule) -> None:
    if (rule.after is None) == (rule.before is None):
        raise RuleError(f"{rule.origin}: {rule.action} needs exactly one of after= or before=; fix: write {rule.action}(after='layer3') or before=")
    _sel(rule, "after")
    _sel(rule, "before")


@dataclass(frozen=True)
class Delete(Rule):
    """Remove the selected nodes; their consumers read their input instead."""

    target: Any
    _: KW_ONLY
    optional: bool = False
    origin: Origin | None = None

    def __post_init__(self):
        super().__post_init__()
        _sel(self, "target")

    def selectors(self):
        return [self.target]

    def __str__(self):
        return f"delete {self.target}"


@dataclass(frozen=True)
class Replace(Rule):
    """Swap the selected modules or calls for a module, a spec or a function.

    The replaced module's tensors fill the replacement as `weights` says:
    `"new"` (default): none, the replacement keeps its own initialisation;
    `"keep"`: copied, names and shapes equal; `"slice"`: the leading block of
    each (the first k classes); `{"select": [i, j, ...]}`: those rows (a
    classifier reduced to some of its classes keeps theirs exactly); `"pad"`:
    the original block in place, the rest initialised; `"adapt_input_channels"`:
    a convolution's filters over new input channels (timm's rule: 3 -> 1 sums
    them, 3 -> N repeats them and scales by 3/N).
    """

    target: Any
    replacement: Any
    _: KW_ONLY
    weights: Any = "new"
    optional: bool = False
    origin: Origin | None = None

    def __post_init__(self):
        super().__post_init__()
        _sel(self, "target")
        object.__setattr__(self, "replacement", _module_like(self.replacement, self.origin, "replacement"))
        object.__setattr__(self, "weights", check_policy(self.weights, self.origin))

    def selectors(self):
        return [self.target]

    def __str__(self):
        return f"replace {self.target} with {describe(self.replacement)}"


@dataclass(frozen=True)
class Insert(Rule):
    """Add a module on the output edge (after=) or input edge (before=) of a node."""

    module: Any
    _: KW_ONLY
    after: Any = None
    before: Any = None
    name: str | None = None
    optional: bool = False
    origin: Origin | None = None

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "module", _module_like(self.module, self.origin, "inserted module"))
        _anchor(self)
        if self.name is not None and not all(p.isidentifier() for p in self.name.split(".")):
            raise RuleError(f"{self.origin}: insert name {self.name!r} is not a module path; fix: use identifiers joined by dots")

    def selectors(self):
        return [self.after or self.before]

    def __str__(self):
        where = f"after {self.after}" if self.after else f"before {self.before}"
        return f"insert {describe(self.module)} {where}"


@dataclass(frozen=True)
class Detach(Rule):
    """Stop gradients on the output edges (after=) or input edges (before=) of a node.

    Values are unchanged; nothing upstream of the cut receives a gradient
    through it. The cut uses `Tensor.detach`, never the in-place `detach_`.
    """

    _: KW_ONLY
    after: Any = None
    before: Any = None
    optional: bool = False
    origin: Origin | None = None

    def __post_init__(self):
        super().__post_init__()
        _anchor(self)

    def selectors(self):
        return [self.after or self.before]

    def __str__(self):
        return f"detach after {self.after}" if self.after else f"detach before {self.before}"


@dataclass(frozen=True)
class Freeze(Rule):
    """`requires_grad=False` on the parameters of the selected modules.

    A parameter is frozen when its module or any module above it is selected
    and none of them is excluded. `bn="eval"` also keeps the BatchNorm layers
    among them on their running statistics, which then never update, even
    after `model.train()`.
    """

    target: Any
    _: KW_ONLY
    exclude: tuple = ()
    bn: str | None = None
    optional: bool = False
    origin: Origin | None = None

    def __post_init__(self):
        super().__post_init__()
        _sel(self, "target")
        excl = (self.exclude,) if isinstance(self.exclude, (str, type)) else tuple(self.exclude)
        object.__setattr__(self, "exclude", tuple(Selector.of(e, self.origin) for e in excl))
        if self.bn not in (None, "eval"):
            raise RuleError(f"{self.origin}: freeze bn={self.bn!r} is not known; fix: write bn='eval' (BatchNorm keeps its running statistics) or leave it out")
        for sel in (self.target, *self.exclude):
            if sel.kind in ("function", "method"):
                raise RuleError(f"{self.origin}: freeze selects modules, not calls ({sel}); fix: name module paths or a module type, e.g. 'layer1.*' or {{type: torch.nn.Linear}}")

    def selectors(self):
        return [self.target]

    def __str__(self):
        tail = f" except {', '.join(map(str, self.exclude))}" if self.exclude else ""
        return f"freeze {self.target}{tail}" + (" (bn: eval)" if self.bn else "")


def describe(thing: Any) -> str:
    """Short text for a replacement or inserted module."""
    if isinstance(thing, New):
        return str(thing)
    if isinstance(thing, nn.Module):
        return repr(thing) if "\n" not in repr(thing) else type(thing).__name__
    return _qualname(thing)


def fresh(thing: Any) -> Any:
    """A copy per match of a module instance (specs and functions are returned)."""
    return copy.deepcopy(thing) if isinstance(thing, nn.Module) else thing


@dataclass(frozen=True)
class RuleSet:
    """An ordered list of rules with the file they came from."""

    rules: tuple
    description: str = ""
    params: dict = field(default_factory=dict)
    source: str | None = None

    def __iter__(self):
        return iter(self.rules)

    def __len__(self):
        return len(self.rules)


def flatten(rules: Any, load: Callable[[str], RuleSet]) -> list[Rule]:
    """Rules from a rule, a RuleSet, a YAML path, or a list mixing them."""
    if isinstance(rules, (Rule, RuleSet, str, os.PathLike)):
        rules = [rules]
    out: list[Rule] = []
    for item in rules or []:
        if isinstance(item, Rule):
            out.append(item)
        elif isinstance(item, RuleSet):
            out.extend(item.rules)
        elif isinstance(item, (str, os.PathLike)):
            out.extend(load(os.fspath(item)).rules)
        else:
            raise RuleError(f"{_caller_origin()}: {item!r} is not a rule, a RuleSet or a rule file path; fix: pass Delete/Replace/Insert/Detach/Freeze objects or a path to a YAML file")
    return out
