"""Errors that blame the input, not the code: ``train.py`` prints them as one paragraph, without a traceback.

Raise :class:`PotentialsInputError` (or a subclass) when a file, record, field, option or checkpoint given by the
user cannot be used, with a message that says what is wrong, where (file, record, field) and what to do.
It is a ``ValueError``, so code that catches ``ValueError`` keeps working.
"""

from __future__ import annotations


class PotentialsInputError(ValueError):
    """Bad input from the user: a data file, a record in it, a config value, a checkpoint or a model file."""
