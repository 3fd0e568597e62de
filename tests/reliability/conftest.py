"""Fixtures of the reliability suite, and the summary it prints at the end of the run.

Data are tiny on purpose: clips of 50 frames (one diffusion window of the ``small`` preset);
the clean dataset is 2/1/1 dyads (8 person clips). The clean extraction runs once per session on
moto S3 with a Ray worker SIGKILLed in the middle of a clip, and with the driver's S3 secret set
to a unique marker; its snapshot then feeds the training fault tests.

Helpers shared with the other suites (media writers, tiny networks, the tiny 2-worker training
config) and the fault injectors come from tests.helpers.
"""

from __future__ import annotations

import json
import os
import threading
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.data import react, synth
from pipeline.data.extract import ExtractConfig, extract
from tests.helpers import faults as F
from tests.helpers import report as R
from tests.helpers import shell as C
from tests.helpers.training import tiny_overrides


# ---------------------------------------------------------------------------------------------
# The summary


def pytest_runtest_logreport(report):
    if "reliability/" not in report.nodeid.replace("\\", "/"):
        return
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        outcome = report.outcome
        if hasattr(report, "wasxfail"):
            outcome = "xfailed" if report.skipped else "xpassed"
            R.REPORT.xfail_reasons[report.nodeid] = report.wasxfail
        elif report.when == "setup" and report.outcome == "failed":
            outcome = "error"
        R.REPORT.outcomes[report.nodeid] = outcome


def pytest_terminal_summary(terminalreporter):
    lines = R.render()
    if not lines:
        return
    terminalreporter.section("reliability: inputs tried, faults injected, rows lost")
    for line in lines:
        terminalreporter.write_line(line)
    out = os.environ.get("REACTDIFF_RELIABILITY_JSON")
    if out:   # machine-readable figures (docs/reliability.md quotes them)
        Path(out).write_text(json.dumps({
            "cases": [c.__dict__ | {"result": R.REPORT.outcomes.get(c.nodeid)} for c in R.REPORT.cases],
            "rows": [r.__dict__ | {"lost": r.lost} for r in R.REPORT.rows]}, indent=2))


# ---------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="session")
def clean_root(tmp_path_factory) -> str:
    """Synthetic REACT 2024, 2/1/1 dyads = 8 person clips of FRAMES frames (read-only)."""
    root = tmp_path_factory.mktemp("rel-react") / "data"
    synth.generate(str(root), dyads=(2, 1, 1), frames=F.FRAMES, seed=3, release="2024")
    return str(root)


@dataclass
class CleanRun:
    data: str                # dataset root on S3
    out: str                 # snapshots root on S3
    result: object           # ExtractResult
    target: str              # the clip whose worker was killed
    killed: int              # its worker's pid
    attempts: list[int]      # pids of every attempt on that clip
    marker: str              # the driver's S3 secret during the run
    said: str                # everything logged/printed during the run


@pytest.fixture(scope="session")
def clean_run(clean_root, s3_server, ray_local, tmp_path_factory) -> CleanRun:
    """S3 -> S3 extraction of the clean dataset; one Ray worker is SIGKILLed while it holds a clip.

    The driver's AWS secret is a unique marker during the run (Ray workers keep the session's
    dummy secret: both must stay out of everything the run writes or says).
    """
    prefix = f"s3://{s3_server.bucket}/rel-{uuid.uuid4().hex[:8]}"
    data, out = f"{prefix}/data", f"{prefix}/snapshots"
    fs, base = storage.filesystem(data)
    local = [os.path.join(d, f) for d, _, files in os.walk(clean_root) for f in files]
    fs.put(local, [base + "/" + os.path.relpath(p, clean_root) for p in local])

    target = react.open_dataset(clean_root).clips("train")[1]
    tmp = tmp_path_factory.mktemp("rel-clean")
    control = tmp / "control"
    control.mkdir()
    fset = F.holding_feature_set(tmp / "holding.yaml", F.array_digest(react.read_emotion(target.emotion)),
                                 control, holds=1)

    killed: dict[str, int] = {}

    def killer():
        try:
            pid = F.wait_for(lambda: (F.attempts(control) or [None])[0], 300, 0.05, "the held clip")
            F.kill_own(pid)
            killed["pid"] = pid
        except BaseException as exc:   # never leave the job waiting on a hold
            killed["error"] = repr(exc)
            (control / "release").write_text("")

    marker = f"rel-secret-{uuid.uuid4().hex}"
    thread = threading.Thread(target=killer, daemon=True)
    with F.s3_secret(marker), F.capture_everything() as said, F.holding_emotion():
        thread.start()
        result = extract(ExtractConfig(data=data, out=out, feature_set=fset))
        thread.join(30)
        print(result.report)
    assert "pid" in killed, killed
    counts = result.manifest.counts
    R.rows("clean S3 run, a worker SIGKILLed mid-clip", counts.considered, counts.clips, counts.quarantined)
    return CleanRun(data, out, result, target.clip_id, killed["pid"], F.attempts(control), marker, said.getvalue())


# ---------------------------------------------------------------------------------------------
# The pipeline from a user's shell, S3 and MLflow on 127.0.0.2 (tests.helpers.shell)


@pytest.fixture(scope="session")
def clean_shell_pipeline(tmp_path_factory, clean_env):
    """inspect, extract, 2-worker training (both stages) and evaluation, each a `reactdiff`
    command in a clean shell, against moto S3 and `mlflow server` on 127.0.0.2; the listeners
    of every process are sampled throughout. Commands that fail are recorded, not raised: the
    tests report what failed."""
    root = tmp_path_factory.mktemp("clean-shell")
    env = C.user_env(clean_env, root / "home")
    moto, endpoint = C.start_moto(env, root / "moto.log")
    env["AWS_ENDPOINT_URL"] = endpoint
    run = C.CleanShellRun(endpoint, "reactdiff-far", "", env)
    servers = [moto]
    try:
        C.create_bucket(run)
        mlflow, run.mlflow_uri = C.start_mlflow(env, root, run.bucket, root / "mlflow.log")
        servers.append(mlflow)
        env["MLFLOW_TRACKING_URI"] = run.mlflow_uri
        b = f"s3://{run.bucket}/react"
        with C.ListenerSampler() as run.sampler:
            # Full-length REACT clips (751 frames): the official metrics of `evaluate` need 750.
            run.run("synth", "synth", "--out", f"{b}/raw", "--dyads", "2,1,0", "--frames", "751", "--workers", "1")
            run.run("inspect", "inspect", "--data", f"{b}/raw", "--frames", "751")
            extract = run.run("extract", "extract", "--data", f"{b}/raw", "--out", f"{b}/snapshots",
                              "--set", "frames=751")
            snapshot = extract.stdout.strip().splitlines()[-1] if extract.returncode == 0 else f"{b}/none"
            for stage, extra in (("autoencoder", ["stage1.epochs=1", "model.seq_len=750"]),
                                 ("diffusion", ["stage2.epochs=1", "scaling.num_workers=1"])):
                sets = tiny_overrides(snapshot, f"{b}/checkpoints", run.mlflow_uri, stage) + extra
                run.run(f"train {stage}", "train", *[a for kv in sets for a in ("--set", kv)])
            run.run("evaluate", "evaluate", "--model", "models:/reactdiff@challenger", "--split", "val",
                    "--samples", "2", "--max-items", "2", "--steps", "5", "--no-baselines",
                    "--out", f"{b}/eval/report.json")
        yield run
    finally:
        for proc in reversed(servers):
            C.stop_session(proc)
