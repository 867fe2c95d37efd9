"""Where a rule was written (Origin) and what it selects (Selector)."""

from __future__ import annotations

import fnmatch
import os
import re
import re._constants as _sre
import re._parser as _parser
import sys
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..errors import RuleError

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


def caller_origin() -> Origin:
    # The first frame outside the package is the user's line that built the rule.
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_code.co_filename
        path = os.path.abspath(name)
        if not name.startswith("<") and not path.startswith(_PACKAGE_DIR) and "dataclasses" not in path:
            return Origin(_display_path(path), frame.f_lineno)
        frame = frame.f_back
    return Origin()


def qualname(obj: Any) -> str:
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

    kind: str  # glob | regex | type | function | method | any (value: the member selectors)
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
                    compiled = re.compile(spec[3:])
                except re.error as exc:
                    raise RuleError(f"{where}bad regular expression {spec!r}: {exc}; fix: correct the pattern after 're:'") from None
                slow = _backtracking(spec[3:])
                if slow:
                    raise RuleError(f"{where}regular expression {spec!r} {slow}, which can take Python's matcher hours on one "
                                    "name; fix: a simpler pattern, or a glob ('layer*.conv?')")
                return cls("regex", compiled, spec)
            if spec.startswith("method:"):
                name = spec[len("method:"):]
                if not name.isidentifier():
                    raise RuleError(f"{where}bad method selector {spec!r}; fix: write method:NAME, e.g. method:view")
                return cls("method", name, spec)
            if not spec.strip() or spec != spec.strip():
                raise RuleError(f"{where}bad glob {spec!r}: empty or padded with spaces; fix: write a module path such as 'layer1.*' or '*'")
            return cls("glob", spec, spec)
        if isinstance(spec, type) and issubclass(spec, nn.Module):
            return cls("type", spec, qualname(spec))
        if isinstance(spec, type):
            raise RuleError(f"{where}{qualname(spec)} is not a torch.nn.Module class; fix: select modules by a Module subclass, a path glob or a function")
        if callable(spec):
            return cls("function", spec, qualname(spec))
        raise RuleError(f"{where}cannot select by {spec!r} ({type(spec).__name__}); fix: use a path glob, 're:REGEX', 'method:NAME', a Module class or "
                        f"a function")

    @classmethod
    def any_of(cls, specs, origin: Origin | None = None) -> "Selector":
        """Several selectors as one: what any of them selects (`Freeze(["conv1", "layer1.*"])`)."""
        members = tuple(cls.of(s, origin) for s in specs)
        if not members:
            raise RuleError(f"{f'{origin}: ' if origin else ''}an empty list selects nothing; fix: name at least one module path or type")
        return members[0] if len(members) == 1 else cls("any", members, ", ".join(m.text for m in members))

    def matches_name(self, name: str) -> bool:
        """True when a module path or node name is selected (glob and regex only)."""
        if self.kind == "any":
            return any(m.matches_name(name) for m in self.value)
        if self.kind == "glob":
            return fnmatch.fnmatchcase(name, self.value)
        if self.kind == "regex":
            return self.value.fullmatch(name) is not None
        return False

    def __str__(self) -> str:
        return self.text


_REPEATS = (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT)
_MAX_REPEATS = 3  # sequential `.*`s cost (name length) ** count steps where a match fails
_MAX_PATHS = 256  # combinations of alternatives: `(a|b)\.(c|d|e)` has 6


def _backtracking(pattern: str) -> str:
    """Why a pattern may backtrack exponentially (a repeat holding a repeat, an alternative or a back reference), or
    polynomially past a few repeats; "" where it cannot. Module paths are short, the patterns rule files' data."""
    repeats = 0

    def walk(items, repeated: bool) -> str:
        nonlocal repeats
        for op, av in items:
            if op in _REPEATS:
                varies = av[1] > av[0]  # `?` too: optional parts inside a repeat backtrack as a star does
                if varies and repeated:
                    return "repeats a group that repeats"
                repeats += varies
                why = walk(av[2], repeated or av[1] > 1)
            elif op is _sre.BRANCH:
                why = "repeats a group of alternatives" if repeated else next(filter(None, (walk(b, repeated) for b in av[1])), "")
            elif op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
                why = "refers back to a group"
            else:
                subs = [a for a in (av if isinstance(av, (tuple, list)) else (av,)) if isinstance(a, _parser.SubPattern)]
                why = next(filter(None, (walk(sub, repeated) for sub in subs)), "")
            if why:
                return why
        return ""

    parsed = _parser.parse(pattern)
    why = walk(parsed, False)
    paths = _paths(parsed)
    return why or (f"holds {repeats} repeats (at most {_MAX_REPEATS})" if repeats > _MAX_REPEATS else
                   f"holds groups of alternatives one after another, more than {_MAX_PATHS} ways to match"
                   if paths > _MAX_PATHS else "")


def _paths(items) -> int:
    """How many ways the alternatives of a pattern combine: `(?:.|.)` 28 times tries 2**28 of them on a name that
    fails at its end, with nothing repeated."""
    total = 1
    for op, av in items:
        if op is _sre.BRANCH:
            total *= sum(_paths(branch) for branch in av[1])
        else:
            for sub in (av if isinstance(av, (tuple, list)) else (av,)):
                if isinstance(sub, _parser.SubPattern):
                    total *= _paths(sub)
        if total > _MAX_PATHS:
            return total
    return total
