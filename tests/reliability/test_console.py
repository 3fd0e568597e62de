"""What a user's shell shows for extraction and training (issue #18): a few lines of the
project's own — a bar per step and its summary — and none of Ray's internal chatter, which
goes to the log files under the workspace (``-v`` shows it)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow

# Lines Ray prints on its own when nobody routes its logging (measured in issue #18).
RAY_CHATTER = ("PlacementGroupCleaner", "SplitCoordinator", "Reporting training result",
               "Checkpoint successfully created", "constructor arguments in the object store",
               "tqdm is not installed", "Execution plan of Dataset", "Registered dataset logger")


def _lines(output: str) -> list[str]:
    """The lines a terminal keeps: a progress bar redraws itself with \\r, so only its last state counts."""
    return [kept for line in output.split("\n") if (kept := line.split("\r")[-1]).strip()]


def test_extraction_and_training_print_a_few_lines_and_no_ray_chatter(clean_shell_pipeline):
    steps = {n: clean_shell_pipeline.steps[n] for n in ("extract", "train autoencoder", "train diffusion")}
    for name, step in steps.items():
        assert step.returncode == 0, (name, step.output[-3000:])
    printed = {name: _lines(step.output) for name, step in steps.items()}
    chatter = [line for lines in printed.values() for line in lines if any(p in line for p in RAY_CHATTER)]
    assert not chatter, chatter
    # MLflow's own lines, said once: no registry chatter, one run link per training run.
    for stage in ("train autoencoder", "train diffusion"):
        assert sum("View run" in line for line in printed[stage]) <= 1, printed[stage]
    assert not [line for line in printed["train diffusion"] if "already exists" in line or "Created version" in line]
    # The bound: an extraction and one training run of a tiny set, 40 lines at most.
    for stage in ("train autoencoder", "train diffusion"):
        assert len(printed["extract"]) + len(printed[stage]) <= 40, printed
