"""A training run's checkpoint files: plain dicts of tensors, loaded with ``weights_only=True``.

``<run_dir>/checkpoint_epochNNNN/`` holds ``checkpoint.pt`` (model, EMA, optimiser, epoch, step,
history, MLflow run id, config, snapshot id) and ``meta.json`` (epoch, metrics, history — read
without torch). Written by the workers (pipeline.train.loop), read back to resume
(``restore_state``) and by the driver to export one, the latest or the best by a metric
(``export_checkpoint``).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Literal

from pipeline import storage
from pipeline.train.config import TrainError

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
META_FILE = "meta.json"


def write_checkpoint(directory: str, state: dict[str, Any], meta: dict[str, Any]) -> None:
    import torch

    torch.save(state, os.path.join(directory, CHECKPOINT_FILE))
    with open(os.path.join(directory, META_FILE), "w") as f:
        json.dump(meta, f, indent=2, sort_keys=True, default=str)


def read_checkpoint(directory: str, map_location="cpu") -> dict[str, Any]:
    """The state dict of a checkpoint directory (``torch.load(weights_only=True)``)."""
    import torch

    return torch.load(os.path.join(directory, CHECKPOINT_FILE), map_location=map_location, weights_only=True)


def restore_state(checkpoint, run_dir: str) -> dict[str, Any] | None:
    """The state to resume from: Ray's latest checkpoint, or — when its file is unreadable
    (truncated upload, disk error) — the newest previous complete checkpoint of the run."""
    if checkpoint is None:
        return None
    name = os.path.basename(str(checkpoint.path).rstrip("/"))
    try:
        with checkpoint.as_directory() as d:
            return read_checkpoint(d, map_location="cpu")
    except Exception as exc:        # noqa: BLE001 - any unreadable file: fall back, naming it
        bad = storage.redact(storage.join(run_dir, name, CHECKPOINT_FILE))
        log.error("checkpoint %s is unreadable (%s: %s); resuming from the previous checkpoint",
                  bad, type(exc).__name__, " ".join(str(exc).split())[:200])
    for uri, _ in reversed(checkpoint_metas(run_dir)):
        if os.path.basename(uri.rstrip("/")) == name:
            continue
        try:
            state = load_checkpoint_uri(uri)
        except Exception as exc:    # noqa: BLE001
            log.error("previous checkpoint %s is unreadable too (%s)", storage.redact(uri), type(exc).__name__)
            continue
        log.warning("resuming from the previous checkpoint %s (epoch %s)", storage.redact(uri), state.get("epoch"))
        return state
    raise TrainError(f"checkpoint {bad} is unreadable and run {os.path.basename(run_dir)} has no other readable "
                     "checkpoint; start a new run with --set name=<new name>")


def generator_from_state(state: dict[str, Any], *, ema: bool = True):
    """The ReactDiffGenerator a checkpoint holds, with its EMA weights (what is validated/exported)."""
    import torch

    from reactdiff.generator import GeneratorConfig, ReactDiffGenerator

    with torch.device("meta"):
        gen = ReactDiffGenerator(GeneratorConfig.from_dict(state["generator_config"]))
    gen.load_state_dict(state["model"], assign=True)
    if ema:
        params = dict(gen.named_parameters())
        with torch.no_grad():
            for name, value in state["ema"]["shadow"].items():
                params[name].copy_(value.to(params[name].dtype))
    gen.metadata = dict(state.get("metadata") or {})
    gen.eval()
    return gen


def _checkpoint_dirs(run_dir: str) -> list[str]:
    return sorted(n for n in storage.listdir(run_dir) if n.startswith("checkpoint_epoch"))


def previous_meta(run_dir: str) -> dict[str, Any] | None:
    """meta.json of the newest complete checkpoint of a run (None for a new run)."""
    metas = checkpoint_metas(run_dir)
    return metas[-1][1] if metas else None


def checkpoint_metas(run_dir: str) -> list[tuple[str, dict[str, Any]]]:
    """(checkpoint URI, meta.json) of every complete checkpoint of a run, oldest first."""
    out = []
    for name in _checkpoint_dirs(run_dir):
        uri = storage.join(run_dir, name)
        if storage.exists(storage.join(uri, META_FILE)) and storage.exists(storage.join(uri, CHECKPOINT_FILE)):
            out.append((uri, storage.read_json(storage.join(uri, META_FILE))))
    return out


def export_checkpoint(run_dir: str, *, name: str | None, metric: str | None,
                      mode: Literal["min", "max"]) -> tuple[str, dict[str, Any]]:
    """(URI, state) of the checkpoint to export: best by ``metric`` (``mode`` "min"/"max"), else
    the latest. An unreadable file (truncated upload, disk error) is named in the log and the
    next in that order is exported instead."""
    metas = checkpoint_metas(run_dir)
    if not metas:
        raise TrainError(f"run {name} has no complete checkpoint in {storage.redact(run_dir)}")
    scores = {u: (m.get("metrics") or {}).get(metric) if metric else None for u, m in metas}
    scored = sorted((u for u in scores if scores[u] is not None), key=lambda u: float(scores[u]),
                    reverse=mode == "max")
    ranked = scored + [u for u, _ in reversed(metas) if scores[u] is None]     # unscored: newest first
    for uri in ranked:
        try:
            return uri, load_checkpoint_uri(uri)
        except Exception as exc:        # noqa: BLE001 - any unreadable file: try the next one
            log.error("checkpoint %s is unreadable (%s: %s); exporting the next best", storage.redact(uri),
                      type(exc).__name__, " ".join(str(exc).split())[:200])
    raise TrainError(f"run {name}: none of its {len(ranked)} checkpoints is readable; "
                     "start a new run with --set name=<new name>")


def load_checkpoint_uri(uri: str, map_location="cpu") -> dict[str, Any]:
    """A checkpoint directory URI (local or s3://) → its state (``torch.load(weights_only=True)``)."""
    import io

    import torch

    raw = storage.read_bytes(storage.join(uri, CHECKPOINT_FILE))
    return torch.load(io.BytesIO(raw), map_location=map_location, weights_only=True)
