"""One base exception, one subclass per stage.

Every message is a single line that says where (rule file and line, or the
Python rule), what went wrong, and the fix. The CLI prints it as it is.
"""

from __future__ import annotations

LIMIT = 300  # characters in one error message


def _middle(text: str, keep: int) -> str:
    """`text` cut to `keep` characters by an ellipsis in its middle: both ends stay readable."""
    if len(text) <= keep:
        return text
    head = (keep - 3) // 2
    return text[:head] + "..." + text[len(text) - (keep - 3 - head):]


def _shorten_words(text: str, room: int) -> str:
    """Shorten the longest words (paths, reprs, names) in their middle until `text` fits `room`."""
    words = text.split(" ")
    while len(" ".join(words)) > room:
        longest = max(range(len(words)), key=lambda i: len(words[i]))
        if len(words[longest]) <= 24:
            break
        words[longest] = _middle(words[longest], max(24, len(words[longest]) - (len(" ".join(words)) - room)))
    return " ".join(words)


def _asides(text: str) -> list[tuple[int, int]]:
    """Spans of the top-level parenthesised asides of `text` (a list of names, types present)."""
    spans, depth, start = [], 0, 0
    for i, c in enumerate(text):
        if c == "(":
            start, depth = (i if depth == 0 else start), depth + 1
        elif c == ")" and depth:
            depth -= 1
            if depth == 0:
                spans.append((start, i + 1))
    return spans


def _drop_asides(text: str, keep: int) -> str:
    """The longest asides shortened to "(...)" until `text` fits: what was wrong reads whole, its examples go first."""
    spans = sorted((span for span in _asides(text) if span[1] - span[0] > 20), key=lambda span: span[0] - span[1])
    dropped, length = [], len(text)
    for a, b in spans:  # longest first, measured once: a hostile text of many asides costs one pass
        if length <= keep:
            break
        dropped.append((a, b))
        length -= b - a - 5
    out, at = [], 0
    for a, b in sorted(dropped):
        out += [text[at:a], "(...)"]
        at = b
    return "".join(out) + text[at:]


def _clauses(text: str, keep: int) -> str:
    """`text` cut to `keep` characters by leaving out whole clauses (": "-separated) from its middle.

    A problem reads from what was tried to why it failed: as many of its last clauses
    (why, what to do about it) as fit stay whole, after its first (what) where that is
    short. Where whole clauses would keep much less than a cut in the middle, the middle is cut.
    """
    if len(text) <= keep:
        return text
    parts = text.split(": ")
    head = parts[:1] if len(parts[0]) <= keep // 3 else []
    for start in range(len(head) + 1, len(parts)):
        cut = ": ".join([*head, "...", *parts[start:]])
        if len(cut) <= keep:
            return cut if len(cut) >= keep * 2 // 3 else _middle(text, keep)
    return _middle(text, keep)


def bounded(message: str, limit: int = LIMIT) -> str:
    """One line of at most `limit` characters: "where: problem; fix: ..." with the fix kept whole.

    The problem's long words are shortened in their middle first, then the
    problem itself; the where (file, rule, path) only when that is not enough.
    """
    text = str(message)
    line = " ".join(text.splitlines()) if any(c in text for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029") else text
    if not line.isprintable():  # a name from a hostile file may carry terminal escapes: shown, never sent
        line = "".join(c if c.isprintable() else ascii(c)[1:-1] for c in line)
    if len(line) <= limit:
        return line
    body, sep, fix = line.partition("; fix:")
    fix = _middle(fix, limit // 2) if sep else ""
    room = limit - len(sep) - len(fix)
    where, colon, problem = body.partition(": ")
    if colon and len(where) + 2 < room - 40:  # keep the where whole while the problem keeps 40 characters
        keep = room - len(where) - 2
        problem = problem if len(problem) <= 20 * LIMIT else _middle(problem, 20 * LIMIT)
        # shortened words first, asides where that does not fit; or the asides first (a list of twenty types) where
        # that keeps more: words shortened before the asides went cut a file's name that then had room
        words = _clauses(_drop_asides(_shorten_words(problem, keep), keep), keep)
        asides = _clauses(_shorten_words(_drop_asides(problem, keep), keep), keep)
        return where + colon + max(words, asides, key=len) + sep + fix
    return _middle(_shorten_words(body, room), room) + sep + fix


class FxsError(Exception):
    """Base of every error fxsurgery raises on bad input; its message is one line of at most 300 characters."""

    def __init__(self, message: str):
        self.full = str(message)  # as written, before bounding: for a program that needs every detail
        message = bounded(message)
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message

    @property
    def problem(self) -> str:
        """The message without its fix, for quoting inside another error."""
        return self.message.split("; fix:")[0]


class RuleError(FxsError):
    """A rule or a rule file is malformed (raised when it is loaded)."""


class ModelError(FxsError):
    """A model reference, weights file or example input cannot be used."""


class TraceError(FxsError):
    """The model's forward cannot be captured as a graph.

    `failed_in` is the innermost module whose code failed (None: the model's own
    forward, or no module in particular); `reason` is the failure without the
    fix, quoted where the module stays opaque (None: the message says it all).
    """

    def __init__(self, message: str, *, failed_in: str | None = None, reason: str | None = None):
        super().__init__(message)
        self.failed_in = failed_in
        self.reason = reason


class MatchError(FxsError):
    """A rule matched nothing although it must, or two rules conflict."""


class RewriteError(FxsError):
    """A matched rule cannot be applied to the graph."""


class ValidateError(FxsError):
    """The rewritten graph is malformed or its shapes do not fit."""


class TransferError(FxsError):
    """Weights cannot be moved, or a tensor would be left unaccounted for."""


class SaveError(FxsError):
    """A surgery result cannot be written or read back."""


class ModeError(FxsError):
    """What the original decides from `self.training` cannot be kept live in the result."""


class SurgeryWarning(UserWarning):
    """Something worth reading that is not an error (e.g. freezing a module without parameters)."""
