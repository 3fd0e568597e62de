"""Local runtime: loopback-only Ray, embedded defaults, attach via RAY_ADDRESS."""

import os
import subprocess

import pytest

from pipeline import runtime

# IPv4, IPv6 and IPv4-mapped IPv6 loopback (gRPC listens on the latter).
LOOPBACK = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")


def test_hermetic_env_is_set_before_ray():
    for key, value in runtime.HERMETIC_ENV.items():
        assert os.environ[key] == value


def test_workspace_defaults(workdir):
    ws = runtime.workspace()
    assert ws.root == workdir.resolve()
    assert ws.mlflow_tracking_uri.startswith("sqlite:///") or "MLFLOW_TRACKING_URI" in os.environ
    assert ws.snapshots.startswith(str(workdir))


def _listening_sockets(pids: set[int]) -> list[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        if any(f"pid={pid}," in line for pid in pids):
            rows.append(line.split()[3])
    return rows


def _ray_pids() -> set[int]:
    import psutil

    me = psutil.Process()
    pids = {me.pid}
    for child in me.children(recursive=True):
        pids.add(child.pid)
    return pids


def test_local_ray_listens_on_loopback_only(ray_local):
    import ray

    @ray.remote
    def ping():
        return "pong"

    assert ray.get(ping.remote()) == "pong"
    assert ray.cluster_resources()["CPU"] >= runtime.MIN_LOGICAL_CPUS
    listeners = _listening_sockets(_ray_pids())
    assert listeners, "expected Ray (and moto) to listen somewhere"
    exposed = [addr for addr in listeners if not addr.startswith(LOOPBACK)]
    assert not exposed, f"listeners beyond loopback: {exposed}"


def test_init_ray_is_idempotent(ray_local):
    runtime.init_ray()
    import ray

    assert ray.is_initialized()
