"""The REACT evaluation protocol (item order, seeds, ground truth, scoring, baselines) and the
evaluation job that runs it on a snapshot split."""
