"""`reactdiff generate --split`: Ray Data batch predictions that round-trip into evaluation."""

from __future__ import annotations

import numpy as np
import pytest

from jobs import cli
from pipeline import storage
from pipeline.evaluate import predictions, protocol
from pipeline.evaluate.scoring import EvalOptions, evaluate_generator, evaluate_predictions
from pipeline.generate.job import PREDICTIONS_MANIFEST

MODEL = "models:/reactdiff@champion"
SAMPLES, STEPS, SEED = 2, 1, 7


def test_batch_predictions_score_like_direct_evaluation(registry, s3, capsys):
    from pipeline.registry.models import load_generator

    out = s3.uri("predictions", "test")
    rc = cli.main(["generate", "--model", MODEL, "--split", "test", "--samples", str(SAMPLES),
                   "--steps", str(STEPS), "--seed", str(SEED), "--batch-size", "1", "--out", out])
    assert rc == 0, capsys.readouterr().err
    assert "predictions for 4 items" in capsys.readouterr().out

    snapshot = registry.snapshot
    items = snapshot.items("test")
    pred = predictions.read_predictions(out, [i.index for i in items])
    assert pred.shape == (4, SAMPLES, 750, 25)
    manifest = storage.read_json(storage.join(out, PREDICTIONS_MANIFEST))
    assert manifest["items"] == 4 and manifest["seed"] == SEED and manifest["model"]["version"] == "1"
    assert manifest["guidance"] == 1.0

    # Direct evaluation generates the same items itself; the metrics must not differ.
    generator, version = load_generator(MODEL)
    direct = evaluate_generator(generator, snapshot, "test", EvalOptions(samples=SAMPLES, seed=SEED, steps=STEPS),
                                baselines=(), model_version=version)
    scored = evaluate_predictions(pred, snapshot, "test", EvalOptions(seed=SEED), baselines=())
    assert set(direct.metrics) == set(protocol.METRIC_DIRECTIONS)
    for name, value in direct.metrics.items():
        assert scored.metrics[name] == pytest.approx(value, rel=1e-6, abs=1e-9), name

    # The CLI path of evaluation reads the same folder.
    rc = cli.main(["evaluate", "--predictions", out, "--features", snapshot.uri, "--split", "test",
                   "--no-baselines", "--no-mlflow", "--out", s3.uri("eval.json")])
    assert rc == 0, capsys.readouterr().err
    report = storage.read_json(s3.uri("eval.json"))
    for name, value in direct.metrics.items():
        assert report["metrics"][name] == pytest.approx(value, rel=1e-6, abs=1e-9), name

    # A re-run replaces the predictions (no duplicated items), and extra columns ride along.
    rc = cli.main(["generate", "--model", MODEL, "--split", "test", "--samples", str(SAMPLES),
                   "--steps", str(STEPS), "--seed", str(SEED), "--max-items", "3", "--out", out])
    assert rc == 0, capsys.readouterr().err
    import pyarrow.dataset as pds

    fs, path = storage.arrow_filesystem(out)
    table = pds.dataset(path, filesystem=fs, format="parquet").to_table()
    assert sorted(table.column("item").to_pylist()) == [0, 1, 2]
    assert {"speaker", "listener", "seed"} <= set(table.column_names)
    rows = table.to_pydict()
    for item, spk, lst, seed in zip(rows["item"], rows["speaker"], rows["listener"], rows["seed"]):
        assert (spk, lst) == (items[item].speaker, items[item].listener)
        assert seed == protocol.item_seed(SEED, item)
    np.testing.assert_array_equal(predictions.read_predictions(out, [0, 1, 2]), pred[:3])   # same seeds, same numbers
    assert not [n for n in storage.listdir(out) if n.startswith("_staging")]


def test_split_errors_name_the_fix(registry, tmp_path, capsys):
    rc = cli.main(["generate", "--model", "models:/reactdiff@nosuch", "--split", "test", "--out", str(tmp_path)])
    assert rc == 1 and "has no alias 'nosuch'" in capsys.readouterr().err
    rc = cli.main(["generate", "--model", MODEL, "--split", "val", "--out", str(tmp_path)])
    assert rc == 1 and "has no split 'val'" in capsys.readouterr().err
