"""YAML for rule files: PyYAML's safe loader with line numbers, no aliases, bounded depth."""

from __future__ import annotations

import re
from typing import Any

import yaml

from ..errors import RuleError

_MAX_DEPTH = 64


class YamlMap(dict):
    """A YAML mapping that remembers the line of itself and of each key."""

    line: int = 0
    key_lines: dict


class YamlList(list):
    line: int = 0


class _KeyNotText(yaml.MarkedYAMLError):
    pass


class _NumberTooLong(yaml.MarkedYAMLError):
    pass


class LineLoader(yaml.SafeLoader):
    """PyYAML's safe loader, keeping line numbers and refusing duplicate keys and aliases.

    Aliases (`*name`) are refused: a rule file never needs them, and a few
    hundred bytes of nested aliases expand to millions of values.
    """

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(problem="aliases (*name) are not allowed in rule files", problem_mark=event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > _MAX_DEPTH:
                raise yaml.MarkedYAMLError(problem=f"nested more than {_MAX_DEPTH} levels deep", problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        self.flatten_mapping(node)
        out, lines = YamlMap(), {}
        for key_node, value_node in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, (list, dict)):  # `? [a, b]`: YAML allows it, no rule file means it
                raise _KeyNotText(problem=f"a key must be text, not a {'list' if isinstance(key, list) else 'mapping'}",
                                  problem_mark=key_node.start_mark)
            if key in out:
                raise yaml.MarkedYAMLError(problem=f"duplicate key {key!r}", problem_mark=key_node.start_mark)
            out[key] = self.construct_object(value_node, deep=True)
            lines[key] = key_node.start_mark.line + 1
        out.line, out.key_lines = node.start_mark.line + 1, lines
        return out

    def construct_yaml_int(self, node):
        # Python refuses to read an int of more than 4300 digits (ValueError, with no line); none is a size
        if len(str(node.value)) > 40:
            raise _NumberTooLong(problem=f"a number of {len(str(node.value))} digits is no size or setting",
                                       problem_mark=node.start_mark)
        return super().construct_yaml_int(node)

    def construct_sequence(self, node, deep=False):
        out = YamlList(self.construct_object(child, deep=True) for child in node.value)
        out.line = node.start_mark.line + 1
        return out


LineLoader.add_constructor("tag:yaml.org,2002:map", LineLoader.construct_mapping)
LineLoader.add_constructor("tag:yaml.org,2002:seq", LineLoader.construct_sequence)
LineLoader.add_constructor("tag:yaml.org,2002:int", LineLoader.construct_yaml_int)


def parse_yaml(text: str, source: str) -> Any:
    last = text.count("\n") + (0 if text.endswith("\n") or not text else 1)
    loader = None

    def at(mark) -> int:  # PyYAML points one past the last line at the end of the stream
        return max(1, min(mark.line + 1, last)) if mark else 1
    try:
        loader = LineLoader(text)  # reads the whole text first: a control character fails here
        return loader.get_single_data()
    except _KeyNotText as exc:
        raise RuleError(f"{source}:{at(exc.problem_mark)}: {exc.problem}; fix: write the key as a plain word") from None
    except _NumberTooLong as exc:
        raise RuleError(f"{source}:{at(exc.problem_mark)}: {exc.problem}; fix: write a number of at most 40 digits") from None
    except yaml.constructor.ConstructorError as exc:
        line = at(exc.problem_mark)
        tag = re.search(r"tag '([^']*)'", str(exc.problem))
        what = f"tag {tag.group(1)!r}" if tag else "this value"
        raise RuleError(f"{source}:{line}: {what} is not allowed: a rule file is data, not code; fix: name classes by dotted path, e.g. 'module: "
                        f"torch.nn.ReLU'") from None
    except yaml.MarkedYAMLError as exc:
        line = at(exc.problem_mark or exc.context_mark)
        raise RuleError(f"{source}:{line}: YAML syntax error: {exc.problem or exc.context}; fix: correct the YAML at that line (indentation, quotes, "
                        f"':' after keys)") from None
    except yaml.reader.ReaderError as exc:  # its position counts characters; the line is the one that holds it
        line = text.count("\n", 0, exc.position) + 1
        shown = repr(chr(exc.character) if isinstance(exc.character, int) else exc.character)
        raise RuleError(f"{source}:{line}: character {shown} is not allowed in YAML; fix: remove it, or write it as an escape "
                        "in a double-quoted string") from None
    except yaml.YAMLError as exc:
        raise RuleError(f"{source}: YAML error: {exc}; fix: correct the file") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_value(raw: str, where: str) -> Any:
    """A command-line value as a YAML scalar or list (37 -> int); text when it is not YAML.

    Aliases are refused as in rule files: `--set` must not expand either.
    """
    try:
        loader = LineLoader(raw)
    except yaml.YAMLError:  # a control character: text, which the rule that uses it then judges
        return raw
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        if "aliases" in str(exc.problem):
            raise RuleError(f"{where}: aliases (*name) are not allowed; fix: write the value itself") from None
        return raw
    except yaml.YAMLError:
        return raw
    finally:
        loader.dispose()
