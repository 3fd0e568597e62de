"""The MLflow registry API (pipeline/registry/models.py) on a real sqlite store, without Ray."""

from __future__ import annotations

import contextlib
import io
import sys

import numpy as np
import pytest
import torch

from pipeline.registry import models as registry
from pipeline.registry import runs as tracking

FRAMES = 100


def _generator(seed: int = 0):
    import reactdiff

    torch.manual_seed(seed)
    gen = reactdiff.build_generator("small", seq_len=FRAMES, model_channels=16, hidden_dim=32, feature_dim=16,
                                    cond_dim=32)
    gen.latent_stats.update(torch.randn(4, FRAMES, 16))
    gen.metadata["feature_set_hash"] = "f" * 64
    return gen.eval()


def _speaker(gen, batch: int = 1):
    rng = np.random.default_rng(0)
    return {n: rng.standard_normal((batch, FRAMES, w)).astype(np.float32) for n, w in gen.feature_widths.items()}


@pytest.fixture(scope="module")
def _store(tmp_path_factory, _migrated_mlflow_db):
    """One registry for the module (registering costs seconds): two versions of ``reactdiff``."""
    import shutil

    db = tmp_path_factory.mktemp("registry") / "mlflow.db"
    shutil.copy(_migrated_mlflow_db, db)
    uri = f"sqlite:///{db}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        gen = _generator()
        run_id = tracking.create_run(run_name="unit", tags={"reactdiff.stage": "diffusion"})
        first = registry.register_generator(gen, run_id=run_id, tags={"purpose": "test"})
        with contextlib.redirect_stderr(io.StringIO()) as printed:
            second = registry.register_generator(_generator(1), run_id=run_id)
    return uri, (gen, run_id, first, second, printed.getvalue())


@pytest.fixture
def registered(_store, monkeypatch):
    import mlflow

    uri, value = _store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    return value[:4]


def test_registering_a_new_version_prints_no_mlflow_chatter(_store):
    printed = _store[1][4]
    assert "already exists" not in printed and "Created version" not in printed, printed


def test_other_mlflow_output_is_passed_on(capsys):
    with registry._without_mlflow_chatter():
        print("Registered model 'reactdiff' already exists. Creating a new version of this model...",
              file=sys.stderr)
        print("Created version '3' of model 'reactdiff'.", file=sys.stderr)
        print("something else went wrong", file=sys.stderr)
        print("🏃 View run unit at: http://127.0.0.1:5000/#/experiments/1/runs/abc")
        print("kept")
    printed = capsys.readouterr()
    assert (printed.err, printed.out) == ("something else went wrong\n", "kept\n")


def test_register_sets_challenger_tags_and_keeps_the_run_status(registered):
    gen, run_id, first, second = registered
    assert (str(first.version), str(second.version)) == ("1", "2")
    assert second.aliases == ["challenger"]                           # the alias moved to the newest
    assert first.tags["purpose"] == "test" and first.tags["feature_set_hash"] == "f" * 64
    assert first.tags["run_id"] == run_id and first.run_id == run_id
    assert tracking.client().get_run(run_id).info.status == "RUNNING"   # logging did not close the run


@pytest.mark.parametrize("uri, version", [("models:/reactdiff@challenger", "2"), ("models:/reactdiff/1", "1"),
                                          ("models:/reactdiff/latest", "2")])
def test_load_generator_by_alias_version_and_latest(registered, uri, version):
    gen, *_ = registered
    loaded, mv = registry.load_generator(uri)
    assert str(mv.version) == version
    if version == "1":   # bit-identical weights, statistics and metadata
        for (k, a), (_, b) in zip(gen.state_dict().items(), loaded.state_dict().items()):
            assert torch.equal(a, b), k
        assert loaded.metadata == gen.metadata


