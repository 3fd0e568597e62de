"""infra/local/stack.sh: a real Ray head (token auth), moto S3 and `mlflow server` on loopback.

The slow test starts the stack in a temporary state dir, checks that every listener of every
process it started binds 127.0.0.1, submits a job with the token (and is refused without it),
checks S3 and MLflow, stops the stack and checks that exactly those processes are gone.

It never uses the session's in-process Ray (`ray_local`): the stack's head has its own ports
and its own Ray temp dir, and the job is submitted to its address explicitly. RAY_AUTH_MODE and
the token are set in the subprocess environment only.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STACK = REPO / "infra" / "local" / "stack.sh"
VENV_BIN = Path(sys.executable).parent
LOOPBACK = ("127.0.0.1:", "[::ffff:127.0.0.1]:", "[::1]:")


def _clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without Ray/AWS/MLflow settings (conftest sets some)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RAY_", "AWS_", "MLFLOW_")) and k != "REACTDIFF_HOME"}
    env["REACTDIFF_VENV"] = str(VENV_BIN.parent)
    env.update(extra)
    return env


def _stack(state: Path, command: str, timeout: float, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(STACK), "--state-dir", str(state), command],
                          env=_clean_env(**env), capture_output=True, text=True, timeout=timeout)


def _read_state(state: Path) -> dict[str, str]:
    values = {}
    for line in (state / "stack.env").read_text().splitlines():
        m = re.fullmatch(r"(STACK_\w+)=(.*)", line.strip())
        if m:
            values[m.group(1)] = m.group(2).strip("'")
    return values


def _exports(text: str) -> dict[str, str]:
    return dict(re.findall(r"^export (\w+)=(.*)$", text, flags=re.M))


def _session_pids(sid: int) -> set[int]:
    out = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True).stdout
    return {int(p) for p, s in (line.split() for line in out.splitlines()) if int(s) == sid}


def _listeners(pids: set[int]) -> dict[int, list[str]]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found: dict[int, list[str]] = {}
    for line in out.splitlines():
        for pid in map(int, re.findall(r"pid=(\d+),", line)):
            if pid in pids:
                found.setdefault(pid, []).append(line.split()[3])
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().split(") ", 1)[1].split()[0] != "Z"  # zombies are gone too
    except (FileNotFoundError, IndexError):
        return False


def _latest_snapshot(root: str, endpoint: str) -> dict:
    """Counts of the newest complete snapshot under ``root`` on the stack's S3 (moto)."""
    import boto3

    bucket, prefix = root[len("s3://"):].split("/", 1)
    s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]
    manifests = sorted(k for k in keys if k.endswith("/_manifest.json"))
    everything = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert manifests, everything[:30]
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=manifests[-1])["Body"].read())
    counts = manifest["counts"]
    return {"uri": f"s3://{bucket}/{manifests[-1].rsplit('/', 1)[0]}", "counts": counts}


def _experiment_ids(mlflow_uri: str) -> list[str]:
    with urllib.request.urlopen(f"{mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=50",
                                timeout=10) as r:
        return [e["experiment_id"] for e in json.loads(r.read())["experiments"]]


# ------------------------------------------------------------------------------------------
# fast: the script's own checks


