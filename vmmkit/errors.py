"""Errors that reach the user as one clear message, without a traceback."""


class VmmkitError(Exception):
    """A user-facing error: the CLI prints its message and exits non-zero."""

    exit_code = 2
