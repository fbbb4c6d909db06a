"""Errors a user can act on. The CLI prints their message, not a traceback."""

from __future__ import annotations


class TurbofedError(Exception):
    """Base of every error turbofed reports to a user."""


class DataError(TurbofedError):
    """A data file is missing or malformed; the message names the file (and line)."""


class ConfigError(TurbofedError):
    """A TOML config is missing, malformed or names an unknown setting."""


class WeightsError(TurbofedError):
    """An ONNX model's weights do not fit the reference model or limits."""
