"""The error the data layer raises for bad user input (paths, corpora, splits, window sizes)."""

from __future__ import annotations


class DataError(ValueError):
    """A data path, corpus or split the user asked for cannot be used; the message names the culprit."""