def test_pyfunc_from_code_predicts_several_reactions(registered, tmp_path):
    import mlflow

    gen, *_ = registered
    model = mlflow.pyfunc.load_model("models:/reactdiff@challenger")
    meta = model.metadata
    assert [s.name for s in meta.get_input_schema().inputs] == list(gen.feature_widths)
    folder = mlflow.artifacts.download_artifacts("models:/reactdiff/2", dst_path=str(tmp_path))
    reqs = open(f"{folder}/requirements.txt").read().split()
    assert any(r.startswith("torch==") for r in reqs) and any(r.startswith("mlflow==") for r in reqs)
    out = model.predict(_speaker(gen, 2), params={"samples": 3, "seed": 7})
    assert out["emotion"].shape == (2, 3, FRAMES, 25) and out["tdmm"].shape == (2, 3, FRAMES, 58)
    again = model.predict(_speaker(gen, 2), params={"samples": 3, "seed": 7})
    np.testing.assert_array_equal(out["emotion"], again["emotion"])       # seeded → reproducible
    single = model.predict(_speaker(gen))                                # default: one reaction
    assert single["emotion"].shape == (1, 1, FRAMES, 25)
    # Clips of any length, as the generate job takes them: a short one looped, a long one windowed.
    rng = np.random.default_rng(1)
    for frames in (7, 2 * FRAMES + 30):
        clip = {n: rng.standard_normal((1, frames, w)).astype(np.float32) for n, w in gen.feature_widths.items()}
        out = model.predict(clip, params={"seed": 3})
        assert out["emotion"].shape == (1, 1, frames, 25) and np.isfinite(out["emotion"]).all()
    with pytest.raises(Exception, match="video_pixels"):
        model.predict({"audio_mfcc26": _speaker(gen)["audio_mfcc26"]})


def test_the_model_page_shows_an_input_example_that_serves(registered, tmp_path):
    """MLflow's model page shows the logged example request; it is one short clip of every named
    feature (a few kB here, ~100 kB at the paper widths) and the served model answers it."""
    import json

    import mlflow
    from mlflow.models import Model

    gen, *_ = registered
    folder = mlflow.artifacts.download_artifacts("models:/reactdiff/2", dst_path=str(tmp_path))
    example = Model.load(folder).load_input_example(folder)
    frames = min(registry.EXAMPLE_MAX_FRAMES, registry.EXAMPLE_VALUES // sum(gen.feature_widths.values()))
    assert {n: np.asarray(v).shape for n, v in example.items()} == {
        n: (1, frames, w) for n, w in gen.feature_widths.items()}
    serving = json.load(open(f"{folder}/serving_input_example.json"))
    assert set(serving["inputs"]) == set(gen.feature_widths)           # what a REST client sends
    out = mlflow.pyfunc.load_model("models:/reactdiff/2").predict(example)
    assert out["emotion"].shape == (1, 1, frames, 25)


def test_logging_a_model_says_nothing_at_info_level(registered):
    """MLflow's pyfunc INFO line on every logged model ("Validating input example against model
    signature") is not printed; its warnings would be."""
    import logging

    gen, *_ = registered
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("mlflow.pyfunc")
    logger.addHandler(handler)
    try:
        registry.log_generator(gen)
    finally:
        logger.removeHandler(handler)
    assert [r.getMessage() for r in records if r.levelno < logging.WARNING] == []
    assert logger.level == logging.NOTSET                                # and the level is restored


def test_unknown_model_alias_or_version_is_a_clear_error(registered):
    with pytest.raises(registry.RegistryError, match=r"no registered model named 'nope'.*registered models: reactdiff"):
        registry.load_generator("models:/nope@champion")
    with pytest.raises(registry.RegistryError, match=r"has no alias 'champion' \(aliases: @challenger -> v2\)"):
        registry.resolve_version("models:/reactdiff@champion")
    with pytest.raises(registry.RegistryError, match=r"no version '9' \(versions: 1, 2\)"):
        registry.load_generator("models:/reactdiff/9")
    with pytest.raises(registry.RegistryError, match="names no version or alias"):
        registry.resolve_version("models:/reactdiff")


def test_empty_registry_error_says_what_to_do(mlflow_uri):
    with pytest.raises(registry.RegistryError, match="none yet"):
        registry.resolve_version("models:/reactdiff@champion")


def test_generator_files_load_from_paths_and_s3_without_the_registry(tmp_path, s3, mlflow_uri):
    gen = _generator()
    local = tmp_path / "generator.pt"
    gen.save(str(local))
    loaded, mv = registry.load_generator(str(local))
    assert mv is None and torch.equal(loaded.latent_stats.maximum, gen.latent_stats.maximum)
    from pipeline import storage

    uri = s3.uri("models", "generator.pt")
    storage.write_bytes(uri, gen.to_bytes())
    assert registry.resolve_version(uri) is None
    assert torch.equal(registry.load_generator(uri)[0].latent_stats.minimum, gen.latent_stats.minimum)
    with pytest.raises(registry.RegistryError, match="not found"):
        registry.load_generator(str(tmp_path / "missing.pt"))


def test_a_pickled_object_is_refused(tmp_path, mlflow_uri):
    from reactdiff.generator import CheckpointError

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"format": "reactdiff-generator/1", "x": Evil()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        registry.load_generator(str(path))
