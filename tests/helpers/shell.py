"""The pipeline as a user runs it: `reactdiff` commands from a clean shell against S3 and an
MLflow server that are *not* 127.0.0.1, while every TCP listener is sampled.

The suite itself runs with dead proxies and ``NO_PROXY=127.0.0.1,localhost`` (DESIGN §3), so
a server on 127.0.0.1 hides any proxy the library might set. These servers listen on
127.0.0.2 — still loopback, but outside NO_PROXY, like AWS S3 or a MinIO host — and the
commands run with the suite's hermetic variables removed (no proxies, no Ray settings, no
RAY_ADDRESS) and a fresh HOME: exactly a user's shell. Anything the library changed in the
network environment would make them fail (this is how the exported dead proxies of an earlier
version broke real S3).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.runtime import is_local_address
from tests.helpers.faults import own_descendants, wait_for
from tests.helpers.ray_nodes import stop_session  # noqa: F401  (servers stop like Ray nodes: by session)

FAR = "127.0.0.2"                 # loopback, outside the suite's NO_PROXY
REACTDIFF = str(Path(sys.executable).parent / "reactdiff")
MLFLOW = str(Path(sys.executable).parent / "mlflow")


def far_port(host: str = FAR) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def is_loopback(address: str) -> bool:
    """``ss`` local address ``host:port`` (``[v6]:port``, ``*:port``) on a loopback address?"""
    host = address.rsplit(":", 1)[0]
    return host not in ("*", "0.0.0.0", "[::]") and is_local_address(host)


# ---------------------------------------------------------------------------------------------
# Listeners of every process this test started, sampled while the jobs run


@dataclass(frozen=True)
class Listener:
    phase: str
    address: str
    pid: int
    command: str


class ListenerSampler:
    """Every ``interval`` s, ``ss -ltnp`` rows of this process and all its descendants (the
    commands, their local Ray nodes and Ray workers, the servers), tagged with the phase."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.phase = "setup"
        self.samples: dict[str, int] = {}
        self.rows: set[Listener] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="listener-sampler")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        phase = self.phase
        procs = {os.getpid(): "pytest", **own_descendants()}
        out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            cols = line.split()
            for pid in map(int, re.findall(r"pid=(\d+),", line)):
                if pid in procs and len(cols) > 3:
                    self.rows.add(Listener(phase, cols[3], pid, procs[pid][:160]))
        self.samples[phase] = self.samples.get(phase, 0) + 1

    def exposed(self) -> list[Listener]:
        return sorted((r for r in self.rows if not is_loopback(r.address)), key=lambda r: (r.phase, r.pid))

    def in_phase(self, phase: str) -> list[Listener]:
        return [r for r in self.rows if r.phase == phase]


# ---------------------------------------------------------------------------------------------
# Servers on 127.0.0.2


def user_env(clean_env: dict[str, str], home: Path, **extra: str) -> dict[str, str]:
    """A user's shell: no hermetic variables, a fresh HOME (Ray's default token auth writes
    ~/.ray/auth_token there), dummy S3 keys of the moto server, and ``extra``."""
    home.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in clean_env.items()
           if not k.startswith(("AWS_ENDPOINT", "MLFLOW_", "REACTDIFF_"))}
    env.update(HOME=str(home), REACTDIFF_HOME=str(home / ".reactdiff"), PYTHONUNBUFFERED="1", **extra)
    return env


def start_moto(env: dict[str, str], log: Path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server on 127.0.0.2 in its own session; returns (process, endpoint)."""
    port = far_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", FAR, "-p", str(port)], env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://{FAR}:{port}"
    wait_for(lambda: _answers(f"{FAR}", port) or proc.poll() is not None, 120, what="moto on 127.0.0.2")
    assert proc.poll() is None, log.read_text()[-2000:]
    return proc, endpoint


def start_mlflow(env: dict[str, str], root: Path, bucket: str, log: Path) -> tuple[subprocess.Popen, str]:
    """`mlflow server` on 127.0.0.2 (sqlite, artifacts proxied to s3://<bucket>/mlflow)."""
    port = far_port()
    proc = subprocess.Popen(
        [MLFLOW, "server", "--host", FAR, "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{bucket}/mlflow", "--allowed-hosts", f"{FAR}:{port}"],
        env={**env, "MLFLOW_S3_ENDPOINT_URL": env["AWS_ENDPOINT_URL"]}, cwd=root,
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://{FAR}:{port}"
    wait_for(lambda: _http_ok(f"{uri}/health") or proc.poll() is not None, 300, interval=1.0,
             what="mlflow server on 127.0.0.2")
    assert proc.poll() is None, log.read_text()[-3000:]
    return proc, uri


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _http_ok(url: str) -> bool:
    import urllib.request

    # No proxy: the test process has the suite's dead proxies and 127.0.0.2 is outside NO_PROXY.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# Commands


@dataclass
class Step:
    argv: list[str]
    returncode: int
    stdout: str
    output: str          # stdout + stderr, for failure messages
    seconds: float


@dataclass
class CleanShellRun:
    s3: str
    bucket: str
    mlflow_uri: str
    env: dict[str, str]
    steps: dict[str, Step] = field(default_factory=dict)
    sampler: ListenerSampler | None = None

    def run(self, name: str, *args: str, timeout: float = 1200) -> Step:
        """``reactdiff ARGS`` in the user's shell; the sampler tags listeners with ``name``."""
        if self.sampler is not None:
            self.sampler.phase = name
        argv = [REACTDIFF, *args]
        t0 = time.monotonic()
        proc = subprocess.run(argv, env=self.env, cwd=self.env["HOME"], capture_output=True, text=True,
                              timeout=timeout)
        if self.sampler is not None:
            self.sampler.phase = f"after {name}"
        step = Step(argv, proc.returncode, proc.stdout, proc.stdout + proc.stderr, time.monotonic() - t0)
        self.steps[name] = step
        return step

    def python(self, code: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code, *args], env=self.env, capture_output=True,
                              text=True, timeout=timeout, cwd=self.env["HOME"])


def create_bucket(run: CleanShellRun) -> None:
    proc = run.python("import sys, boto3; boto3.client('s3').create_bucket(Bucket=sys.argv[1])", run.bucket)
    assert proc.returncode == 0, proc.stderr[-2000:]
