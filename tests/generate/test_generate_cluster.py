"""One clip on a cluster with GPUs: `generate` runs as a Ray task holding a GPU, not in the driver.

A real `ray start --head` node on loopback declares one GPU (Ray schedules by declared
resources; the task then runs its torch code on CPU because this machine has no CUDA). The job
is `python -m jobs.generate` attached through the head's address, as under `ray job submit`.
The node is started without MLFLOW_TRACKING_URI: the worker gets it from the driver's task.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.helpers.ray_nodes import start_node, stop_session, wait_until_up

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def gpu_head(tmp_path):
    """A one-node Ray cluster on 127.0.0.1 with 2 CPUs and 1 (declared) GPU; yields its address."""
    temp = tempfile.mkdtemp(prefix="rdgpu.", dir="/tmp")      # unix socket paths < 108 bytes
    port = _port()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS")}
    log = tmp_path / "head.log"
    proc = start_node(env, log, "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
                      "--num-gpus=1", "--include-dashboard=false", f"--temp-dir={temp}", cwd=REPO)
    try:
        wait_until_up(f"127.0.0.1:{port}", env, proc, log)
        yield f"127.0.0.1:{port}"
    finally:
        stop_session(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_one_clip_runs_as_a_gpu_task_when_the_cluster_has_gpus(gpu_head, registry, speaker, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.generate", "--model", "models:/reactdiff@champion",
         "--speaker-video", speaker.video, "--speaker-audio", speaker.audio, "--out", str(out),
         "--samples", "2", "--steps", "2", "--no-video", "--no-plot", "--set", f"ray_address={gpu_head}"],
        env={**os.environ, "MLFLOW_TRACKING_URI": registry.uri}, capture_output=True, text=True,
        timeout=900, cwd=REPO)
    said = proc.stdout + proc.stderr
    assert proc.returncode == 0, said[-4000:]
    assert "generated on a GPU worker (GPU ids ['0'])" in said, said[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [
        "generation.json", "reaction_00.csv", "reaction_00.npy", "reaction_01.csv", "reaction_01.npy"]


def test_without_a_cluster_one_clip_is_generated_in_the_driver(monkeypatch):
    from pipeline.generate.job import GenerateConfig, _clip_wants_a_gpu_task

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = GenerateConfig(speaker_video="x.mp4", device="cuda")
    assert not _clip_wants_a_gpu_task(cfg)        # no cluster: never a task that cannot be placed
