"""MLflow run lifecycle for training: one MLflow run per Ray Train run, resumable by id.

Ray Train V2 has no MLflow callback (DESIGN.md §4): the driver creates (or finds) the MLflow run
before ``trainer.fit()`` and hands its id to the workers; world rank 0 reopens it by id and logs
one batch of metrics per epoch with ``step=epoch``. The run id also travels inside every Ray
checkpoint, so a worker restart or a re-run with the same Ray run name continues the same MLflow
run.

No duplicated or missing epochs after a restart: every per-epoch row is kept in the checkpoint's
history, and a metric row goes to MLflow only if its epoch is above the highest epoch MLflow
already holds (``last_logged_epoch``), read back from the run itself. A row is logged in one
``log_batch`` call together with the ``epoch`` metric, so the check and the rows cannot disagree.

What a training run records:
- params: the whole flattened ``TrainConfig``;
- tags: stage, preset, snapshot id and feature-set hash, git commit, Ray run name and storage;
- an input (``log_input``): the feature snapshot as an MLflow dataset (source URI, digest =
  feature-set hash) so the lineage snapshot → run → model is queryable;
- metrics per epoch (``train/…``, ``val/…``, ``time/…``);
- artifacts: ``config.yaml``, ``plots/loss_curves.png``, ``plots/reaction_epochNNNN.png``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

from pipeline.runtime import workspace

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "reactdiff"
EPOCH_METRIC = "epoch"          # logged last in every epoch batch; its history is the source of truth
TAG_PREFIX = "reactdiff."
MAX_PARAM_LENGTH = 6000         # MLflow's limit on a param value


# ---------------------------------------------------------------------------------------------
# Tracking URI and experiment
# ---------------------------------------------------------------------------------------------

def tracking_uri(explicit: str | None = None) -> str:
    """``explicit`` > ``$MLFLOW_TRACKING_URI`` > ``mlflow.set_tracking_uri`` > the workspace sqlite."""
    if explicit:
        return explicit
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    import mlflow.tracking

    if mlflow.tracking.is_tracking_uri_set():
        return mlflow.get_tracking_uri()
    return workspace().mlflow_tracking_uri


def activate(uri: str | None = None) -> str:
    """Point MLflow's fluent API (``mlflow.start_run``, ``register_model``…) at our store.

    Without this the fluent API falls back to ``sqlite:///mlflow.db`` in the current directory.
    The registry follows the tracking URI (``mlflow.set_registry_uri`` is never called: it
    also exports ``$MLFLOW_REGISTRY_URI``, which would outlive the store it points to).
    """
    import mlflow

    resolved = tracking_uri(uri)
    if mlflow.get_tracking_uri() != resolved:
        mlflow.set_tracking_uri(resolved)
    return resolved


@contextlib.contextmanager
def using(uri: str | None = None) -> Iterator[str]:
    """Within the block, ``uri`` is this process's MLflow store (env, fluent API and clients)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as _tracking_utils

    resolved = tracking_uri(uri)
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved_global = getattr(_tracking_utils, "_tracking_uri", None)   # None = "follow the environment"
    os.environ["MLFLOW_TRACKING_URI"] = resolved
    activate(resolved)
    try:
        yield resolved
    finally:
        mlflow.set_tracking_uri(saved_global)     # (this also rewrites $MLFLOW_TRACKING_URI) ...
        if saved_env is None:                     # ... so the environment is restored after it
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def default_artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps artifacts when the store is a local sqlite file.

    MLflow's default for a sqlite store is ``./mlruns`` relative to the *current directory* —
    on a Ray worker that is a session temp dir, so artifacts would vanish. A sqlite store gets
    a sibling ``mlartifacts/`` folder instead. Servers decide themselves (S3 root or proxy).
    """
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def client(uri: str | None = None):
    import mlflow

    return mlflow.MlflowClient(tracking_uri(uri), registry_uri=tracking_uri(uri))


def ensure_experiment(name: str = DEFAULT_EXPERIMENT, uri: str | None = None,
                      artifact_location: str | None = None) -> str:
    """The experiment id of ``name``, created if missing (with a durable artifact location)."""
    uri = tracking_uri(uri)
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            c.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    location = artifact_location or default_artifact_location(uri)
    try:
        return c.create_experiment(name, artifact_location=location)
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def git_commit(path: str | os.PathLike | None = None) -> str | None:
    """The commit of the code being run (``$REACTDIFF_GIT_COMMIT`` wins, for packaged jobs)."""
    if os.environ.get("REACTDIFF_GIT_COMMIT"):
        return os.environ["REACTDIFF_GIT_COMMIT"]
    root = Path(path) if path else Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    commit = out.stdout.strip()
    if out.returncode != 0 or not commit:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                           capture_output=True, text=True, timeout=10).stdout.strip()
    return commit + ("-dirty" if dirty else "")


# ---------------------------------------------------------------------------------------------
# Driver side: create, find, finish
# ---------------------------------------------------------------------------------------------

def _param_value(value: Any) -> str:
    text = "" if value is None else str(value)
    return text if len(text) <= MAX_PARAM_LENGTH else text[: MAX_PARAM_LENGTH - 3] + "..."


def log_params(run_id: str, params: Mapping[str, Any], uri: str | None = None) -> None:
    """Log params; on a resumed run, keep the first value and tag what changed.

    MLflow refuses to overwrite a param with a different value, and a resumed run may
    legitimately change one (more epochs, a new batch size): the change is recorded as a tag
    ``reactdiff.param_changed.<key>`` = ``old -> new`` instead of failing the resume.
    """
    from mlflow.entities import Param, RunTag

    c = client(uri)
    existing = c.get_run(run_id).data.params
    new, changed = [], []
    for key, value in params.items():
        text = _param_value(value)
        if key not in existing:
            new.append(Param(key, text))
        elif existing[key] != text:
            changed.append(RunTag(f"{TAG_PREFIX}param_changed.{key}", f"{existing[key]} -> {text}"[:5000]))
    for i in range(0, len(new), 100):          # log_batch takes at most 100 params
        c.log_batch(run_id, params=new[i:i + 100])
    if changed:
        c.log_batch(run_id, tags=changed)


def snapshot_dataset(snapshot_uri: str, snapshot_id: str, digest: str | None, *,
                     columns: Sequence[str] = ()):
    """The feature snapshot as an MLflow dataset (for ``log_input`` lineage)."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():   # a local path matches two equivalent local source types
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(snapshot_uri)
    schema = None
    if columns:
        from mlflow.types import ColSpec, Schema

        schema = Schema([ColSpec("binary", name=c) for c in columns])
    return MetaDataset(source, name=snapshot_id, digest=(digest or snapshot_id)[:36], schema=schema)


