"""Real object storage from a user's shell and from the workers of a real multi-node cluster.

S3 (moto) and the MLflow tracking server listen on 127.0.0.2: loopback, but outside the
suite's NO_PROXY, so they stand in for AWS S3 / MinIO / a remote MLflow host. The commands run
without the suite's dead proxies (tests/helpers/shell.py); anything the library did
to the network environment (an earlier version exported dead proxies on `import pipeline`)
makes them fail with a ProxyConnectionError.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.helpers import report as R
from tests.helpers import shell as C
from tests.helpers.ray_nodes import start_node, stop_session, wait_until_up

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = ["synth", "inspect", "extract", "train autoencoder", "train diffusion", "evaluate"]


def _objects(run: C.CleanShellRun, prefix: str) -> list[str]:
    code = ("import sys, boto3\n"
            "pages = boto3.client('s3').get_paginator('list_objects_v2').paginate(Bucket=sys.argv[1], Prefix=sys.argv[2])\n"
            "print('\\n'.join(o['Key'] for p in pages for o in p.get('Contents', [])))\n")
    proc = run.python(code, run.bucket, prefix)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split()


@pytest.mark.parametrize("step", STEPS)
def test_every_command_reaches_s3_and_mlflow_outside_no_proxy(clean_shell_pipeline, step, request):
    step_run = clean_shell_pipeline.steps.get(step)
    assert step_run is not None, f"{step} did not run"
    R.case(R.SECURITY, f"clean shell, S3 + MLflow on 127.0.0.2: reactdiff {step}",
           "ok" if step_run.returncode == 0 else f"exit {step_run.returncode}", nodeid=request.node.nodeid,
           detail=f"{step_run.seconds:.0f}s")
    assert step_run.returncode == 0, f"{' '.join(step_run.argv[1:])}\n{step_run.output[-4000:]}"
    assert "ProxyConnectionError" not in step_run.output


def test_outputs_are_on_s3_and_the_model_in_the_mlflow_server(clean_shell_pipeline):
    run = clean_shell_pipeline
    keys = _objects(run, "")
    assert any(k.startswith("react/snapshots/") and k.endswith("/_manifest.json") for k in keys)
    assert any(k.startswith("react/checkpoints/") for k in keys)
    assert any(k.startswith("mlflow/") for k in keys), "the MLflow server stored no artifact on S3"
    report = run.python("import sys, boto3; print(boto3.client('s3').get_object(Bucket=sys.argv[1], "
                        "Key='react/eval/report.json')['Body'].read().decode())", run.bucket)
    assert report.returncode == 0, report.stderr[-2000:]
    assert "FRCorr" in report.stdout
    alias = run.python("import mlflow; v = mlflow.MlflowClient().get_model_version_by_alias('reactdiff', "
                       "'challenger'); print(v.version, v.source)")
    assert alias.returncode == 0, alias.stderr[-2000:]
    assert alias.stdout.split()[0].isdigit()


# ---------------------------------------------------------------------------------------------
# A two-node cluster (`ray start --head` + `ray start --address`), the model of a `ray up`
# cluster: its workers have no RAY_ADDRESS and must read S3 themselves.


WORKER_READ = textwrap.dedent("""
    import json, os, sys
    import ray

    ray.init()                                    # RAY_ADDRESS: the head's GCS

    @ray.remote(resources={"far_worker": 1})
    def read(uri):
        import pipeline                           # what every job's worker imports
        from pipeline import storage
        return {"ray_address": os.environ.get("RAY_ADDRESS"),
                "proxies": {k: v for k, v in os.environ.items() if "proxy" in k.lower()},
                "data": storage.read_bytes(uri).decode()}

    out = ray.get(read.remote(sys.argv[1]), timeout=300)
    print("RESULT", json.dumps(out))
""")


def test_a_worker_node_without_ray_address_reads_s3(tmp_path, clean_env, request):
    # Ray's unix socket paths must stay under 108 bytes: a short temp dir, not tmp_path.
    ray_tmp = tempfile.mkdtemp(prefix="rd2n.", dir="/tmp")
    env = C.user_env(clean_env, tmp_path / "home")
    moto, endpoint = C.start_moto(env, tmp_path / "moto.log")
    nodes: list[subprocess.Popen] = []
    try:
        env["AWS_ENDPOINT_URL"] = endpoint
        run = C.CleanShellRun(endpoint, "reactdiff-cluster", "", env)
        C.create_bucket(run)
        uri = f"s3://{run.bucket}/hello.txt"
        put = run.python("import sys; from pipeline import storage; storage.write_bytes(sys.argv[1], b'from S3')", uri)
        assert put.returncode == 0, put.stderr[-2000:]

        token = tmp_path / "auth_token"
        token.write_text(os.urandom(32).hex())
        token.chmod(0o600)
        # Two "hosts" on this host's loopback, 127.0.0.3 (head) and 127.0.0.4 (worker node):
        # addresses Ray does not rewrite to the host's IP, as it does 127.0.0.1 in cluster mode.
        # Like every multi-node Ray, these nodes listen on all interfaces for the test's minute,
        # behind token authentication as on every cluster of this project.
        cluster_env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                       "RAY_USAGE_STATS_ENABLED": "0"}
        gcs = C.far_port("127.0.0.3")
        nodes.append(start_node(cluster_env, tmp_path / "head.log", "--head", "--node-ip-address=127.0.0.3",
                                f"--port={gcs}", "--num-cpus=0", "--include-dashboard=false",
                                f"--temp-dir={ray_tmp}", cwd=REPO))
        address = f"127.0.0.3:{gcs}"
        wait_until_up(address, cluster_env, nodes[0], tmp_path / "head.log")
        nodes.append(start_node(cluster_env, tmp_path / "worker.log", f"--address={address}",
                                "--node-ip-address=127.0.0.4", "--num-cpus=1", '--resources={"far_worker": 1}',
                                cwd=REPO))
        wait_until_up(address, cluster_env, nodes[1], tmp_path / "worker.log", needle="far_worker")

        driver = subprocess.run([sys.executable, "-c", WORKER_READ, uri], env={**cluster_env, "RAY_ADDRESS": address},
                                capture_output=True, text=True, timeout=600, cwd=REPO)
        line = [ln for ln in driver.stdout.splitlines() if ln.startswith("RESULT ")]
        R.case(R.SECURITY, "2-node cluster: a worker without RAY_ADDRESS reads S3 on 127.0.0.2",
               "read" if line else "failed", nodeid=request.node.nodeid)
        assert line, driver.stdout[-2000:] + driver.stderr[-4000:]
        result = json.loads(line[0][len("RESULT "):])
        assert result["data"] == "from S3"
        assert result["ray_address"] is None                   # like a `ray up` worker
        assert result["proxies"] == {}                         # nothing added one on import
    finally:
        for node in reversed(nodes):
            stop_session(node)
        stop_session(moto)
        shutil.rmtree(ray_tmp, ignore_errors=True)
