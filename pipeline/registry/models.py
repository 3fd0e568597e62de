"""The MLflow model registry for ReactDiff generators: register, resolve, load.

One registered model (default ``reactdiff``) whose versions each hold a whole
``ReactDiffGenerator`` (stage 1 + stage 2 + latent statistics + conditioning projection +
config + feature-set hash) as a pyfunc logged with *models from code*
(``pipeline/registry/pyfunc.py``): the code is a plain Python file and the weights are the file
written by ``ReactDiffGenerator.save``, loaded with ``torch.load(weights_only=True)`` — nothing
is ever unpickled. Aliases, not stages (deprecated since MLflow 2.9): ``challenger`` is the
newest candidate, ``champion`` is what serves.

Register from one process (the driver, after ``trainer.fit()``), never from every worker: the
registry allocates version numbers with ``MAX(version) + 1`` and concurrent registration races.

Model URIs understood by :func:`load_generator` and :func:`resolve_version`::

    models:/reactdiff@champion     alias
    models:/reactdiff/3            version
    models:/reactdiff/latest       newest version
    models:/m-<id>                 a logged model (not registered)
    runs:/<run id>/<path>          a run artifact (a generator file or a logged model folder)
    s3://…/generator.pt, /path/…   a generator file written by ReactDiffGenerator.save
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import logging
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from pipeline import storage
from pipeline.errors import UserError
from pipeline.registry import runs as tracking

if TYPE_CHECKING:  # pragma: no cover
    from mlflow.entities.model_registry import ModelVersion

    from reactdiff.generator import ReactDiffGenerator

log = logging.getLogger(__name__)

DEFAULT_NAME = "reactdiff"
CHALLENGER = "challenger"
CHAMPION = "champion"
ARTIFACT_KEY = "generator"                 # the pyfunc artifact holding the weights file
GENERATOR_FILE = "generator.pt"
MODEL_CODE = Path(__file__).resolve().parent / "pyfunc.py"
MODEL_DESCRIPTION = ("ReactDiff facial-reaction generator: speaker audio-visual features -> "
                     "several listener reactions (25-d emotion + 58-d 3DMM per frame).")

# What the pyfunc needs at serving time. Pinned to the versions this model was trained with:
# MLflow's own requirement inference loads the model in a subprocess, costs seconds and often
# falls back silently (mlflow/mlflow #7252), so we never let it run.
SERVING_PACKAGES = ("torch", "numpy", "mlflow")

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))?/?$")


class RegistryError(UserError, LookupError):
    """An unknown registered model, version or alias, or an unusable model URI."""


# ---------------------------------------------------------------------------------------------
# Registering
# ---------------------------------------------------------------------------------------------

def pip_requirements() -> list[str]:
    """Pinned serving requirements from the running environment (local version labels dropped)."""
    reqs = []
    for pkg in SERVING_PACKAGES:
        try:
            version = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            reqs.append(pkg)
            continue
        reqs.append(f"{pkg}=={version.split('+', 1)[0]}")
    return reqs


def model_signature(generator: "ReactDiffGenerator"):
    """Tensor signature: named per-frame speaker features in, reactions out; params samples/seed."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec, Schema, TensorSpec

    inputs = Schema([TensorSpec(np.dtype(np.float32), (-1, -1, int(width)), name=name)
                     for name, width in generator.feature_widths.items()])
    mmt = generator.config.mmt
    outputs = Schema([
        TensorSpec(np.dtype(np.float32), (-1, -1, -1, int(mmt.emotion_dim)), name="emotion"),
        TensorSpec(np.dtype(np.float32), (-1, -1, -1, int(mmt.tdmm_dim)), name="tdmm"),
    ])
    params = ParamSchema([ParamSpec("samples", "long", 1), ParamSpec("seed", "long", -1)])
    return ModelSignature(inputs=inputs, outputs=outputs, params=params)


