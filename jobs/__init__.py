"""Thin job entrypoints: `reactdiff <command>` and `python -m jobs.<command>` for `ray job submit`."""

import pipeline  # noqa: F401  (exports the hermetic variables before anything imports Ray)
