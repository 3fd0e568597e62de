"""Thin job entrypoints: `reactdiff <command>` and `python -m jobs.<command>` for `ray job submit`."""
