"""Session fixtures: hermetic environment, local Ray on loopback, moto S3, MLflow sqlite.

The suite's own hermetic variables (dead proxies, no telemetry, no Ray auth) are exported at
import time, before anything can start Ray (DESIGN.md §3). They belong to the tests only: the
library sets none of them. S3 variables are exported before Ray starts too, so Ray workers
inherit the moto endpoint and the dummy credentials.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import runtime

# The same set as the Makefile's test target and .ci/run. Proxies pointing at a closed
# loopback port make any request that is not to loopback fail fast (no cloud-metadata probes,
# no stray downloads); NO_PROXY keeps moto, `mlflow server` and the Ray head reachable.
# Servers that must look "not local" listen on 127.0.0.2, outside NO_PROXY.
DEAD_PROXY = "http://127.0.0.1:9"
HERMETIC_TEST_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "RAY_AUTH_MODE": "disabled",
    "HTTP_PROXY": DEAD_PROXY,
    "HTTPS_PROXY": DEAD_PROXY,
    "http_proxy": DEAD_PROXY,
    "https_proxy": DEAD_PROXY,
    "NO_PROXY": "127.0.0.1,localhost",
    "no_proxy": "127.0.0.1,localhost",
}
PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "NO_PROXY", "no_proxy",
              "ALL_PROXY", "all_proxy")
os.environ.update(HERMETIC_TEST_ENV)
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TQDM_DISABLE", "1")
# Dummy credentials only ever valid for the moto server below.
os.environ.update({
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-not-real",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
})


@pytest.fixture(scope="session")
def clean_env() -> dict[str, str]:
    """The environment of a user's shell: this process's, without the suite's hermetic
    variables (dead proxies, Ray/MLflow settings) and without RAY_ADDRESS."""
    drop = set(HERMETIC_TEST_ENV) | set(PROXY_VARS) | {"RAY_ADDRESS"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class S3:
    endpoint: str
    bucket: str

    def uri(self, *parts: str) -> str:
        return "s3://" + "/".join([self.bucket, *parts])


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 protocol endpoint: moto's server on 127.0.0.1, on a free port."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    import boto3

    bucket = "reactdiff-test"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    yield S3(endpoint, bucket)
    server.stop()


@pytest.fixture
def s3(s3_server) -> S3:
    """The session S3 server with a fresh prefix per test: ``s3.uri("x")`` is unique to the test."""
    return S3(s3_server.endpoint, f"{s3_server.bucket}/{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="session")
def ray_local(s3_server):
    """Real local Ray, started once, loopback only (after S3 variables are exported)."""
    import ray

    runtime.init_ray(num_cpus=4)
    yield ray
    runtime.shutdown_ray()


@pytest.fixture(scope="session")
def _migrated_mlflow_db(tmp_path_factory) -> Path:
    """Create the MLflow schema once; tests copy the file instead of paying the migrations."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    mlflow.MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def mlflow_uri(tmp_path, _migrated_mlflow_db, monkeypatch):
    """A private MLflow tracking + registry store (sqlite) for one test."""
    db = tmp_path / "mlflow.db"
    shutil.copy(_migrated_mlflow_db, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)  # set_tracking_uri also exported $MLFLOW_TRACKING_URI


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """An isolated embedded working directory (``REACTDIFF_HOME``)."""
    home = tmp_path / "home"
    monkeypatch.setenv("REACTDIFF_HOME", str(home))
    return home
