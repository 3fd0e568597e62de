"""Listener reactions for new speaker clips and for snapshot splits: the job and its renderings."""