def test_script_is_valid_bash_and_documents_itself():
    subprocess.run(["bash", "-n", str(STACK)], check=True)
    out = subprocess.run(["bash", str(STACK), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("start", "stop", "status", "env"):
        assert re.search(rf"^\s*{command}\s", out, flags=re.M), command


def test_commands_without_a_running_stack(tmp_path):
    state = tmp_path / "state"
    status = _stack(state, "status", 30)
    assert status.returncode == 1 and "not running" in status.stdout
    assert _stack(state, "stop", 30).returncode == 0
    env = _stack(state, "env", 30)
    assert env.returncode != 0 and "start" in env.stderr
    bad = subprocess.run(["bash", str(STACK), "restart"], capture_output=True, text=True)
    assert bad.returncode != 0 and "unknown argument" in bad.stderr


# ------------------------------------------------------------------------------------------
# slow: the real stack


@pytest.mark.slow
def test_stack_starts_on_loopback_runs_a_job_with_the_token_and_stops_cleanly(tmp_path):
    state = tmp_path / "state"
    started = _stack(state, "start", 420, REACTDIFF_STACK_CPUS="2")
    try:
        assert started.returncode == 0, started.stderr[-3000:]
        info = _read_state(state)
        sessions = {name: int(info[f"STACK_{name}_PID"]) for name in ("RAY", "MLFLOW", "MOTO")}
        pids = set().union(*(_session_pids(sid) for sid in sessions.values()))
        assert all(sid in pids for sid in sessions.values()), "a service is not running"

        # 1. every listener of every started process binds loopback; each service listens
        listeners = _listeners(pids)
        addresses = [a for addrs in listeners.values() for a in addrs]
        exposed = [a for a in addresses if not a.startswith(LOOPBACK)]
        assert not exposed, f"listening beyond loopback: {exposed}"
        for name, port in (("ray dashboard", info["STACK_RAY_DASHBOARD_PORT"]),
                           ("ray gcs", info["STACK_RAY_GCS_PORT"]),
                           ("mlflow", info["STACK_MLFLOW_PORT"]), ("moto", info["STACK_MOTO_PORT"])):
            assert any(a.endswith(f":{port}") for a in addresses), f"{name} not listening on {port}"
        assert (state / "auth_token").stat().st_mode & 0o077 == 0, "token readable by others"

        # 2. `env` points a shell at the stack
        env_out = _stack(state, "env", 30)
        assert env_out.returncode == 0
        exports = _exports(env_out.stdout)
        dashboard = f"http://127.0.0.1:{info['STACK_RAY_DASHBOARD_PORT']}"
        assert exports["RAY_ADDRESS"] == dashboard
        assert exports["RAY_AUTH_MODE"] == "token"
        assert Path(exports["RAY_AUTH_TOKEN_PATH"]) == state / "auth_token"
        assert exports["AWS_ENDPOINT_URL"] == f"http://127.0.0.1:{info['STACK_MOTO_PORT']}"
        assert exports["MLFLOW_TRACKING_URI"] == f"http://127.0.0.1:{info['STACK_MLFLOW_PORT']}"
        assert exports["RAY_USAGE_STATS_ENABLED"] == "0"
        assert _stack(state, "status", 30).returncode == 0

        # 3. the job API refuses a client without the token ...
        ray = str(VENV_BIN / "ray")
        refused = subprocess.run([ray, "job", "list", "--address", dashboard],
                                 env=_clean_env(RAY_AUTH_MODE="disabled"),
                                 capture_output=True, text=True, timeout=60)
        assert refused.returncode != 0
        assert re.search(r"(?i)unauthori[sz]ed|authentication", refused.stdout + refused.stderr)
        # ... and runs a job with it, on this head (2 CPUs), not on any other Ray
        job_env = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=exports["RAY_AUTH_TOKEN_PATH"])
        job = subprocess.run(
            [ray, "job", "submit", "--address", dashboard, "--",
             "python", "-c", "import ray; ray.init(); print(ray.cluster_resources())"],
            env=job_env, capture_output=True, text=True, timeout=240)
        assert job.returncode == 0, (job.stdout + job.stderr)[-3000:]
        resources = re.search(r"'CPU': ([0-9.]+)", job.stdout)
        assert resources and float(resources.group(1)) == 2.0, job.stdout[-2000:]

        # 4. S3 answers and holds the bucket; MLflow answers and lists experiments
        import boto3

        s3 = boto3.client("s3", endpoint_url=exports["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
        assert info["STACK_BUCKET"] in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        mlflow_uri = exports["MLFLOW_TRACKING_URI"]
        with urllib.request.urlopen(f"{mlflow_uri}/health", timeout=10) as r:
            assert r.status == 200
        with urllib.request.urlopen(f"{mlflow_uri}/api/2.0/mlflow/experiments/search?max_results=5",
                                    timeout=10) as r:
            assert "experiments" in json.loads(r.read())

        # 5. the pipeline itself through `ray job submit`: synth → extract → tiny stage-1 training,
        #    data on the stack's S3, runs in the stack's MLflow server (issue: operations e2e)
        bucket = f"s3://{info['STACK_BUCKET']}/e2e"
        job_vars = {"AWS_ENDPOINT_URL": exports["AWS_ENDPOINT_URL"], "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                    "MLFLOW_TRACKING_URI": mlflow_uri}
        steps = [
            ["jobs.synth", "--out", f"{bucket}/raw", "--set", "dyads=[2,1,1]", "--set", "frames=120"],
            ["jobs.extract", "--config", "jobs/configs/extract.yaml", "--data", f"{bucket}/raw",
             "--out", f"{bucket}/snapshots"],
        ]

        def submit(step):
            submitted = subprocess.run(
                [ray, "job", "submit", "--address", dashboard,
                 "--runtime-env-json", json.dumps({"env_vars": job_vars}), "--",
                 sys.executable, "-m", *step],
                cwd=REPO, env=job_env, capture_output=True, text=True, timeout=420)
            assert submitted.returncode == 0, (step[0], (submitted.stdout + submitted.stderr)[-4000:])
            return submitted.stdout

        for step in steps:
            submit(step)
        snapshot = _latest_snapshot(f"{bucket}/snapshots", exports["AWS_ENDPOINT_URL"])
        assert snapshot["counts"]["clips"] == 8 and snapshot["counts"]["quarantined"] == 0, snapshot
        submit(["jobs.train", "--config", "jobs/configs/train.yaml", "--stage", "autoencoder",
                "--features", snapshot["uri"], "--set", f"storage_path={bucket}/checkpoints",
                "--set", "model.seq_len=100", "--set", "stage1.epochs=1", "--set", "stage1.batch_size=2",
                "--set", "scaling.num_workers=1"])
        runs = json.loads(urllib.request.urlopen(urllib.request.Request(
            f"{mlflow_uri}/api/2.0/mlflow/runs/search", method="POST",
            data=json.dumps({"experiment_ids": _experiment_ids(mlflow_uri)}).encode(),
            headers={"Content-Type": "application/json"}), timeout=30).read()).get("runs", [])
        finished = [r for r in runs if r["info"]["status"] == "FINISHED"]
        assert finished, runs
        assert any(m["key"] == "train/loss" for r in finished for m in r["data"].get("metrics", []))

        # 6. the default Ray temp dir does not point other `ray.init()` calls at this head
        current = Path("/tmp/ray/ray_current_cluster")
        if current.exists():
            assert not current.read_text().strip().endswith(f":{info['STACK_RAY_GCS_PORT']}")
        assert Path(info["STACK_RAY_TMP"]).is_dir()

        # 7. a second start refuses while this one runs
        again = _stack(state, "start", 60)
        assert again.returncode != 0 and "already running" in again.stderr
    finally:
        stopped = _stack(state, "stop", 180)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    still = sorted(p for p in pids if _alive(p))
    assert not still, f"processes left after stop: {still}"
    assert not (state / "stack.env").exists() and not (state / "auth_token").exists()
    assert not Path(info["STACK_RAY_TMP"]).exists()
    assert (state / "logs" / "ray-head.log").is_file()
    assert _stack(state, "status", 30).returncode == 1
