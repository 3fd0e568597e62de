"""Real `ray start` nodes for tests that model a cluster, each in its own session.

`ray start --block` stays in the foreground as the session leader, so a node is exactly its
session: stopping it signals that process group only, never `ray stop` (which would stop
every Ray of the user, e.g. the test session's own).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")


def start_node(env: dict[str, str], log: Path, *args: str, cwd: str | Path | None = None) -> subprocess.Popen:
    return subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats", *args], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True, cwd=cwd)


def wait_until_up(address: str, env: dict[str, str], proc: subprocess.Popen, log: Path,
                  needle: str = "", timeout: float = 180) -> None:
    """Until `ray status` answers (and lists ``needle``, e.g. a node's custom resource)."""
    deadline = time.monotonic() + timeout
    while True:
        status = subprocess.run([RAY, "status", f"--address={address}"], env=env, capture_output=True,
                                text=True, timeout=60)
        if status.returncode == 0 and needle in status.stdout:
            return
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"Ray node not up at {address}:\n{log.read_text()[-3000:]}")
        time.sleep(1)


def stop_session(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGTERM the session this test started (a Ray node drains for up to 30 s), then SIGKILL."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