# The input example MLflow shows on the model's page and serves once at logging to check it: one
# clip of zeros, as many frames as fit EXAMPLE_VALUES numbers (at most a second). A full 30-s
# clip at the paper feature set's ~28 000 numbers per frame would be ~200 MB of JSON; this is
# ~100 kB at any width, and the served model takes clips of any length (reactdiff.windows).
EXAMPLE_VALUES = 25_000
EXAMPLE_MAX_FRAMES = 25


def input_example(generator: "ReactDiffGenerator") -> dict[str, Any]:
    """{feature name: float32 zeros [1, frames, width]}: a valid request of one short clip."""
    import numpy as np

    widths = {name: int(width) for name, width in generator.feature_widths.items()}
    frames = max(1, min(EXAMPLE_MAX_FRAMES, EXAMPLE_VALUES // max(1, sum(widths.values()))))
    return {name: np.zeros((1, frames, width), dtype=np.float32) for name, width in widths.items()}


def _reactdiff_code_path() -> str:
    import reactdiff

    return str(Path(reactdiff.__file__).resolve().parent)


def log_generator(generator: "ReactDiffGenerator", *, name: str = "generator",
                  run_id: str | None = None, tags: Mapping[str, Any] | None = None):
    """Log ``generator`` as an MLflow 3 logged model (pyfunc, models from code); ModelInfo.

    The model folder carries the ``reactdiff`` package (``code_paths``) so a serving host needs
    only the pinned requirements, not this repository.
    """
    with tracking.using():
        return _log_generator(generator, name=name, run_id=run_id, tags=tags)


# What MLflow prints on every call, said once elsewhere: ``register_model``'s lines (our log line
# names the version and alias) and the run links printed when a reopened run ends (the run's
# own end prints them). Dropped inside the block; anything else printed there is passed on.
_CHATTER = re.compile(r"^(Registered model .* already exists|Successfully registered model|"
                      r"Created version '\d+' of model|🏃 View run |🧪 View experiment at)")


@contextlib.contextmanager
def _without_mlflow_chatter():
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
    finally:
        for captured, stream in ((out, sys.stdout), (err, sys.stderr)):
            stream.write("".join(line for line in captured.getvalue().splitlines(keepends=True)
                                 if not _CHATTER.match(line)))


@contextlib.contextmanager
def _pyfunc_info_quieted():
    """MLflow's pyfunc logger at WARNING while a model is logged: its INFO line "Validating input
    example against model signature" on every version says nothing (a mismatch raises, a failed
    serving check warns; both still show)."""
    logger = logging.getLogger("mlflow.pyfunc")
    level = logger.level
    logger.setLevel(max(level, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(level)


def _log_generator(generator, *, name: str, run_id: str | None, tags: Mapping[str, Any] | None):
    import mlflow

    c = tracking.client()
    active = mlflow.active_run()
    reopen = run_id is not None and not (active and active.info.run_id == run_id)
    previous_status = c.get_run(run_id).info.status if reopen else None
    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, GENERATOR_FILE)
        generator.save(weights)
        kwargs = dict(
            name=name,
            python_model=str(MODEL_CODE),
            artifacts={ARTIFACT_KEY: weights},
            code_paths=[_reactdiff_code_path()],
            signature=model_signature(generator),
            input_example=input_example(generator),
            pip_requirements=pip_requirements(),
            tags={k: str(v) for k, v in (tags or {}).items() if v is not None} or None,
        )
        with _pyfunc_info_quieted():
            if reopen:
                with _without_mlflow_chatter(), mlflow.start_run(run_id=run_id):
                    info = mlflow.pyfunc.log_model(**kwargs)
            elif active is None:
                # No run: log into our experiment (durable artifact location), not MLflow's
                # "Default" one whose artifacts would land in ./mlruns of the current directory.
                info = _log_in_experiment(kwargs)
            else:
                info = mlflow.pyfunc.log_model(**kwargs)
        # start_run/end_run marked the run FINISHED; give it back its own status.
        if reopen and previous_status and previous_status != "FINISHED":
            c.update_run(run_id, status=previous_status)
    return info


def _log_in_experiment(kwargs: dict):
    """log_model outside a run, into the ``reactdiff`` experiment (MLflow 3 LoggedModel).

    Without a run MLflow would use its "Default" experiment, whose artifacts land in ./mlruns
    of the current directory.
    """
    import mlflow

    model = mlflow.initialize_logged_model(name=kwargs["name"], tags=kwargs.get("tags"),
                                           experiment_id=tracking.ensure_experiment(tracking.DEFAULT_EXPERIMENT))
    return mlflow.pyfunc.log_model(**kwargs, model_id=model.model_id)


def register_generator(generator: "ReactDiffGenerator", *, name: str = DEFAULT_NAME,
                       run_id: str | None = None, snapshot=None,
                       tags: Mapping[str, Any] | None = None,
                       alias: str | None = CHALLENGER) -> "ModelVersion":
    """Log ``generator`` and register it as a new version of ``name``; point ``alias`` at it."""
    import mlflow

    c = tracking.client()
    all_tags: dict[str, Any] = dict(tags or {})
    if snapshot is not None:
        all_tags.setdefault("snapshot_id", snapshot.id)
        all_tags.setdefault("snapshot_uri", snapshot.uri)
        all_tags.setdefault("feature_set_hash", snapshot.feature_set_hash)
    fsh = (getattr(generator, "metadata", None) or {}).get("feature_set_hash")
    if fsh:
        all_tags.setdefault("feature_set_hash", fsh)
    commit = tracking.git_commit()
    if commit:
        all_tags.setdefault("git_commit", commit)
    if run_id:
        all_tags.setdefault("run_id", run_id)

    info = log_generator(generator, run_id=run_id, tags=all_tags)
    try:
        c.get_registered_model(name)
    except Exception:
        try:
            c.create_registered_model(name, description=MODEL_DESCRIPTION)
        except Exception:  # created concurrently: fine
            pass
    with tracking.using(), _without_mlflow_chatter():
        version = mlflow.register_model(info.model_uri, name,
                                        tags={k: str(v) for k, v in all_tags.items() if v is not None})
    if alias:
        c.set_registered_model_alias(name, alias, version.version)
    log.info("registered %s version %s%s (%s)", name, version.version,
             f" as @{alias}" if alias else "", info.model_uri)
    return c.get_model_version(name, version.version)


# ---------------------------------------------------------------------------------------------
# Resolving
# ---------------------------------------------------------------------------------------------

def parse_models_uri(model_uri: str) -> tuple[str, str | None, str | None] | None:
    """``models:/name@alias`` → (name, alias, None); ``models:/name/3`` → (name, None, "3")."""
    m = _MODELS_URI.match(model_uri)
    if not m:
        return None
    return m.group("name"), m.group("alias"), m.group("version")


def _is_logged_model_id(name: str) -> bool:
    return name.startswith("m-") and len(name) > 8


def _not_found(exc: Exception) -> bool:
    return "RESOURCE_DOES_NOT_EXIST" in str(getattr(exc, "error_code", "")) or "not found" in str(exc).lower()


def _registered_model(c, name: str):
    try:
        return c.get_registered_model(name)
    except Exception as exc:
        if not _not_found(exc):
            raise
        names = sorted(m.name for m in c.search_registered_models())
        known = ", ".join(names) if names else "none yet — train a model first (reactdiff train)"
        raise RegistryError(f"no registered model named {name!r} in {tracking.tracking_uri()} "
                            f"(registered models: {known})") from None


def resolve_version(model_uri: str) -> "ModelVersion | None":
    """The registry version a ``models:/name@alias|/version`` URI points to; None for other URIs."""
    parsed = parse_models_uri(model_uri)
    if parsed is None:
        return None
    name, alias, version = parsed
    if alias is None and version is None and _is_logged_model_id(name):
        return None                                        # models:/m-<id>: a logged model
    if alias is None and version is None:
        raise RegistryError(f"{model_uri!r} names no version or alias: use models:/{name}@{CHAMPION}, "
                            f"models:/{name}@{CHALLENGER} or models:/{name}/<version>")
    c = tracking.client()
    model = _registered_model(c, name)
    aliases = dict(getattr(model, "aliases", {}) or {})
    if alias is not None:
        if alias not in aliases:
            have = ", ".join(f"@{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise RegistryError(f"registered model {name!r} has no alias {alias!r} (aliases: {have}); "
                                f"set one with `reactdiff promote` or MlflowClient.set_registered_model_alias")
        return c.get_model_version_by_alias(name, alias)
    versions = sorted((int(v.version) for v in c.search_model_versions(f"name = '{name}'")))
    if version == "latest":
        if not versions:
            raise RegistryError(f"registered model {name!r} has no versions")
        return c.get_model_version(name, str(versions[-1]))
    if not version.isdigit() or int(version) not in versions:
        have = ", ".join(str(v) for v in versions) or "none"
        raise RegistryError(f"registered model {name!r} has no version {version!r} (versions: {have})")
    return c.get_model_version(name, version)


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------

def _generator_file_in_model_dir(local_dir: str) -> str:
    """The weights file inside a downloaded pyfunc model folder (path read from its MLmodel)."""
    from mlflow.models import Model

    model = Model.load(local_dir)
    pyfunc = model.flavors.get("python_function", {})
    artifact = (pyfunc.get("artifacts") or {}).get(ARTIFACT_KEY)
    if not artifact:
        raise RegistryError(f"{local_dir}: not a ReactDiff model (no '{ARTIFACT_KEY}' artifact)")
    return os.path.join(local_dir, artifact["path"])


def _load_file(path: str, map_location="cpu") -> "ReactDiffGenerator":
    from reactdiff.generator import ReactDiffGenerator

    return ReactDiffGenerator.load(path, map_location=map_location)


def load_generator_file(uri: str, map_location="cpu") -> "ReactDiffGenerator":
    """A generator file (local path, ``file://`` or ``s3://``) written by ``ReactDiffGenerator.save``."""
    if not storage.is_remote(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if not os.path.exists(path):
            raise RegistryError(f"generator file not found: {uri}")
        return _load_file(path, map_location)
    if not storage.exists(uri):
        raise RegistryError(f"generator file not found: {uri}")
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, GENERATOR_FILE)
        Path(local).write_bytes(storage.read_bytes(uri))
        return _load_file(local, map_location)


def load_generator(model_uri: str, map_location="cpu") -> "tuple[ReactDiffGenerator, ModelVersion | None]":
    """Load a generator from the registry, a logged model, a run artifact or a file.

    Registry/MLflow URIs are downloaded and their weights file is loaded directly with
    ``weights_only=True``: loading a model never executes code from the artifact store.
    """
    import mlflow

    if model_uri.startswith(("models:/", "runs:/")):
        uri = tracking.tracking_uri()
        version = resolve_version(model_uri) if model_uri.startswith("models:/") else None
        download_uri = model_uri
        if version is not None:   # the version's own artifact location: no second registry lookup
            download_uri = tracking.client().get_model_version_download_uri(version.name, str(version.version))
        with tempfile.TemporaryDirectory() as tmp:
            try:
                local = mlflow.artifacts.download_artifacts(artifact_uri=download_uri, dst_path=tmp,
                                                            tracking_uri=uri, registry_uri=uri)
            except Exception as exc:
                if _not_found(exc) or "No such file" in str(exc):
                    raise RegistryError(f"cannot download {model_uri!r}: {exc}") from None
                raise
            path = local if os.path.isfile(local) else _generator_file_in_model_dir(local)
            return _load_file(path, map_location), version
    return load_generator_file(model_uri, map_location), None
