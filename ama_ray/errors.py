"""Errors the user can fix.

Every exception here carries a one-line message naming what is wrong, where (file, row,
field or config key) and what to do. The CLI prints it on one line and exits with code 2;
anything else is a bug and keeps its traceback (exit code 1).
"""

from __future__ import annotations


class AmaError(Exception):
    """Base class of the errors a user can fix; `str(err)` is the whole one-line message."""

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        parts = [f"{where}: {what}" if where else what]
        if fix:
            parts.append(fix)
        super().__init__(" -- ".join(parts).replace("\n", " "))


class ConfigError(AmaError):
    """A configuration key is unknown, has the wrong type, or is out of range."""


class DataError(AmaError):
    """Input data cannot be read or normalised (file, line/row, field)."""


class ModelError(AmaError):
    """A model or tokenizer cannot be found or loaded."""


class StorageError(AmaError):
    """The run directory cannot be written, or holds inconsistent outputs."""


class ResourceError(AmaError):
    """The cluster can never satisfy a resource request."""


class StageInputError(AmaError):
    """A stage's inputs from an earlier stage are missing or do not match."""


class NumericalError(AmaError):
    """Training produced a non-finite loss, statistic or gradient; the run stopped instead of
    committing (or mixing on) garbage."""
