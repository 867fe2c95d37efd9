"""Where a rule was written (Origin) and what it selects (Selector)."""

from __future__ import annotations

import fnmatch
import os
import re
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
