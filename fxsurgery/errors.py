"""One base exception, one subclass per stage.

Every message is a single line that says where (rule file and line, or the
Python rule), what went wrong, and the fix. The CLI prints it as it is.
"""

from __future__ import annotations


class FxsError(Exception):
    """Base of every error fxsurgery raises on bad input."""

    def __init__(self, message: str):
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
