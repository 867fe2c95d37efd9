"""Rules as data: frozen dataclasses that know where they were written.

A rule reads `what => action`: a selector says what (module paths, node
names, module types, functions, methods) and the rule class says the action.
Rules are checked when they are built, never first while rewriting.
"""

from __future__ import annotations

import copy
import functools
import keyword
import os
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Callable

from torch import fx, nn

from ..errors import RuleError
from ._new import New, check_policy, module_like
from ._selector import Origin, Selector, caller_origin, qualname


@dataclass(frozen=True)
class Rule:
    """Base of all rules: where it was written and whether it must match."""

    def __post_init__(self):
        if self.origin is None:
            object.__setattr__(self, "origin", caller_origin())

    @property
    def action(self) -> str:
        return type(self).__name__.lower()

    def selectors(self) -> list[Selector]:
        raise NotImplementedError


def check_selector(rule: Rule, name: str) -> None:
    value = getattr(rule, name)
    if value is None and name == "target":  # after= and before= may be left out, what a rule acts on may not
        raise RuleError(f"{rule.origin}: {rule.action} needs a selector of what it acts on, got None; fix: name module "
                        f"paths or a type, e.g. {rule.action.capitalize()}('layer1.*')")
    if value is not None:
        object.__setattr__(rule, name, Selector.of(value, rule.origin))


def _anchor(rule: Rule) -> None:
    if (rule.after is None) == (rule.before is None):
        raise RuleError(f"{rule.origin}: {rule.action} needs exactly one of after= or before=; fix: write {rule.action}(after='layer3') or before=")
    check_selector(rule, "after")
    check_selector(rule, "before")


@dataclass(frozen=True)
class Delete(Rule):
    """Remove the selected nodes; their consumers read their input instead."""

    target: Any
    _: KW_ONLY
    optional: bool = False
    origin: Origin | None = None

    def __post_init__(self):
        super().__post_init__()
        check_selector(self, "target")

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
        check_selector(self, "target")
        object.__setattr__(self, "replacement", module_like(self.replacement, self.origin, "replacement"))
        object.__setattr__(self, "weights", check_policy(self.weights, self.origin))

    def selectors(self):
        return [self.target]

    def __str__(self):
        return f"replace {self.target} with {describe(self.replacement)}"


_MODULE_NAMES = frozenset(dir(fx.GraphModule)) | frozenset(vars(nn.Module())) | {"graph", "code", "meta"}


def _free_name(part: str) -> bool:
    """A name a module can take: `class` would be code of the generated forward, `forward` the module's method,
    `graph` the GraphModule's own; a leading underscore is torch's."""
    return part.isidentifier() and not keyword.iskeyword(part) and part not in _MODULE_NAMES and not part.startswith("_")


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
        object.__setattr__(self, "module", module_like(self.module, self.origin, "inserted module"))
        _anchor(self)
        if self.name is not None and not (isinstance(self.name, str) and all(_free_name(p) for p in self.name.split("."))):
            raise RuleError(f"{self.origin}: insert name {self.name!r} is not a module path of free names (no Python keyword, no "
                            "attribute every module has, such as forward or training); fix: use identifiers joined by dots, e.g. head_norm")

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
        if isinstance(self.target, (list, tuple)):
            object.__setattr__(self, "target", Selector.any_of(self.target, self.origin))
        check_selector(self, "target")
        excl = (self.exclude,) if isinstance(self.exclude, (str, type)) else tuple(self.exclude)
        object.__setattr__(self, "exclude", tuple(Selector.of(e, self.origin) for e in excl))
        if self.bn not in (None, "eval"):
            raise RuleError(f"{self.origin}: freeze bn={self.bn!r} is not known; fix: write bn='eval' (BatchNorm keeps its running statistics) or leave it out")
        targets = self.target.value if self.target.kind == "any" else (self.target,)
        for sel in (*targets, *self.exclude):
            if sel.kind in ("function", "method"):
                raise RuleError(f"{self.origin}: freeze selects modules, not calls ({sel}); fix: name module paths or a module type, e.g. 'layer1.*' "
                                f"or {{type: torch.nn.Linear}}")

    def selectors(self):
        return [self.target]

    def __str__(self):
        tail = f" except {', '.join(map(str, self.exclude))}" if self.exclude else ""
        return f"freeze {self.target}{tail}" + (" (bn: eval)" if self.bn else "")


