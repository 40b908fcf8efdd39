"""Errors that reach the user as one line and exit code 2 (see jobs/common.py)."""


class InputError(Exception):
    """Bad arguments or unreadable/invalid input; the message names the path, row or field."""
