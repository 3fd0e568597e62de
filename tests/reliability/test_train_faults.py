"""Faults during training, on one named stage-1 run (2 Ray Train workers, checkpoints on moto S3):

1. the driver process is SIGKILLed once the first checkpoint is persisted (the run is a
   subprocess with its own Ray, whose S3 secret is a unique marker);
2. the same command re-run in this process resumes from the newest checkpoint the killed run left;
   once it has persisted a checkpoint of its own, one Ray Train worker is SIGKILLed and the worker
   group restarts from the newest checkpoint;
3. the newest checkpoint file is then corrupted and the run extended by one epoch.

MLflow must hold every epoch exactly once, and the marker secret must appear nowhere.

Epochs of the tiny preset take about a second, so the killed driver may persist a second checkpoint
before it dies: the tests compare with what was persisted at each kill, never with a fixed epoch.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import pytest

from pipeline import storage
from tests.helpers import faults as F
from tests.helpers import report as R
from tests.helpers.training import load_config, tiny_overrides

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
NAME = f"rel-resume-{uuid.uuid4().hex[:6]}"
EPOCHS = 6          # room for both kills to land mid-run
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"      # Ray Train's record of persisted checkpoints

TRAIN_SCRIPT = """
import json, logging, os, sys
from pipeline import runtime  # the suite's hermetic env is inherited
logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
for noisy in ("urllib3", "botocore", "aiobotocore", "matplotlib", "PIL", "filelock", "git", "alembic"):
    logging.getLogger(noisy).setLevel(logging.INFO)