def log_snapshot_input(run_id: str, snapshot_uri: str, snapshot_id: str, digest: str | None, *,
                       split: str = "train", columns: Sequence[str] = (), uri: str | None = None,
                       context: str = "training") -> None:
    """Record the snapshot as this run's input (idempotent: same dataset + context is one input)."""
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    ds = snapshot_dataset(snapshot_uri, snapshot_id, digest, columns=columns)
    c = client(uri)
    for existing in c.get_run(run_id).inputs.dataset_inputs:
        if existing.dataset.name == ds.name and existing.dataset.digest == ds.digest:
            return
    c.log_inputs(run_id, datasets=[DatasetInput(
        ds._to_mlflow_entity(),
        tags=[InputTag(MLFLOW_DATASET_CONTEXT, context), InputTag("split", split)])])


def create_run(*, experiment: str = DEFAULT_EXPERIMENT, run_name: str | None = None,
               tags: Mapping[str, Any] | None = None, params: Mapping[str, Any] | None = None,
               uri: str | None = None) -> str:
    """Create a RUNNING MLflow run (driver side) and return its id."""
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME

    c = client(uri)
    exp_id = ensure_experiment(experiment, uri)
    all_tags = {k: str(v) for k, v in (tags or {}).items() if v is not None}
    if run_name:
        all_tags[MLFLOW_RUN_NAME] = run_name
    commit = git_commit()
    if commit:
        all_tags.setdefault("mlflow.source.git.commit", commit.removesuffix("-dirty"))
        all_tags.setdefault(f"{TAG_PREFIX}git_commit", commit)
    run = c.create_run(exp_id, tags=all_tags, run_name=run_name)
    if params:
        log_params(run.info.run_id, params, uri)
    # debug: every command's summary names its MLflow run already
    log.debug("MLflow run %s (%s) in experiment %r at %s", run.info.run_id, run_name, experiment,
              tracking_uri(uri))
    return run.info.run_id


def reopen_run(run_id: str, *, tags: Mapping[str, Any] | None = None,
               params: Mapping[str, Any] | None = None, uri: str | None = None) -> str:
    """Mark an existing run RUNNING again (a resumed training) and add tags/params."""
    c = client(uri)
    c.update_run(run_id, status="RUNNING")
    if tags:
        c.log_batch(run_id, tags=[_tag(k, v) for k, v in tags.items() if v is not None])
    if params:
        log_params(run_id, params, uri)
    return run_id


def _tag(key: str, value: Any):
    from mlflow.entities import RunTag

    return RunTag(key, str(value)[:5000])


def set_tags(run_id: str, tags: Mapping[str, Any], uri: str | None = None) -> None:
    client(uri).log_batch(run_id, tags=[_tag(k, v) for k, v in tags.items() if v is not None])


def finish_run(run_id: str, status: str = "FINISHED", uri: str | None = None) -> None:
    client(uri).set_terminated(run_id, status=status)


DATA_EXPERIMENT = "reactdiff-data"


