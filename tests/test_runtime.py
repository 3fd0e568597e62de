"""Local runtime: loopback-only Ray, embedded defaults, attach via RAY_ADDRESS."""

import os
import subprocess

import pytest

from pipeline import runtime

# IPv4, IPv6 and IPv4-mapped IPv6 loopback (gRPC listens on the latter).
# All of 127.0.0.0/8 is loopback: the suite's "not 127.0.0.1" S3 and MLflow servers sit on
# 127.0.0.2 (tests/reliability/test_real_s3.py), children of this process like Ray's.
LOOPBACK = ("127.", "[::1]:", "[::ffff:127.")


def test_importing_the_library_changes_no_environment_variable(clean_env):
    """`import pipeline` (and every module a job imports) exports nothing: no proxies, no Ray
    settings. A clean interpreter imports them and compares its environment before/after."""
    import sys

    script = ("import json, os, sys\n"
              "before = dict(os.environ)\n"
              "import pipeline, pipeline.runtime, pipeline.storage, pipeline.data.extract, pipeline.train.job\n"
              "import pipeline.evaluate.job, pipeline.generate.job, jobs.cli\n"
              "after = dict(os.environ)\n"
              "print(json.dumps({k: after.get(k) for k in set(before) | set(after) if before.get(k) != after.get(k)}))\n")
    proc = subprocess.run([sys.executable, "-c", script], env=clean_env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}


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


@pytest.mark.parametrize("import_ray_first", [False, True])
def test_loopback_even_without_env_and_with_early_ray_import(tmp_path, import_ray_first, clean_env):
    """A job started without the variables (e.g. from a bare shell), even one that imported
    Ray before our runtime, still binds every Ray listener to loopback."""
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        ("import ray\n" if import_ray_first else "")
        + "import subprocess\n"
        "from pipeline import runtime\n"
        "runtime.init_ray(num_cpus=1)\n"
        "import ray, psutil  # psutil ships inside Ray\n"
        "ray.get(ray.remote(lambda: 1).remote())\n"
        "me = psutil.Process(); pids = {me.pid} | {c.pid for c in me.children(recursive=True)}\n"
        "out = subprocess.run(['ss', '-ltnpH'], capture_output=True, text=True).stdout\n"
        "rows = [l.split()[3] for l in out.splitlines() if any(f'pid={p},' in l for p in pids)]\n"
        "print('LISTEN', ' '.join(rows))\n"
    )
    env = {k: v for k, v in clean_env.items() if k != "AWS_ENDPOINT_URL"}
    env["RAY_AUTH_MODE"] = "disabled"     # Ray's default (token) would write ~/.ray/auth_token
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=180)
    line = [l for l in proc.stdout.splitlines() if l.startswith("LISTEN")]
    assert line, proc.stderr[-2000:]
    listeners = line[0].split()[1:]
    assert listeners
    assert all(a.startswith(LOOPBACK) for a in listeners), listeners


def test_local_dashboard_serves_the_state_api_on_loopback(ray_local):
    """Ray Train's PlacementGroupCleaner asks the State API (the dashboard) every second whether
    the controller lives; without a dashboard each query fails with a console warning. The local
    dashboard runs, answers, and listens on 127.0.0.1 only."""
    import psutil
    from ray.util.state import list_actors

    list_actors(limit=1)                     # raises RayStateApiException without a dashboard
    dashboards = {p.pid for p in psutil.Process().children(recursive=True)
                  if any("dashboard.py" in part for part in p.cmdline())}
    assert dashboards, "no local dashboard process"
    listeners = _listening_sockets(dashboards)
    assert listeners and all(a.startswith(LOOPBACK) for a in listeners), listeners


def test_local_ray_keeps_token_auth_without_rays_startup_warning(tmp_path, clean_env):
    """With RAY_AUTH_MODE unset, Ray turns token auth on for a new local cluster and warns on
    every start; init_ray asks for it explicitly: same protection, no warning. A user's own
    choice (``disabled``) is kept."""
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        "import os, ray\n"
        "from pipeline import runtime\n"
        "runtime.init_ray(num_cpus=1)\n"
        "assert ray.get(ray.remote(lambda: 7).remote()) == 7\n"
        "print('MODE', os.environ.get('RAY_AUTH_MODE'))\n"
    )
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in clean_env.items() if k not in ("AWS_ENDPOINT_URL", "RAY_AUTH_MODE")}
    env.update(HOME=str(home), REACTDIFF_HOME=str(tmp_path / "ws"))
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MODE token" in proc.stdout
    assert (home / ".ray" / "auth_token").is_file(), "token auth on means a token was made"
    assert "Token authentication is enabled" not in proc.stderr, proc.stderr[-2000:]

    proc = subprocess.run([sys.executable, str(script)], env={**env, "RAY_AUTH_MODE": "disabled"},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "MODE disabled" in proc.stdout