from pipeline.train.job import train
from tests.helpers.training import load_config
runtime.init_ray(num_cpus=4)
print("TRAINING", flush=True)
train(load_config(json.loads(sys.argv[1])))
print("FINISHED", flush=True)
"""


def _ray_logs(session_dir: str | Path, since: float = 0.0) -> str:
    texts = []
    for path in Path(session_dir, "logs").glob("*"):
        if path.is_file() and path.stat().st_mtime >= since:
            texts.append(path.read_text(errors="replace"))
    return "\n".join(texts)


def _resumed_epochs(text: str) -> list[int]:
    """Epochs the run resumed from, in order (each resume starts from a later checkpoint)."""
    return sorted(int(e) for e in re.findall(rf"resumed {re.escape(NAME)} from epoch (\d+)", text))


def _steps(client, run_id, key="epoch"):
    return sorted(m.step for m in client.get_metric_history(run_id, key))


@pytest.fixture(scope="module")
def run(clean_run, s3_server, tmp_path_factory, _migrated_mlflow_db):
    tmp = tmp_path_factory.mktemp("rel-train")
    shutil.copy(_migrated_mlflow_db, tmp / "mlflow.db")
    mlflow_uri = f"sqlite:///{tmp / 'mlflow.db'}"
    storage_uri = f"s3://{s3_server.bucket}/rel-{uuid.uuid4().hex[:8]}/checkpoints"
    overrides = tiny_overrides(clean_run.result.uri, storage_uri, mlflow_uri, "autoencoder",
                               **{"name": NAME, "model.seq_len": F.FRAMES, "stage1.epochs": EPOCHS,
                                  "validation.plot_every": 100})
    return {"tmp": tmp, "mlflow": mlflow_uri, "storage": storage_uri, "overrides": overrides,
            "run_dir": storage.join(storage_uri, NAME)}


def _persisted(run_dir: str, epoch: int) -> bool:
    from s3fs.utils import FileExpired

    try:
        return f"checkpoint_epoch{epoch:04d}" in storage.read_text(storage.join(run_dir, RAY_SNAPSHOT))
    except (FileNotFoundError, FileExpired):   # not written yet, or rewritten while we read it: poll again
        return False


@pytest.fixture(scope="module")
def driver_killed(run):
    """The training driver (a subprocess with its own Ray) SIGKILLed after checkpoint 1 is persisted."""
    marker = f"rel-train-secret-{uuid.uuid4().hex}"
    ray_tmp = tempfile.mkdtemp(prefix="rdrel", dir="/tmp")     # short: Ray's socket paths are limited
    log_path = run["tmp"] / "driver.log"
    env = {**os.environ, "AWS_SECRET_ACCESS_KEY": marker, "RAY_TMPDIR": ray_tmp, "PYTHONUNBUFFERED": "1",
           "REACTDIFF_HOME": str(run["tmp"] / "home"),
           "PYTHONPATH": str(REPO)}          # the script imports tests.helpers
    env.pop("RAY_ADDRESS", None)
    script = run["tmp"] / "train_driver.py"
    script.write_text(TRAIN_SCRIPT)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(script), json.dumps(run["overrides"])],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        F.wait_for(lambda: _persisted(run["run_dir"], 1) or proc.poll() is not None, 600, 0.05,
                   "the first persisted checkpoint")
        assert proc.poll() is None, log_path.read_text()[-3000:]
        family = F.process_family(proc.pid)          # the Ray processes this driver started
        F.kill_own(proc.pid)
        proc.wait(30)
        # Ray's processes share their driver's fate; any left over (started by our subprocess) we stop
        deadline = time.monotonic() + 30
        while (left := F.still_alive(family)) and time.monotonic() < deadline:
            time.sleep(0.5)
        left = F.still_alive(family)
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        # only now can nothing of the killed run persist another checkpoint
        at_kill = max(e for e in range(1, EPOCHS + 1) if _persisted(run["run_dir"], e))
        assert at_kill <= EPOCHS - 2, f"the driver persisted epoch {at_kill} of {EPOCHS} before it died"
        yield {"marker": marker, "ray_tmp": ray_tmp, "log": log_path, "returncode": proc.returncode,
               "at_kill": at_kill,
               "family": len(family), "leftover": {pid: cmd.split()[0] for pid, cmd in left.items()}}
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def resumed(run, driver_killed, ray_local):
    """The same command re-run here; one Ray Train worker SIGKILLed once this run has persisted a checkpoint."""
    from pipeline.train.job import train

    session_dir = ray_local._private.worker._global_node.get_session_dir_path()
    killed: dict = {}

    before = set(F.own_processes_matching("ray::RayTrainWorker"))      # none expected; never ours to kill

    def killer():
        try:
            first_own = driver_killed["at_kill"] + 1      # the workers are past start-up: they are training
            F.wait_for(lambda: _persisted(run["run_dir"], first_own), 600, 0.05, f"checkpoint {first_own}")
            workers = F.wait_for(lambda: [p for p in F.own_processes_matching("ray::RayTrainWorker")
                                          if p not in before], 30, 0.05, "the train workers")
            killed["workers"] = workers
            killed["after_epoch"] = max(e for e in range(1, EPOCHS + 1) if _persisted(run["run_dir"], e))
            F.kill_own(workers[-1])
            killed["pid"] = workers[-1]
        except BaseException as exc:
            killed["error"] = repr(exc)

    t0 = time.time()
    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = train(load_config(run["overrides"]))
    thread.join(30)
    time.sleep(1.0)                                        # let the workers' last log lines land
    return {"result": result, "killed": killed, "logs": _ray_logs(session_dir, t0), "session_dir": session_dir}


def test_a_killed_driver_is_resumed_by_rerunning_the_same_name(run, driver_killed, resumed, request):
    import mlflow

    said = driver_killed["log"].read_text(errors="replace")
    assert driver_killed["returncode"] == -signal.SIGKILL and "TRAINING" in said and "FINISHED" not in said
    result = resumed["result"]
    epochs = _resumed_epochs(resumed["logs"])
    c = mlflow.MlflowClient(run["mlflow"])
    runs = c.search_runs([c.get_experiment_by_name("reactdiff").experiment_id],
                         filter_string=f"tags.mlflow.runName = '{NAME}'")
    R.case(R.FAULT, f"training driver SIGKILLed after checkpoint {driver_killed['at_kill']}",
           f"re-run resumed from epoch {epochs[0] if epochs else '?'}; finished epoch {result.epoch}; "
           f"MLflow epochs {_steps(c, result.mlflow_run_id)}", nodeid=request.node.nodeid,
           detail=f"{len(driver_killed['leftover'])} of the driver's {driver_killed['family']} Ray processes "
                  f"outlived it for 30 s: {sorted(set(driver_killed['leftover'].values()))}")
    assert epochs and epochs[0] == driver_killed["at_kill"]
    assert result.epoch == EPOCHS
    assert [r.info.run_id for r in runs] == [result.mlflow_run_id]          # the run A created, continued
    for key in ("epoch", "train/loss", "val/loss"):
        assert _steps(c, result.mlflow_run_id, key) == list(range(1, EPOCHS + 1)), key
    assert c.get_run(result.mlflow_run_id).info.status == "FINISHED"


def test_a_killed_train_worker_restarts_the_group_from_the_newest_checkpoint(resumed, request):
    killed = resumed["killed"]
    assert "pid" in killed, killed
    epochs = _resumed_epochs(resumed["logs"])
    R.case(R.FAULT, "Ray Train worker SIGKILLed mid-run",
           f"worker group restarted, resumed from epoch {epochs[1] if len(epochs) > 1 else '?'} "
           f"(killed after checkpoint {killed['after_epoch']}); finished epoch {resumed['result'].epoch}",
           nodeid=request.node.nodeid, detail=f"killed pid {killed['pid']} of {killed['workers']}")
    assert len(killed["workers"]) == 2
    assert len(epochs) == 2 and epochs[1] >= killed["after_epoch"] > epochs[0], epochs
    assert killed["pid"] not in F.own_descendants()
    assert resumed["result"].epoch == EPOCHS


def test_the_s3_secret_appears_in_no_log_checkpoint_or_mlflow_record(run, driver_killed, resumed, request):
    import mlflow

    secrets = [driver_killed["marker"], F.SESSION_SECRET]
    leaks, scanned = [], 0

    def scan(what, blob):
        nonlocal scanned
        scanned += 1
        for s in F.secrets_in(blob, secrets):
            leaks.append(f"{what} contains {'the marker' if s == secrets[0] else 'the session secret'}")

    scan("killed driver's stdout/stderr", driver_killed["log"].read_bytes())
    for path in Path(driver_killed["ray_tmp"]).rglob("*"):
        if path.is_file() and not path.is_symlink() and path.stat().st_size < 50_000_000:
            scan(f"driver's Ray file {path.name}", path.read_bytes())
    scan("Ray logs of the resumed run", resumed["logs"])
    fs, base = storage.filesystem(run["run_dir"])
    for key in fs.find(base):
        scan(f"checkpoint file {key[len(base):]}", fs.cat_file(key))
    c = mlflow.MlflowClient(run["mlflow"])
    r = c.get_run(resumed["result"].mlflow_run_id)
    scan("MLflow params", json.dumps(r.data.params))
    scan("MLflow tags", json.dumps(r.data.tags))
    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(run_id=r.info.run_id, dst_path=tmp, tracking_uri=run["mlflow"])
        for path in Path(local).rglob("*"):
            if path.is_file():
                scan(f"MLflow artifact {path.name}", path.read_bytes())
    scan("MLflow database", Path(run["mlflow"][len("sqlite:///"):]).read_bytes())
    R.case(R.SECURITY, "S3 secret in training outputs",
           f"absent from {scanned} logs/files/records" if not leaks else f"LEAKED: {leaks[:3]}",
           nodeid=request.node.nodeid, detail="driver + Ray logs, checkpoints, MLflow params/tags/artifacts/db")
    assert scanned > 10 and not leaks, leaks


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_one(run, resumed, request):
    import mlflow

    from pipeline.train.checkpoints import CHECKPOINT_FILE, checkpoint_metas
    from pipeline.train.job import train

    metas = checkpoint_metas(run["run_dir"])
    newest, meta = metas[-1]
    previous = [m["epoch"] for _, m in metas[:-1]]
    path = storage.join(newest, CHECKPOINT_FILE)
    blob = storage.read_bytes(path)
    storage.write_bytes(path, blob[: len(blob) // 2])
    t0 = time.time()
    error = None
    try:
        result = train(load_config(run["overrides"] + [f"stage1.epochs={EPOCHS + 1}", "max_failures=0"]))
    except Exception as exc:        # noqa: BLE001 - reported below
        error, result = exc, None
    logs = _ray_logs(resumed["session_dir"], t0)
    c = mlflow.MlflowClient(run["mlflow"])
    if error is None:
        outcome = f"resumed from epoch {_resumed_epochs(logs)}; finished epoch {result.epoch}"
    else:
        outcome = f"run failed: {type(error).__name__}: " + str(error).strip().splitlines()[-1][:120]
    R.case(R.FAULT, f"checkpoint of epoch {meta['epoch']} truncated", outcome, nodeid=request.node.nodeid,
           detail=f"previous checkpoints: epochs {previous}")
    assert error is None, outcome
    assert f"checkpoint_epoch{meta['epoch']:04d}" in logs and "previous checkpoint" in logs
    assert _resumed_epochs(logs)[0] in previous
    assert result.epoch == EPOCHS + 1
    assert _steps(c, result.mlflow_run_id) == list(range(1, EPOCHS + 2))