def log_extraction(manifest, snapshot_uri: str, published: bool, report: str, *,
                   experiment: str = DATA_EXPERIMENT, uri: str | None = None) -> str:
    """One finished MLflow run per extraction: the snapshot as its output dataset, counts per
    split, quarantine, bytes and timings as metrics, the redacted config as params, and the
    report, manifest and quarantine list as artifacts. FAILED when nothing was published."""
    from mlflow.entities import Metric

    m = manifest.to_json()
    counts, timings = m["counts"], m["timings"]
    metrics = {f"counts/{k}": v for k, v in counts.items() if isinstance(v, (int, float))}
    for split, row in (counts.get("per_split") or {}).items():
        metrics.update({f"counts/{split}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})
    metrics.update({f"time/{k}": v for k, v in timings.items() if isinstance(v, (int, float))})
    metrics.update({f"bytes/{k}": v for k, v in m["bytes"].items() if isinstance(v, (int, float))})
    run_id = create_run(
        experiment=experiment, run_name=f"extract-{manifest.id}", uri=uri,
        tags={f"{TAG_PREFIX}kind": "extraction", f"{TAG_PREFIX}snapshot_id": manifest.id,
              f"{TAG_PREFIX}snapshot_uri": snapshot_uri, f"{TAG_PREFIX}published": published,
              f"{TAG_PREFIX}feature_set_hash": manifest.feature_set.hash,
              f"{TAG_PREFIX}incremental_from": manifest.incremental_from},
        params={"feature_set": manifest.feature_set.name, **{f"config.{k}": v for k, v in manifest.config.items()}})
    c = client(uri)
    c.log_batch(run_id, metrics=[Metric(k, float(v), 0, 0) for k, v in metrics.items() if math.isfinite(float(v))])
    if published:
        log_snapshot_input(run_id, snapshot_uri, manifest.id, manifest.feature_set.hash, split="all",
                           columns=list(manifest.features), uri=uri, context="extraction output")
    c.log_text(run_id, report + "\n", "extraction/report.txt")
    c.log_dict(run_id, m, "extraction/manifest.json")
    c.log_dict(run_id, {"quarantine": m.get("quarantine", [])}, "extraction/quarantine.json")
    finish_run(run_id, "FINISHED" if published else "FAILED", uri)
    return run_id


@contextlib.contextmanager
def system_metrics(run_id: str, uri: str | None = None, *, every_s: float = 10.0) -> Iterator[None]:
    """CPU, memory, disk, network (and GPU, with pynvml) of this host as ``system/*`` metrics of
    ``run_id`` while the block runs (MLflow's SystemMetricsMonitor; a resumed run continues its
    steps). The driver's host: for a local run, the machine the workers share."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=True,
                                       tracking_uri=tracking_uri(uri))
    except ImportError as exc:          # psutil ships with Ray; without it MLflow cannot sample
        log.debug("no system metrics: %s", exc)
        yield
        return
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def find_runs(filters: Mapping[str, str], *, experiment: str = DEFAULT_EXPERIMENT,
              status: str | None = None, uri: str | None = None, max_results: int = 50) -> list:
    """Runs whose tags equal ``filters`` (newest first), optionally only with ``status``."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    clauses = [f"tags.`{k}` = '{str(v).replace(chr(39), '')}'" for k, v in filters.items()]
    if status:
        clauses.append(f"attributes.status = '{status}'")
    return list(c.search_runs([exp.experiment_id], " and ".join(clauses), max_results=max_results,
                              order_by=["attributes.start_time DESC"]))


# ---------------------------------------------------------------------------------------------
# Rank-0 side: per-epoch metrics and plots
# ---------------------------------------------------------------------------------------------

class EpochLogger:
    """Per-epoch MLflow logging from world rank 0 into an existing run (by id)."""

    def __init__(self, run_id: str, uri: str | None = None):
        self.run_id = run_id
        self.uri = tracking_uri(uri)
        self.client = client(self.uri)
        self._last = None

    def last_logged_epoch(self) -> int:
        """The highest epoch MLflow already holds for this run (0 if none)."""
        if self._last is None:
            history = self.client.get_metric_history(self.run_id, EPOCH_METRIC)
            self._last = max((int(m.step) for m in history), default=0)
        return self._last

    def log_epoch(self, epoch: int, metrics: Mapping[str, float]) -> bool:
        """Log one epoch's metrics with ``step=epoch``; False if MLflow already had the epoch."""
        from mlflow.entities import Metric
        from mlflow.utils.time import get_current_time_millis

        if epoch <= self.last_logged_epoch():
            return False
        now = get_current_time_millis()
        rows = [Metric(k, float(v), now, epoch) for k, v in metrics.items()
                if v is not None and math.isfinite(float(v)) and k != EPOCH_METRIC]
        rows.append(Metric(EPOCH_METRIC, float(epoch), now, epoch))  # last: marks the epoch done
        for i in range(0, len(rows), 1000):
            self.client.log_batch(self.run_id, metrics=rows[i:i + 1000])
        self._last = epoch
        return True

    def log_history(self, history: Iterable[Mapping[str, float]]) -> list[int]:
        """Log every history row (``{"epoch": e, ...}``) MLflow does not hold yet; returns epochs."""
        done = []
        for row in sorted(history, key=lambda r: int(r[EPOCH_METRIC])):
            epoch = int(row[EPOCH_METRIC])
            if self.log_epoch(epoch, {k: v for k, v in row.items() if k != EPOCH_METRIC}):
                done.append(epoch)
        return done

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        import matplotlib.pyplot as plt

        self.client.log_figure(self.run_id, figure, artifact_file)
        plt.close(figure)
