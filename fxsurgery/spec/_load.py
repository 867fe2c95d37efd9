"""Rule files: YAML data turned into rules, every error with file and line.

A rule file is data, never code: it is parsed by PyYAML's safe loader (tags
that build Python objects are refused), and it names classes and functions by
dotted path, resolved only inside an allowlist (torch, torchvision and what
the user allows).
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from importlib import resources
from typing import Any

from ..errors import RuleError
from ._new import New, check_kwargs, check_new, check_policy
from ._pattern import Chain, Output, Rewrite, instantiate
from ._prune import IMPORTANCE, Prune
from ._resolve import Resolver
from ._rules import Delete, Detach, Freeze, Insert, Layers, Replace, RuleSet
from ._selector import Origin
from ._yaml import YamlList, YamlMap, parse_yaml, read_value

VERSION = 1
ACTIONS = ("delete", "replace", "insert", "detach", "freeze", "layers", "rewrite", "use", "output", "prune")
PATTERN_KEYS = ("select", "per_site")
_PARAM = re.compile(r"\$\{([^}\n]*)\}")
# `${name}` is not valid YAML inside a flow mapping ({out_features: ${n}}), so
# before parsing each one becomes a plain token that names it, same line.
_TOKEN = re.compile(r"__fxsparam_([0-9a-f]*)__")
MAX_BYTES = 8 << 20  # rule files are a few hundred lines
EXPANSION = 1 << 20  # characters that ${param} may add to a rule file: what YAML aliases are refused for, in another form


def load_rule_files(paths: list, params: dict | None = None, allow=()) -> list[RuleSet]:
    """Several rule files applied together (the command line's RULES...): each override goes to the files that
    declare it, so files with different params combine; one that no file declares is refused."""
    if len(paths) < 2:
        return [load_rules(path, params=params, allow=allow) for path in paths]
    sets = [load_rules(path, params=params, allow=allow, declared_only=True) for path in paths]
    for name in params or {}:
        if not any(name in ruleset.params for ruleset in sets):
            declared = "; ".join(f"{r.source}: {', '.join(r.params) or 'none'}" for r in sets)
            raise RuleError(f"--set {name}: no rule file declares the param {name!r} (declared: {declared}); "
                            "fix: use a declared name or add it under 'params:'")
    return sets


def shipped_rules() -> str:
    """The shipped rule files' directory: package data when installed, rules/ of the source tree when the package
    is run from there (PYTHONPATH) without an install mapping `fxsurgery.rules` to it."""
    try:
        return str(resources.files("fxsurgery.rules"))
    except ModuleNotFoundError:
        return os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "rules")


def rule_path(path: str | os.PathLike) -> str:
    """A rule file's path: the path given, a local NAME.yaml for a bare name, else the shipped file of that name
    (as `fxsurgery rules` lists them)."""
    source = os.fspath(path)
    if os.path.exists(source) or os.sep in source:
        return source
    if not source.endswith(".yaml") and os.path.isfile(f"{source}.yaml"):  # a local fold-bn.yaml before the shipped fold-bn
        return f"{source}.yaml"
    shipped = os.path.join(shipped_rules(), source if source.endswith(".yaml") else f"{source}.yaml")
    return shipped if os.path.isfile(shipped) else source


def _path_fix(source: str) -> str:
    """For a bare name, the shipped rules it is close to (classifer-head -> classifier-head)."""
    if os.sep in source or os.path.exists(source):
        return "check the path"
    names = sorted(f.removesuffix(".yaml") for f in (os.listdir(shipped_rules()) if os.path.isdir(shipped_rules()) else ())
                   if f.endswith(".yaml"))
    close = difflib.get_close_matches(source.removesuffix(".yaml"), names, n=3, cutoff=0.6)
    return f"did you mean {', '.join(close)}? ('fxsurgery rules' lists them)" if close else "check the path, or see 'fxsurgery rules'"


def load_rules(path: str | os.PathLike, params: dict | None = None, allow=(), declared_only: bool = False) -> RuleSet:
    """Load a rule file or a shipped one by name ("fold-bn"); `params` override its defaults (`declared_only`: those it declares)."""
    source = rule_path(path)
    try:
        found = os.stat(source) if os.path.exists(source) else None
        if found is not None and not stat.S_ISREG(found.st_mode):  # a FIFO would hang, /dev/zero never end
            raise RuleError(f"{source}: not a regular file; fix: pass a rule file (.yaml)")
        if found is not None and found.st_size > MAX_BYTES:
            raise RuleError(f"{source}: a rule file of more than {MAX_BYTES} bytes; fix: pass a rule file, not data")
        with open(source, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise RuleError(f"{source}: cannot read rule file: {exc.strerror}; fix: {_path_fix(source)}") from None
    except UnicodeDecodeError as exc:
        with open(source, "rb") as handle:
            line = handle.read()[:exc.start].count(b"\n") + 1
        raise RuleError(f"{source}:{line}: not UTF-8 text (byte {exc.object[exc.start]:#04x}); fix: save the rule file as UTF-8") from None
    return parse_rules(text, source, params=params, allow=allow, declared_only=declared_only)


def parse_rules(text: str, source: str = "<rules>", params: dict | None = None, allow=(),
                declared_only: bool = False) -> RuleSet:
    """Rules from the text of a rule file (see load_rules)."""
    text = _PARAM.sub(lambda m: f"__fxsparam_{m.group(1).encode().hex()}__", text)
    doc = parse_yaml(text, source)
    if doc is None:
        raise RuleError(f"{source}: the rule file is empty; fix: start it with 'fxsurgery: {VERSION}' and a 'rules:' list")
    if not isinstance(doc, YamlMap):
        raise RuleError(f"{source}:1: a rule file is a mapping, got {_kind(doc)}; fix: start it with 'fxsurgery: {VERSION}' and a 'rules:' list")
    _check_keys(doc, ("fxsurgery", "description", "params", "rules"), source, "the file")
    if "fxsurgery" not in doc:
        raise RuleError(f"{source}:{doc.line}: missing 'fxsurgery: {VERSION}'; fix: add it as the first line")
    if doc["fxsurgery"] != VERSION or isinstance(doc["fxsurgery"], bool):
        raise RuleError(f"{source}:{doc.key_lines['fxsurgery']}: unsupported version fxsurgery: {doc['fxsurgery']!r}; fix: write 'fxsurgery: {VERSION}'")
    description = doc.get("description", "")
    if not isinstance(description, str):
        raise RuleError(f"{source}:{doc.key_lines['description']}: description must be text; fix: quote it")
    defaults = doc.get("params") or YamlMap()
    if not isinstance(defaults, dict):
        raise RuleError(f"{source}:{doc.key_lines['params']}: params must be a mapping of name: default; fix: e.g. 'params: {{num_classes: 10}}'")
    for name, value in defaults.items():  # the file's ${...} were made tokens before it was parsed
        if "__fxsparam_" in repr(value):
            shown = _TOKEN.sub(lambda m: "${" + bytes.fromhex(m.group(1)).decode() + "}", repr(value))
            raise RuleError(f"{source}:{doc.key_lines['params']}: param {name!r} defaults to {shown}, a param; params do not "
                            "refer to params; fix: give it a value of its own")
    values = dict(defaults)
    for name, value in (params or {}).items():
        if name not in defaults and declared_only:
            continue
        if name not in defaults:
            declared = ", ".join(defaults) or "none"
            raise RuleError(f"{source}: unknown param {name!r} (the file declares: {declared}); fix: use a declared name or add it under 'params:'")
        values[name] = value
    items = doc.get("rules")
    if not isinstance(items, list) or not items:
        line = doc.key_lines.get("rules", doc.line)
        raise RuleError(f"{source}:{line}: 'rules' must be a non-empty list; fix: add rules such as '- delete: layer4'")
    resolver = Resolver(source, allow)
    rules, budget = [], [EXPANSION]
    for item in items:
        line = getattr(item, "line", items.line)
        item = _interpolate(item, values, source, line, budget)
        rules.append(_rule(item, Origin(source, line), resolver))
    return RuleSet(tuple(rules), description=description, params=values, source=source)


def _kind(value: Any) -> str:
    """How a YAML value reads to a user: 'a list', 'a mapping', 'a str'..."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"a {type(value).__name__}"


def _short(value: Any, limit: int = 120) -> str:
    """repr, cut short: a message quotes the value, never megabytes of it."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _interpolate(value: Any, params: dict, source: str, line: int, budget: list) -> Any:
    if isinstance(value, YamlMap):
        key = next((k for k in value if isinstance(k, str) and "__fxsparam_" in k), None)
        if key is not None:
            shown = _TOKEN.sub(lambda m: "${" + bytes.fromhex(m.group(1)).decode() + "}", key)
            raise RuleError(f"{source}:{value.key_lines.get(key, line)}: {shown!r} is a key; params fill values only; fix: write the key itself")
        out = YamlMap({k: _interpolate(v, params, source, value.key_lines.get(k, line), budget) for k, v in value.items()})
        out.line, out.key_lines = value.line, value.key_lines
        return out
    if isinstance(value, list):
        out = YamlList(_interpolate(v, params, source, getattr(value, "line", line), budget) for v in value)
        out.line = getattr(value, "line", line)
        return out
    if not isinstance(value, str) or "__fxsparam_" not in value:
        return value
    names = [bytes.fromhex(h).decode() for h in _TOKEN.findall(value)]
    for name in names:
        if name not in params:
            declared = ", ".join(params) or "none"
            raise RuleError(f"{source}:{line}: unknown param ${{{name}}} (declared: {declared}); fix: declare it under 'params:' or correct the name")
    whole = _TOKEN.fullmatch(value)
    if whole:
        return params[names[0]]
    lengths = {name: len(str(params[name])) for name in set(names)}
    budget[0] -= sum(lengths[name] for name in names)  # counted before the string is built
    if budget[0] < 0:
        raise RuleError(f"{source}:{line}: ${{{names[0]}}} and the other params expand the file by more than {EXPANSION} characters; "
                        "fix: refer to a long param fewer times")
    return _TOKEN.sub(lambda m: str(params[bytes.fromhex(m.group(1)).decode()]), value)


def _check_keys(mapping: YamlMap, allowed, source: str, where: str) -> None:
    for key in mapping:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"allowed: {', '.join(allowed)}"
            raise RuleError(f"{source}:{mapping.key_lines.get(key, mapping.line)}: unknown key {key!r} in {where}; fix: {hint}")


def _selector(value: Any, line: int, resolver: Resolver) -> Any:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (kind, name), = value.items()
        line = value.key_lines.get(kind, line)
        if kind == "type":
            return resolver(name, line, "module")
        if kind == "function":
            return resolver(name, line, "function")
        if kind == "method":
            return f"method:{name}"
        if kind in ("path", "node"):
            return name
    raise RuleError(f"{resolver.source}:{line}: bad selector {_short(value)}; fix: write a glob string, {{type: torch.nn.ReLU}}, "
                    f"{{function: torch.relu}} or {{method: view}}")


_SELECTOR_KINDS = ("type", "function", "method", "path", "node")


def _outputs(value: Any, line: int, resolver: Resolver) -> Any:
    """`output: layer3`, `output: [layer1, layer2]`, or `output: {layer1: feat1, layer2: feat2}` (names)."""
    if isinstance(value, list):
        return [_selector(v, getattr(value, "line", line), resolver) for v in value]
    if isinstance(value, dict) and not (len(value) == 1 and next(iter(value)) in _SELECTOR_KINDS):
        return {_selector(k, value.key_lines.get(k, line), resolver): v for k, v in value.items()}
    return _selector(value, line, resolver)


def _module_spec(spec: YamlMap, line: int, resolver: Resolver, reserved=()) -> Any:
    """{module: dotted, **kwargs} -> New; {function: dotted} -> function."""
    if not isinstance(spec, dict):
        raise RuleError(f"{resolver.source}:{line}: expected {{module: torch.nn.X, ...}} or {{function: ...}}, got {_short(spec)}; fix: e.g. 'with: "
                        f"{{module: torch.nn.GELU}}'")
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.items() if k not in ("module", "function") + tuple(reserved)}
    if "function" in spec:
        if "module" in spec or kwargs:
            raise RuleError(f"{resolver.source}:{line}: a function replacement takes no other keys; fix: keep only 'function:'")
        return resolver(spec["function"], spec.key_lines["function"], "function")
    if "module" not in spec:
        raise RuleError(f"{resolver.source}:{line}: missing 'module:' (a dotted class name); fix: e.g. 'module: torch.nn.Linear'")
    cls = resolver(spec["module"], spec.key_lines["module"], "module")
    for key in kwargs:  # an argument the class does not take is reported on its own line
        check_kwargs(cls, {key: kwargs[key]}, Origin(resolver.source, spec.key_lines.get(key, line)))
    return check_new(New(cls, kwargs), Origin(resolver.source, line))


def _flag(item: YamlMap, key: str, source: str) -> bool:
    value = item.get(key, False)
    if not isinstance(value, bool):
        raise RuleError(f"{source}:{item.key_lines[key]}: {key!r} must be true or false, got {value!r}; fix: write '{key}: true'")
    return value


def _rule(item: Any, origin: Origin, resolver: Resolver):
    source, line = origin.file, origin.line
    if not isinstance(item, dict):
        raise RuleError(f"{source}:{line}: a rule is a mapping such as '- delete: layer4', got {_short(item)}; fix: start each rule with one of "
                        f"{', '.join(ACTIONS)}")
    actions = [k for k in item if k in ACTIONS]
    if len(actions) != 1:
        found = ", ".join(map(str, item)) or "nothing"
        fix = "split it into one rule per action" if actions else f"start it with one of {', '.join(ACTIONS)}"
        raise RuleError(f"{source}:{line}: a rule needs exactly one action ({', '.join(ACTIONS)}), found {found}; fix: {fix}")
    action = actions[0]
    if action in ("rewrite", "use"):
        return _pattern_rule(item, action, origin, resolver)
    extra = {"delete": (), "replace": ("with", "weights"), "insert": (), "detach": (), "freeze": ("except", "bn"),
             "output": (), "layers": ("order",), "prune": ("channels", "amount", "importance", "neurons", "heads")}[action]
    _check_keys(item, (action, "optional") + extra, source, f"'{action}' rule")
    optional = _flag(item, "optional", source)
    body, body_line = item[action], item.key_lines[action]
    if action == "output":
        return Output(_outputs(body, body_line, resolver), optional=optional, origin=origin)
    if action == "layers":
        if "order" not in item:
            raise RuleError(f"{source}:{line}: layers needs 'order:' (the layer indices to keep, in order); fix: e.g. 'order: [0, 1, 1, 2, 3]'")
        order = item["order"]
        if not isinstance(order, list):
            raise RuleError(f"{source}:{item.key_lines['order']}: layers order must be a list of layer indices, got {_short(order)}; "
                            "fix: e.g. 'order: [0, 1, 3]'")
        return Layers(_selector(body, body_line, resolver), order=tuple(order), optional=optional, origin=origin)
    if action == "prune":
        return _prune_rule(item, _selector(body, body_line, resolver), optional, origin)
    if action == "delete":
        return Delete(_selector(body, body_line, resolver), optional=optional, origin=origin)
    if action == "freeze":
        excl = item.get("except", [])
        excl = [excl] if isinstance(excl, (str, dict)) else excl
        if not isinstance(excl, list):
            raise RuleError(f"{source}:{item.key_lines['except']}: 'except' must be a list of selectors; fix: e.g. except: ['layer4.*', fc]")
        sels = [_selector(e, item.key_lines.get("except", line), resolver) for e in excl]
        bn = item.get("bn")
        if bn not in (None, "eval"):
            raise RuleError(f"{source}:{item.key_lines['bn']}: bn: {bn!r} is not known; fix: write 'bn: eval' (BatchNorm keeps its running statistics) "
                            f"or leave it out")
        target = [_selector(t, body_line, resolver) for t in body] if isinstance(body, list) else _selector(body, body_line, resolver)
        return Freeze(target, exclude=tuple(sels), bn=bn, optional=optional, origin=origin)
    if action == "replace":
        if "with" not in item:
            raise RuleError(f"{source}:{line}: replace needs 'with:'; fix: add e.g. 'with: {{module: torch.nn.GELU}}'")
        weights = check_policy(item.get("weights", "new"), Origin(source, item.key_lines.get("weights", line)))
        replacement = _module_spec(item["with"], item.key_lines["with"], resolver)
        return Replace(_selector(body, body_line, resolver), replacement, weights=weights, optional=optional, origin=origin)
    if not isinstance(body, dict):
        example = "{after: avgpool, module: torch.nn.Dropout, p: 0.2}" if action == "insert" else "{after: layer3}"
        raise RuleError(f"{source}:{body_line}: {action} takes a mapping; fix: e.g. '{action}: {example}'")
    anchors = [k for k in ("after", "before") if k in body]
    if len(anchors) != 1:
        raise RuleError(f"{source}:{body_line}: {action} needs exactly one of 'after' or 'before'; fix: e.g. '{action}: {{after: layer3}}'")
    anchor = {anchors[0]: _selector(body[anchors[0]], body.key_lines[anchors[0]], resolver)}
    if action == "detach":
        _check_keys(body, ("after", "before"), source, "'detach'")
        return Detach(**anchor, optional=optional, origin=origin)
    name = body.get("name")
    module = _module_spec(body, body_line, resolver, reserved=("after", "before", "name"))
    if not isinstance(module, New):
        raise RuleError(f"{source}:{body_line}: insert takes a module, not a function; fix: use 'module: torch.nn.X'")
    return Insert(module, **anchor, name=name, optional=optional, origin=origin)


def _prune_rule(item: YamlMap, target: Any, optional: bool, origin: Origin) -> Prune:
    """`prune: SEL` with `channels: [...]`, `neurons: [...]`, `heads: [...]` or `amount: 0.5` (and `importance: l1 | l2`)."""
    kwargs = {k: item[k] for k in ("channels", "amount", "importance", "neurons", "heads") if k in item}
    for key, value in kwargs.items():
        at = Origin(origin.file, item.key_lines.get(key, origin.line))
        if key == "importance" and value not in IMPORTANCE:
            raise RuleError(f"{at}: prune importance {_short(value)} is not known; fix: write 'importance: l1' or 'importance: l2'")
        if key == "amount" and (isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1):
            raise RuleError(f"{at}: prune amount must be a fraction between 0 and 1 (exclusive), got {_short(value)}; fix: e.g. 'amount: 0.5'")
        if key in ("channels", "neurons", "heads") and not isinstance(value, list):
            raise RuleError(f"{at}: prune {key} must be a list of indices, got {_short(value)}; fix: e.g. '{key}: [0, 3, 5]'")
    return Prune(target, **kwargs, optional=optional, origin=origin)


def _element(value: Any, line: int, resolver: Resolver) -> Any:
    """A pattern element: a Module class or function by dotted name, or 'method:NAME'."""
    if isinstance(value, str) and value.startswith("method:"):
        if not value[len("method:"):].isidentifier():
            raise RuleError(f"{resolver.source}:{line}: bad method element {value!r}; fix: write method:NAME, e.g. method:relu")
        return value
    return resolver(value, line, "element")


def _pattern_rule(item: YamlMap, action: str, origin: Origin, resolver: Resolver):
    """`rewrite: NAME` (a built-in), `rewrite: {pattern: [...], with: {...}}` or `use: pkg.mod:Name`;
    the rule's other keys are the pattern's params."""
    from ._builtins import BUILTINS
    source, line = resolver.source, item.key_lines[action]
    body = item[action]
    params = {k: v for k, v in item.items() if k not in (action, "optional") + PATTERN_KEYS}
    if action == "rewrite" and isinstance(body, dict):
        _check_keys(body, ("pattern", "with"), source, "'rewrite'")
        _check_keys(item, (action, "optional") + PATTERN_KEYS, source, "'rewrite' rule")
        chain = body.get("pattern")
        if not isinstance(chain, list) or not chain or "with" not in body:
            raise RuleError(f"{source}:{line}: a chain rewrite needs 'pattern: [...]' and 'with: {{module: ...}}'; "
                            "fix: e.g. {pattern: [torch.nn.Conv2d, torch.nn.ReLU], with: {module: torch.nn.Identity}}")
        elements = [_element(e, chain.line, resolver) for e in chain]
        thing = Chain(elements, _module_spec(body["with"], body.key_lines["with"], resolver))
    elif action == "rewrite":
        if not isinstance(body, str) or body not in BUILTINS:
            close = difflib.get_close_matches(str(body), list(BUILTINS), n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"built-ins: {', '.join(BUILTINS)}; or 'use: package.module:Pattern'"
            raise RuleError(f"{source}:{line}: unknown rewrite {_short(body)}; fix: {hint}")
        thing = BUILTINS[body]
    else:
        dotted = body.replace(":", ".", 1) if isinstance(body, str) else body
        thing = resolver(dotted, line, "pattern")
    for key, value in list(params.items()):
        at = item.key_lines.get(key, line)
        if key == "to":
            params[key] = resolver(value, at, "module")
        elif key == "of":
            params[key] = tuple(_element(v, at, resolver) for v in (value if isinstance(value, list) else [value]))
    select = item.get("select")
    if select is not None and not isinstance(select, str):
        raise RuleError(f"{source}:{item.key_lines['select']}: select is a glob or 're:REGEX' over module paths; fix: e.g. select: 're:.*attn.*'")
    pattern = instantiate(thing, params, origin)
    return Rewrite(pattern, select=select, per_site=_flag(item, "per_site", source),
                   optional=_flag(item, "optional", source), origin=origin)


def parse_overrides(pairs) -> dict:
    """`--set k=v` strings to params; values are read as YAML scalars (37 -> int)."""
    out = {}
    for pair in pairs or []:
        name, sep, raw = pair.partition("=")
        if not sep or not name.strip():
            raise RuleError(f"--set {pair!r}: expected NAME=VALUE; fix: e.g. --set num_classes=37")
        value = read_value(raw, f"--set {pair!r}") if raw.strip() else ""
        if isinstance(value, dict):
            raise RuleError(f"--set {pair!r}: a param takes a number, text or a list, not a mapping; fix: e.g. --set num_classes=37")
        out[name.strip()] = value
    return out
