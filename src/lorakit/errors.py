"""User-facing errors: what was wrong, where, and what to do.

The CLI prints a `LorakitError` as one message and exits with status 2; anything else is a bug and gets a
short message plus the path of a log file with the traceback.
"""
from __future__ import annotations

import difflib
from typing import Iterable


class LorakitError(ValueError):
    """An anticipated user error (bad config, bad data, bad file). Subclasses ValueError."""


class ConfigError(LorakitError):
    """A configuration value is invalid."""


class DataError(LorakitError):
    """A data file or row is invalid."""


class AdapterFileError(LorakitError):
    """An adapter file is missing, corrupted, unsafe, or does not fit the model."""


class ModelLoadError(LorakitError):
    """A base model could not be found or loaded."""


def did_you_mean(word: str, choices: Iterable[str], n: int = 3) -> str:
    """Returns ' Did you mean: a, b?' for close matches of `word`, or '' when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=n, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""
