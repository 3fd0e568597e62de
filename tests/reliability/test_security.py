"""Security defaults: weights load without unpickling code, model files are pinned by sha256, and
S3 credentials never reach logs, manifests or error messages.

Every listener of every process the jobs start stays on loopback while they run (sampled
through a whole clean-shell pipeline: extraction, 2-worker training, evaluation).

Referenced, not repeated (see the summary): loopback-only Ray at start (tests/test_runtime.py), no
unauthenticated dashboard/job API in ray_cluster.yaml and infra/ (tests/infra/), the sha256 of
each model file in the manifest and its re-check before a worker loads it (tests/extract),
.npy without pickles (tests/test_storage.py).
"""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from pipeline import storage
from tests.helpers import faults as F
from tests.helpers import report as R
from tests.helpers.models import save_tiny_torchscript


# ---------------------------------------------------------------------------------------------
# Code-carrying pickles in every weights file the project loads


def _generator_file(path: Path, payload) -> str:
    import torch

    torch.save({"format": "reactdiff-generator/1", "config": {}, "state_dict": {}, "x": payload}, path)
    return str(path)


def _load_generator(path: str, s3):
    from reactdiff.generator import ReactDiffGenerator

    return ReactDiffGenerator.load(path)


def _load_generator_from_s3(path: str, s3):
    from pipeline.registry.models import load_generator_file

    uri = s3.uri("evil", "generator.pt")
    storage.write_bytes(uri, Path(path).read_bytes())
    return load_generator_file(uri)


def _read_train_checkpoint(path: str, s3):
    from pipeline.train.checkpoints import CHECKPOINT_FILE, read_checkpoint

    folder = Path(path).parent / "checkpoint_epoch0001"
    folder.mkdir()
    (folder / CHECKPOINT_FILE).write_bytes(Path(path).read_bytes())
    return read_checkpoint(str(folder))


def _load_train_checkpoint_from_s3(path: str, s3):
    from pipeline.train.checkpoints import CHECKPOINT_FILE, load_checkpoint_uri

    uri = s3.uri("evil", "checkpoint_epoch0001")
    storage.write_bytes(storage.join(uri, CHECKPOINT_FILE), Path(path).read_bytes())
    return load_checkpoint_uri(uri)


def _load_wav2vec2_weights(path: str, s3):
    from pipeline.data.features import build_extractor

    ext = build_extractor("wav2vec2", {"type": "wav2vec2", "uri": path})
    ext.resolve()
    return ext.load("cpu")


LOADERS = {
    "ReactDiffGenerator.load (generator.pt)": _load_generator,
    "registry.load_generator_file (s3://…/generator.pt)": _load_generator_from_s3,
    "checkpoints.read_checkpoint (resume)": _read_train_checkpoint,
    "checkpoints.load_checkpoint_uri (s3 export)": _load_train_checkpoint_from_s3,
    "wav2vec2 extractor weights (--model)": _load_wav2vec2_weights,
}


@pytest.mark.parametrize("loader", list(LOADERS), ids=["generator", "generator-s3", "checkpoint",
                                                       "checkpoint-s3", "wav2vec2"])
def test_code_in_a_weights_file_is_refused_and_never_runs(loader, s3, tmp_path, request):
    ran = tmp_path / "payload-ran"
    path = _generator_file(tmp_path / "evil.pt", F.Payload(str(ran)))
    with pytest.raises(Exception) as err:
        LOADERS[loader](path, s3)
    message = str(err.value)
    R.case(R.SECURITY, f"pickle payload via {loader}", f"refused: {type(err.value).__name__}",
           nodeid=request.node.nodeid, detail=" ".join(message.split())[:90])
    assert not ran.exists(), "the pickled payload was executed"
    assert "weights_only" in message or "weights-only" in message or "Weights only" in message, message


def test_a_model_file_swapped_since_extraction_is_refused_before_it_loads(tmp_path, monkeypatch, request):
    import torch

    from pipeline.config import ConfigError
    from pipeline.data.features import feature_set_from_manifest

    model = save_tiny_torchscript(tmp_path / "net.pt", width=8, seed=0)
    recorded = hashlib.sha256(Path(model).read_bytes()).hexdigest()
    manifest = {"feature_set": {"name": "nets", "config": {"name": "nets", "extractors": {"tiny": {"type": "torchscript"}}},
                                "models": {"tiny": {"uri": model, "sha256": recorded}},
                                "resolved": {"policy": {"fps": 25.0, "frames": None}}},
                "config": {}}
    save_tiny_torchscript(tmp_path / "net.pt", width=8, seed=1)           # replaced after extraction
    loads = []
    real = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a) or real(*a, **k))
    features, _ = feature_set_from_manifest(manifest)
    error = None
    try:
        features.extractors[0].resolve()
    except ConfigError as exc:
        error = exc
    R.case(R.SECURITY, "TorchScript swapped since extraction (generate)",
           "refused before torch.jit.load" if error and not loads else f"torch.jit.load ran {len(loads)}x first",
           nodeid=request.node.nodeid)
    assert error is not None and not loads


