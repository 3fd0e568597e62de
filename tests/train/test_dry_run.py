"""`--dry-run` of extract, train and promote prints the plan and changes nothing: no file in
the dataset, snapshot or checkpoint trees, no MLflow run, tag or alias."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from jobs import cli
from pipeline import storage
from pipeline.data import synth
from pipeline.registry import runs as tracking

pytestmark = pytest.mark.slow


def _tree(root: str) -> dict[str, tuple[int, float]]:
    """path -> (size, mtime) of every file under a local root or s3:// prefix."""
    fs, path = storage.filesystem(root)
    if not fs.exists(path):
        return {}
    return {name: (info.get("size"), info.get("mtime") or info.get("LastModified"))
            for name, info in fs.find(path, detail=True).items()}


def _registry_state(uri: str) -> dict:
    c = tracking.client(uri)
    runs = {r.info.run_id: (r.info.status, dict(r.data.tags), dict(r.data.metrics))
            for exp in c.search_experiments() for r in c.search_runs([exp.experiment_id])}
    models = {m.name: (dict(m.aliases), [(v.version, dict(v.tags)) for v in c.search_model_versions(f"name = '{m.name}'")])
              for m in c.search_registered_models()}
    return {"runs": runs, "models": models}


def test_extract_dry_run_plans_and_writes_nothing(tmp_path, workdir, capsys):
    data = str(tmp_path / "data")
    synth.generate(data, dyads=(1, 1, 1), frames=30, seed=0, release="2024")
    out = str(tmp_path / "snapshots")
    before = _tree(str(tmp_path))
    assert cli.main(["extract", "--data", data, "--out", out, "--incremental-from", "latest", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "extract (dry run): 6 clips" in text and "decode 6, carry over 0" in text
    assert _tree(str(tmp_path)) == before
    assert not os.path.exists(out)


def test_train_and_promote_dry_runs_plan_and_change_nothing(stage2, train_snapshot, train_storage, train_mlflow,
                                                             capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", train_mlflow)
    files, registry = _tree(train_storage), _registry_state(train_mlflow)
    common = ["--features", train_snapshot, "--set", f"storage_path={train_storage}",
              "--set", f"mlflow.tracking_uri={train_mlflow}", "--set", "scaling.num_workers=2"]
    assert cli.main(["train", "--stage", "diffusion", *common, "--dry-run"]) == 0
    assert cli.main(["train", "--stage", "autoencoder", *common, "--set", "model.seq_len=100",
                     "--set", "name=tiny-autoencoder", "--epochs", "5", "--dry-run"]) == 0
    assert cli.main(["promote", "--features", train_snapshot, "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "train (dry run): diffusion run" in text and "steps/epoch" in text
    assert "resume after epoch 2: epochs 3-5" in text
    assert "promote (dry run): reactdiff" in text and "gate:" in text
    assert _tree(train_storage) == files
    assert _registry_state(train_mlflow) == registry
