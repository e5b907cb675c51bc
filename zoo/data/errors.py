"""Errors and warnings of the data sources."""
from __future__ import annotations


class DataError(Exception):
    """Data that cannot be used: a missing root, no class folders, a non-image or corrupt file.

    The message always names the offending path.
    """


class DataWarning(UserWarning):
    """A bad file that was skipped (``skip_bad``); the message names the file and the reason."""
