"""The base class of errors the user can fix: bad options, missing data, a refused promotion.

Each job's errors derive from ``UserError`` (``ConfigError``, ``SnapshotError``, ``TrainError``,
``RegistryError``, ...). The ``reactdiff`` CLI catches them in one place, prints the message
(which says what to change) without a traceback and exits with the error's ``exit_code``;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the file or option and what to do."""

    exit_code: int = 1
    kind: str = ""      # printed before the message, e.g. "configuration error"
