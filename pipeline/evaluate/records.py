"""Evaluation results in MLflow: the report as a run's metrics and artifact, and per-protocol
metrics cached on a registry version (shared by ``reactdiff evaluate`` and ``reactdiff promote``)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import reactdiff
from pipeline.evaluate.protocol import EvaluationReport
from pipeline.evaluate.scoring import EvalOptions
from pipeline.registry import runs as tracking

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities.model_registry import ModelVersion

EVAL_EXPERIMENT = "reactdiff-eval"


def log_report(report: EvaluationReport, *, version: "ModelVersion | None" = None,
               experiment: str = EVAL_EXPERIMENT, snapshot_uri: str | None = None) -> str:
    """Log ``report`` to MLflow; returns the run id.

    A registry version's metrics go to the run that produced it (``val_FRCorr`` next to the
    training curves) and, MLflow 3 style, to the version's logged model (``model_id``), so the
    model version's page lists them; anything else gets a new run in ``experiment``. Each
    metric names the evaluation dataset (snapshot split), which is also logged as the run's
    ``evaluation`` input. The JSON report and the model-vs-baselines table are artifacts.
    """
    from mlflow.entities import Metric
    from mlflow.utils.time import get_current_time_millis

    c = tracking.client()
    run_id = getattr(version, "run_id", None) if version is not None else None
    model_id = logged_model_id(version) if version is not None else None
    new_run = not run_id
    if new_run:
        run_id = tracking.create_run(
            experiment=experiment,
            run_name=f"eval-{report.split}-{report.model_name or 'model'}"
                     f"{'-v' + report.model_version if report.model_version else ''}",
            tags={"reactdiff.kind": "evaluation", "reactdiff.split": report.split,
                  "reactdiff.snapshot_id": report.snapshot_id, "reactdiff.model_uri": report.model_uri,
                  "reactdiff.model_version": report.model_version,
                  "reactdiff.predictions": report.predictions_uri},
            params={"split": report.split, "samples": report.samples, "seed": report.seed,
                    "binarize": report.binarize, "steps": report.steps, "items": report.counts.get("items"),
                    "decoder_dropout": report.decoder_dropout, "guidance": report.guidance,
                    "latent_normalisation": report.latent_normalisation,
                    "architecture": report.architecture})
    dataset = None
    if snapshot_uri:
        dataset = tracking.snapshot_dataset(snapshot_uri, f"{report.snapshot_id}/{report.split}", report.snapshot_id)
        tracking.log_snapshot_input(run_id, snapshot_uri, f"{report.snapshot_id}/{report.split}", report.snapshot_id,
                                    split=report.split, context="evaluation")
    link = dict(model_id=model_id, dataset_name=dataset.name if dataset else None,
                dataset_digest=dataset.digest if dataset else None)
    now = get_current_time_millis()
    values = {f"{report.split}_{k}": v for k, v in report.metrics.items()}
    if new_run:  # baseline rows next to the model row in the evaluation run's table
        for kind, row in report.baselines.items():
            values.update({f"{report.split}_{kind}_{k}": v for k, v in row.items()})
    rows = [Metric(k, float(v), now, 0, **link) for k, v in values.items() if v is not None and math.isfinite(v)]
    c.log_batch(run_id, metrics=rows)
    c.log_text(run_id, report.to_json(), f"evaluation/{report.split}_report.json")
    c.log_text(run_id, report.table() + "\n", f"evaluation/{report.split}_table.txt")
    if report.figures:
        with tempfile.TemporaryDirectory() as tmp:
            for name, png in report.figures.items():
                Path(tmp, name).write_bytes(png)
            c.log_artifacts(run_id, tmp, f"evaluation/{report.split}_reactions")
    if new_run:
        tracking.finish_run(run_id)
    return run_id


def logged_model_id(version: "ModelVersion") -> str | None:
    """The MLflow 3 logged model behind a registry version: its ``model_id``, which a version
    registered from ``models:/m-…`` does not always carry, else the id in that source URI."""
    source = getattr(version, "source", None) or ""
    return getattr(version, "model_id", None) or (source.removeprefix("models:/")
                                                  if source.startswith("models:/m-") else None)


# Metrics of a registry version per evaluation protocol, kept in a version tag so that
# `reactdiff evaluate` followed by `reactdiff promote` (or two promotions) score a version once.
EVAL_TAG = "eval."


def evaluation_tag(split: str, snapshot_id: str, options: EvalOptions) -> str:
    """The version tag for one protocol: same snapshot, split, samples, seed, steps, item limit,
    binarize flag and metric code ⇒ the same predictions and metrics."""
    protocol = {"snapshot": snapshot_id, "split": split, "metrics_version": reactdiff.__version__,
                **dataclasses.asdict(options)}
    for k in ("batch_size", "actors", "frdist_tasks"):   # execution knobs, not the protocol
        protocol.pop(k, None)
    if protocol.get("guidance") is None:      # the model's own scale: tags as before the option existed
        protocol.pop("guidance", None)
    digest = hashlib.sha1(json.dumps(protocol, sort_keys=True).encode()).hexdigest()[:12]
    return f"{EVAL_TAG}{split}.{digest}"


def record_evaluation(version: "ModelVersion", report: EvaluationReport, options: EvalOptions) -> None:
    tag = evaluation_tag(report.split, report.snapshot_id, options)
    value = json.dumps({"metrics": report.metrics, "snapshot": report.snapshot_id, "split": report.split,
                        "samples": options.samples, "seed": options.seed, "items": report.counts.get("items")},
                       sort_keys=True)
    tracking.client().set_model_version_tag(version.name, str(version.version), tag, value)


def cached_evaluation(version: "ModelVersion", split: str, snapshot_id: str,
                      options: EvalOptions) -> dict[str, float] | None:
    """Metrics recorded by :func:`record_evaluation` for this protocol, or None."""
    tags = tracking.client().get_model_version(version.name, str(version.version)).tags or {}
    value = tags.get(evaluation_tag(split, snapshot_id, options))
    return None if value is None else {k: float(v) for k, v in json.loads(value)["metrics"].items()}
