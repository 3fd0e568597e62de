"""The ``reactdiff evaluate`` job: K generated reactions per directed item of a snapshot split
(or predictions read from Parquet), the official REACT metrics, the baseline rows, a JSON
report, MLflow and a table.

The protocol is ``pipeline.evaluate.protocol``, the predictions pipeline and Parquet contract
``pipeline.evaluate.predictions``, scoring over Ray ``pipeline.evaluate.scoring`` and the MLflow
records ``pipeline.evaluate.records`` — all shared with ``reactdiff promote`` and
``reactdiff generate --split``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

from pipeline import runtime, storage
from pipeline.config import ConfigError, option
from pipeline.evaluate.predictions import read_predictions
from pipeline.evaluate.protocol import BASELINES, EvaluationReport, split_items
from pipeline.evaluate.records import EVAL_EXPERIMENT, log_report, record_evaluation
from pipeline.evaluate.scoring import EvalOptions, evaluate_generator, evaluate_predictions, open_snapshot
from pipeline.registry.models import load_generator, resolve_version

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig(EvalOptions):
    model: str | None = option(None, "models:/reactdiff@champion, models:/reactdiff/3, runs:/..., or a "
                                     "generator file", flag="--model", metavar="MODEL_URI")
    features: str | None = option(None, "feature snapshot URI (default: the version's snapshot_uri tag, else "
                                        "the newest)", flag="--features", metavar="SNAPSHOT")
    split: str = option("val", "split to score (test is what the challenge reports; never select models on it)",
                        flag="--split", choices=["val", "test", "train"])
    predictions: str | None = option(None, "score this predictions Parquet (file or folder) instead of "
                                           "generating", flag="--predictions", metavar="URI")
    save_predictions: str | None = option(None, "also write the generated predictions as Parquet (re-score "
                                                "with --predictions)", flag="--save-predictions", metavar="URI")
    baselines: list[str] = option(list(BASELINES), "baseline rows scored alongside with the same metric code "
                                                   "(e.g. --baseline gt mime)", flag="--baseline",
                                  choices=list(BASELINES))
    out: str | None = option(None, "JSON report, local path or s3:// (default: "
                                   "<workdir>/outputs/eval-<split>-<snapshot>-<time>.json)", flag="--out",
                             metavar="FILE")
    mlflow: bool = option(True, "do not log to MLflow (mlflow=false; by default metrics go to the version's "
                                "training run for registry URIs)", flag="--no-mlflow", action="store_false")
    experiment: str = option(EVAL_EXPERIMENT, "MLflow experiment for evaluations of non-registry models")
    ray_address: str | None = option(None, "Ray cluster to attach to (default: $RAY_ADDRESS, else local Ray "
                                           "on 127.0.0.1)", flag="--ray-address")

    def validate(self) -> None:
        super().validate()
        if self.split not in ("train", "val", "test"):
            raise ConfigError(f"split must be train, val or test, got {self.split!r}")
        unknown = sorted(set(self.baselines) - set(BASELINES))
        if unknown:
            raise ConfigError(f"baselines: unknown {unknown[0]!r} (known: {', '.join(BASELINES)})")
        if not self.model and not self.predictions:
            raise ConfigError("pass --model MODEL_URI or --predictions URI")

    def options(self) -> EvalOptions:
        return EvalOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(EvalOptions)})


def run_evaluation(cfg: EvaluateConfig) -> EvaluationReport:
    """The ``reactdiff evaluate`` job: generate or read predictions, score, report, log."""
    runtime.init_ray(cfg.ray_address)
    version = resolve_version(cfg.model) if cfg.model else None
    snapshot = open_snapshot(cfg.features, version)
    opts = cfg.options()
    if cfg.predictions:
        items, _, _ = split_items(snapshot, cfg.split, cfg.max_items)
        t0 = time.perf_counter()
        pred = read_predictions(cfg.predictions, [i.index for i in items])
        report = evaluate_predictions(
            pred, snapshot, cfg.split, opts, baselines=cfg.baselines,
            timings={"read_predictions": time.perf_counter() - t0}, model_uri=cfg.model,
            predictions_uri=cfg.predictions, model_name=version.name if version else None,
            model_version=str(version.version) if version else None)
    else:
        generator, _ = load_generator(cfg.model)
        report = evaluate_generator(generator, snapshot, cfg.split, opts, baselines=cfg.baselines,
                                    model_uri=cfg.model, model_version=version,
                                    save_predictions=cfg.save_predictions)
    out = cfg.out or storage.join(runtime.workspace().outputs,
                                  f"eval-{cfg.split}-{snapshot.id}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    storage.write_text(out, report.to_json())
    if cfg.mlflow:
        run_id = log_report(report, version=version, experiment=cfg.experiment, snapshot_uri=snapshot.uri)
        log.info("metrics logged to MLflow run %s", run_id)
        if version is not None and not cfg.predictions:
            record_evaluation(version, report, opts)
    print(report.table())
    print(f"report: {out}")
    return report
