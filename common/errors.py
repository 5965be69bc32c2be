"""Errors privet raises on bad input.

Every error a user can cause carries the thing that was wrong and how to fix it, so the command line
can print one line instead of a traceback from deep inside torch or pydantic.
"""

from __future__ import annotations

__all__ = [
    "BudgetExhaustedError",
    "ConfigError",
    "DataError",
    "DeploymentError",
    "ModelError",
    "PrivacyError",
    "PrivetError",
    "UpdateError",
]


class PrivetError(Exception):
    """Base class of the errors privet raises on bad input or unmet guarantees.

    Parameters
    ----------
    message
        What went wrong, naming the field, file or value.
    fix
        What the user can change to make it work.

    """

    def __init__(self, message: str, *, fix: str | None = None) -> None:
        self.message = message
        self.fix = fix
        super().__init__(_sentences(message, fix))


def _sentences(message: str, fix: str | None) -> str:
    """``message`` and ``fix`` as separate sentences: "X does not exist. Fix: check Y."."""
    text = message.rstrip()
    if fix is None:
        return text
    if not text.endswith((".", "!", "?", ":")):
        text += "."
    return f"{text} Fix: {fix.strip()}"


class ConfigError(PrivetError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""


class DataError(PrivetError):
    """A data file or data source cannot be used (missing, empty, wrong columns or labels)."""


class ModelError(PrivetError):
    """A model or tokenizer cannot be loaded or does not fit the task."""


class PrivacyError(PrivetError):
    """A privacy guarantee cannot hold with these settings, so privet refuses to go on."""


class BudgetExhaustedError(PrivacyError):
    """A client's next round would take its cumulative epsilon past its budget."""


class UpdateError(PrivetError):
    """A model update does not match what was sent (keys, shapes, dtypes) or is not finite."""


class DeploymentError(PrivetError):
    """A coordinator or client process cannot start, connect or authenticate."""
