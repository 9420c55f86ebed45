"""Errors users see as one line (the CLI prints them and exits non-zero, no traceback)."""


class UlrecError(Exception):
    """Base for errors caused by input (files, data, arguments), not by a bug."""

    exit_code = 1


class DataError(UlrecError):
    """A dataset file is missing, truncated or malformed; the message names the file (and line)."""


class InputError(UlrecError):
    """A bad argument to a public function (shape, range, NaN); the message names the argument."""
