"""Errors the library raises for bad input.

Every error a user can cause is a :class:`PCBMError` whose message names the problem
and, where possible, what to do about it. The CLI and the web app turn these into one
line (or one JSON error body) instead of a traceback.
"""


class PCBMError(ValueError):
    """Bad input or state that a person can act on; the message says what and why."""


class NotFittedError(PCBMError):
    """A model method that needs learned state was called before ``fit``."""


class DataError(PCBMError):
    """Data on disk or in memory is missing, unreadable or malformed."""


class ConfigError(PCBMError):
    """A spec, name or parameter is unknown or out of range."""


class ShapeError(PCBMError):
    """Arrays whose shapes or dimensions do not fit together."""