@dataclass(frozen=True)
class Layers(Rule):
    """Rearrange an `nn.ModuleList` the forward iterates: layer i of the result is `order[i]` of the original.

    An index left out deletes that layer, one written twice duplicates it (the
    copy gets its own tensors, transferred from the source layer), a permuted
    list reorders. The forward must loop over the list, so the rule acts on the
    model as it is (`keep_class=True`).

    >>> Layers("model.layers", order=[0, 1, 2, 1, 2, 3])   # 4 layers -> 6, layers 1 and 2 run twice
    """

    target: Any
    _: KW_ONLY
    order: tuple = ()
    optional: bool = False
    origin: Origin | None = None

    def __post_init__(self):
        super().__post_init__()
        check_selector(self, "target")
        if self.target.kind not in ("glob", "regex"):
            raise RuleError(f"{self.origin}: layers selects a module list by path, not {self.target}; fix: name its path, e.g. 'model.layers'")
        order = self.order
        if isinstance(order, (str, bytes)) or not hasattr(order, "__iter__"):
            raise RuleError(f"{self.origin}: layers order must be a list of layer indices, got {order!r}; fix: e.g. order=[0, 1, 3]")
        order = tuple(order)
        if not order:
            raise RuleError(f"{self.origin}: layers order is empty, which would remove every layer; fix: list at least one layer index")
        bad = [i for i in order if isinstance(i, bool) or not isinstance(i, int) or i < 0]
        if bad:
            raise RuleError(f"{self.origin}: layers order holds {bad[0]!r}, not a layer index; fix: use integers from 0, e.g. order=[0, 1, 3]")
        object.__setattr__(self, "order", order)

    def selectors(self):
        return [self.target]

    def __str__(self):
        return f"layers {self.target} order={list(self.order)}"


def describe(thing: Any) -> str:
    """Short text for a replacement or inserted module."""
    if isinstance(thing, New):
        return str(thing)
    if isinstance(thing, nn.Module):
        return repr(thing) if "\n" not in repr(thing) else type(thing).__name__
    return qualname(thing)


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
            raise RuleError(f"{caller_origin()}: {item!r} is not a rule, a RuleSet or a rule file path; fix: pass Delete/Replace/Insert/Detach/Freeze "
                            f"objects or a path to a YAML file")
    return out


def param_owner(name: str) -> str:
    return name.rpartition(".")[0]


def ancestors(path: str) -> list[str]:
    parts = path.split(".") if path else []
    return [""] + [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def statistics(modules: dict) -> list[str]:
    """A running_mean name for each BatchNorm with running statistics and no parameters (affine=False): a Freeze
    selects it as it would select its weight, so bn="eval" holds it and the warning about moving statistics counts it."""
    return [f"{path}.running_mean" for path, sub in modules.items()
            if isinstance(sub, nn.modules.batchnorm._BatchNorm) and sub.track_running_stats and not sub.affine]


def frozen_by(rule: Freeze, params: list[str], type_of, others=None) -> tuple[list[str], list[str]]:
    """(parameters frozen, modules selected) for a Freeze rule.

    A parameter is frozen when its module or one above it is selected by the
    target and none of them is excluded. `type_of(path)` gives a module's class.
    `others(name)`: the parameter's other names, where a module is registered at
    more than one path: selected by any of its names, excluded by any of them.
    """
    def hit(sel: Selector, path: str) -> bool:
        if sel.kind == "any":
            return any(hit(member, path) for member in sel.value)
        if sel.kind == "type":
            return isinstance(type_of(path), type) and issubclass(type_of(path), sel.value)
        return sel.matches_name(path)

    # a module path is judged once, however many parameters lie below it
    selected = functools.cache(lambda path: hit(rule.target, path))
    excluded = functools.cache(lambda path: any(hit(e, path) for e in rule.exclude))
    frozen = []
    for name in params:
        chain = [p for n in [name, *(others(name) if others else ())] for p in ancestors(param_owner(n))]
        if any(selected(p) for p in chain) and not any(excluded(p) for p in chain):
            frozen.append(name)
    owners = list(dict.fromkeys(param_owner(p) for p in frozen))
    return frozen, owners


