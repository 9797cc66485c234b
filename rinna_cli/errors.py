"""Errors that the CLI turns into a one-line message and an exit code."""


class RinnaError(Exception):
    """A failure the user can act on; ``str(err)`` is the one-line message."""

    exit_code = 1


class UsageError(RinnaError):
    """Bad input or options (exit 2)."""

    exit_code = 2


class ModelError(RinnaError):
    """The model could not be found, read or loaded (exit 1)."""
