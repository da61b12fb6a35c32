"""Errors a user can act on.

Anything raised as a `FoundationError` is printed by the CLI as one clear sentence (what was
wrong, where, how to fix it) without a traceback; everything else is a bug and keeps its traceback.
"""


class FoundationError(Exception):
    """Base class for errors caused by input, configuration or environment, not by a bug."""


class ConfigError(FoundationError):
    """A configuration file or override is invalid."""


class DataError(FoundationError):
    """A data file, shard or manifest is missing, malformed or inconsistent with its schema."""
