"""The MLflow record a user browses, read back through `mlflow server`'s REST API after the
clean-shell pipeline (extract, both training stages, evaluate of @challenger; reliability
conftest): the model version shows its evaluation metrics, its run the evaluation artifacts and
both datasets, and the extraction has its own run."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request

import pytest

pytestmark = pytest.mark.slow


def _get(base: str, endpoint: str, **query) -> dict:
    # No proxy: the suite's dead proxies, and the server sits on 127.0.0.2 outside NO_PROXY.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    url = f"{base}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with opener.open(url, timeout=30) as r:
        return json.loads(r.read())


def test_the_model_version_shows_its_evaluation_metrics_and_artifacts(clean_shell_pipeline):
    run = clean_shell_pipeline
    assert run.steps["evaluate"].returncode == 0, run.steps["evaluate"].output[-3000:]
    base = run.mlflow_uri
    version = _get(base, "registered-models/alias", name="reactdiff", alias="challenger")["model_version"]
    model_id = version.get("model_id") or version["source"].removeprefix("models:/")
    assert model_id.startswith("m-"), version                          # an MLflow 3 logged model

    model = _get(base, f"logged-models/{model_id}")["model"]
    metrics = {m["key"]: m for m in model.get("data", {}).get("metrics", [])}
    assert {"val_FRCorr", "val_FRDist"} <= set(metrics), sorted(metrics)
    assert metrics["val_FRCorr"].get("dataset_name", "").endswith("/val")
    assert model["info"].get("source_run_id") == version["run_id"]     # attached to its training run

    training = _get(base, "runs/get", run_id=version["run_id"])["run"]
    contexts = {t["value"] for d in training["inputs"]["dataset_inputs"] for t in d.get("tags", [])
                if t["key"] == "mlflow.data.context"}
    assert {"training", "evaluation"} <= contexts
    assert "val_FRCorr" in {m["key"] for m in training["data"]["metrics"]}
    files = {f["path"] for f in _get(base, "artifacts/list", run_id=version["run_id"], path="evaluation")["files"]}
    assert {"evaluation/val_report.json", "evaluation/val_table.txt", "evaluation/val_reactions"} <= files
    figures = _get(base, "artifacts/list", run_id=version["run_id"], path="evaluation/val_reactions")["files"]
    assert figures and all(f["path"].endswith(".png") for f in figures)
    tags = {t["key"]: t["value"] for t in training["data"]["tags"]}
    assert tags.get("mlflow.source.git.commit"), sorted(tags)              # code version of the run

    exp = _get(base, "experiments/get-by-name", experiment_name="reactdiff-data")["experiment"]
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/runs/search", method="POST",
                                     data=json.dumps({"experiment_ids": [exp["experiment_id"]]}).encode(),
                                     headers={"Content-Type": "application/json"})
    with opener.open(request, timeout=30) as r:
        extractions = json.loads(r.read())["runs"]
    assert extractions, "no MLflow run for the extraction"
    keys = {m["key"] for m in extractions[0]["data"]["metrics"]}
    assert {"counts/clips", "counts/quarantined", "time/total_s"} <= keys
    files = {f["path"] for f in _get(base, "artifacts/list", run_id=extractions[0]["info"]["run_id"],
                                     path="extraction")["files"]}
    assert {"extraction/report.txt", "extraction/quarantine.json"} <= files
