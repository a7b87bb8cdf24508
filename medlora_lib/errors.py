"""Errors raised for users' mistakes: each message names the file or field and the fix."""

from __future__ import annotations

__all__ = [
    "MedloraError",
    "DataError",
    "ConfigError",
    "CheckpointError",
    "DataWarning",
]


class MedloraError(Exception):
    """Base class for every error a user can fix (bad file, bad value, bad layout)."""


class DataError(MedloraError, ValueError):
    """A data file or folder is missing, corrupt or laid out differently than expected."""


class ConfigError(MedloraError, ValueError):
    """A configuration value is unknown or out of range."""


class CheckpointError(MedloraError, ValueError):
    """A checkpoint cannot be read or does not fit the model."""


class DataWarning(UserWarning):
    """Data were written or read, but something about them needs the user's attention."""
