"""Errors a user can act on. The CLI prints their message, not a traceback."""

from __future__ import annotations

from turbofed.refusals import Refusal


class TurbofedError(Exception):
    """Base of every error turbofed reports to a user."""


class DataError(TurbofedError):
    """A data file is missing or malformed; the message names the file (and line)."""


class ConfigError(TurbofedError):
    """A TOML config is missing, malformed or names an unknown setting."""


class Refused(TurbofedError):
    """Input refused for a reason to count and log: `reason` is its Refusal.

    Subclasses set a class-level default; a raiser may name a more precise one.
    """

    reason: Refusal = Refusal.WRONG_FIELDS

    def __init__(self, message: str, reason: Refusal | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = Refusal(reason)


class WeightsError(Refused):
    """An ONNX model's weights do not fit the reference model or limits."""

    reason = Refusal.BAD_MODEL