# ---------------------------------------------------------------------------------------------
# Credentials


@pytest.mark.slow
def test_s3_secrets_never_appear_in_extraction_logs_snapshots_or_errors(clean_run, s3, ray_local, capsys, request):
    """The clean extraction ran S3 -> S3 with the driver's secret set to a unique marker (workers
    use the session's dummy secret): neither appears in what it logged or printed (captured at
    DEBUG for pipeline/s3fs/botocore.credentials, plus Ray's forwarded worker output), in any file
    of the snapshot (manifest, quarantine, items, clip files), in Ray's session logs, or in the
    errors that S3 failures raise."""
    from jobs import cli
    from pipeline.data.extract import ExtractConfig, extract
    from pipeline.data.snapshot import Snapshot

    secrets = [clean_run.marker, F.SESSION_SECRET]
    leaks, scanned = [], 0

    def scan(what, blob):
        nonlocal scanned
        scanned += 1
        leaks.extend(f"{what}: {'marker' if s == secrets[0] else 'session secret'}" for s in F.secrets_in(blob, secrets))

    assert "s3fs" in clean_run.said and "extract:" in clean_run.said     # the capture really saw the run
    scan("logs + stdout/stderr of the extraction", clean_run.said)
    fs, base = storage.filesystem(clean_run.result.uri)
    for key in fs.find(base):
        scan(f"snapshot file {key[len(base):]}", fs.cat_file(key))
    logs = Path(ray_local._private.worker._global_node.get_session_dir_path(), "logs")
    for path in logs.glob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            scan(f"Ray session log {path.name}", path.read_bytes())

    errors = []
    marker = f"rel-secret-{uuid.uuid4().hex}"
    with F.s3_secret(marker):
        secrets.append(marker)
        missing = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}"
        for attempt in (lambda: Snapshot.open(f"{missing}/snapshots/x"),
                        lambda: extract(ExtractConfig(data=f"{missing}/data", out=s3.uri("out"))),
                        lambda: storage.read_bytes(s3.uri("no", "such", "key")),
                        lambda: Snapshot.open(s3.uri("nothing-here"))):
            try:
                attempt()
                errors.append("no error")
            except Exception as exc:       # noqa: BLE001 - the messages are what we check
                errors.append(f"{type(exc).__name__}: {exc}")
        capsys.readouterr()
        code = cli.main(["extract", "--data", f"{missing}/data", "--out", s3.uri("out")])
        errors.append(capsys.readouterr().err)
    assert code == 2 and "no error" not in errors, errors
    for e in errors:
        scan("error message", e)
    R.case(R.SECURITY, "S3 secret in extraction outputs and errors",
           f"absent from {scanned} logs/files/messages" if not leaks else f"LEAKED: {leaks[:3]}",
           nodeid=request.node.nodeid, detail="driver marker + workers' secret; manifest, parquet, Ray logs")
    assert not leaks, leaks


# ---------------------------------------------------------------------------------------------
# Listeners while jobs run


# Each job and what must have been seen listening while it ran (proof that it was sampled
# mid-run): the local Ray node and its dashboard (the State API Ray Train polls) always; for
# training, the rank-0 torch store in a train worker.
JOB_LISTENERS = {"extract": ("raylet", "dashboard.py"), "train autoencoder": ("RayTrainWorker", "dashboard.py"),
                 "train diffusion": ("raylet", "dashboard.py"), "evaluate": ("raylet", "dashboard.py")}


@pytest.mark.slow
def test_every_process_listens_on_loopback_only_while_jobs_run(clean_shell_pipeline, request):
    """`ss -ltnp` every 0.5 s over the test process and all its descendants (the `reactdiff`
    commands, their local Ray nodes and workers, the torch process group of a 2-worker
    training, the S3 and MLflow servers): no listener beyond 127.0.0.0/8 or ::1, at any time."""
    run = clean_shell_pipeline
    sampler = run.sampler
    exposed = sampler.exposed()
    for job, needles in JOB_LISTENERS.items():
        rows = sampler.in_phase(job)
        R.case(R.SECURITY, f"listeners while `reactdiff {job}` runs",
               f"{len(rows)} seen, all loopback" if rows and not [r for r in exposed if r.phase == job]
               else f"{len(rows)} seen, exposed: {[r.address for r in exposed if r.phase == job][:3]}",
               nodeid=request.node.nodeid, detail=f"{sampler.samples.get(job, 0)} samples")
        assert run.steps[job].returncode == 0, run.steps[job].output[-3000:]
        for needle in needles:
            assert any(needle in r.command for r in rows), (
                f"no {needle} listener sampled during {job} ({sampler.samples.get(job, 0)} samples)")
    assert not exposed, "\n".join(f"{r.phase}: {r.address} {r.command}" for r in exposed)
