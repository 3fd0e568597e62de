"""The ReactDiff generator as an MLflow pyfunc, logged with *models from code*.

MLflow logs this file itself (``python_model=<path of this file>``), not a pickle of an object:
loading the model executes this short module, which reads the ``generator`` artifact (the file
written by ``ReactDiffGenerator.save``) with ``torch.load(weights_only=True)``. The model folder
carries the ``reactdiff`` package as ``code_paths``, so serving needs only torch, numpy and
mlflow — not this repository, not Ray.

Input: the speaker's named per-frame features, exactly as the snapshot columns
(``{"video_pixels": [B, T, D], "audio_mfcc26": [B, T, 26]}``, clips of any length T) as a dict
of float32 arrays; the logged tensor signature makes MLflow check names and shapes first. A
clip other than the model's 30-s window is covered like the generate job does it
(``reactdiff.windows``: a short one looped, a long one cross-faded windows). Params:
``samples`` (reactions per speaker, default 1) and ``seed`` (-1 = unseeded; clip b of a batch
uses seed + b). Output: ``{"emotion": [B, samples, T, 25], "tdmm": [B, samples, T, 58]}``
float32.

    model = mlflow.pyfunc.load_model("models:/reactdiff@champion")
    out = model.predict({"video_pixels": v, "audio_mfcc26": a}, params={"samples": 10})
"""

from __future__ import annotations

import mlflow
import numpy as np
from mlflow.pyfunc import PythonModel


def _as_feature_dict(model_input, names) -> dict[str, np.ndarray]:
    """dict of arrays or a DataFrame (one clip a row) → {name: float32 [B, T, D]}."""
    if hasattr(model_input, "columns"):  # pandas DataFrame: one clip per row
        model_input = {c: np.stack([np.asarray(np.stack(list(v)) if v.dtype == object and np.ndim(v[0]) == 1
                                               else v.tolist(), dtype=np.float32)
                                    for v in model_input[c]]) for c in model_input.columns}
    if not isinstance(model_input, dict):
        raise TypeError(f"expected a dict of named speaker features {list(names)}, "
                        f"got {type(model_input).__name__}")
    missing = [n for n in names if n not in model_input]
    if missing:
        raise KeyError(f"missing speaker features {missing}; the model takes {list(names)}")
    out = {}
    for name in names:
        x = np.asarray(model_input[name], dtype=np.float32)
        if x.ndim == 2:
            x = x[None]
        if x.ndim != 3:
            raise ValueError(f"feature {name!r} must be [B, T, D] or [T, D], got shape {x.shape}")
        out[name] = x
    return out


class ReactDiffModel(PythonModel):
    """pyfunc wrapper: speaker features → several listener reactions."""

    # Inputs are checked by the logged tensor signature (names, dtypes, [B, T, D] shapes).
    # MLflow's type-hint validation describes lists of records, not a dict of named tensors,
    # and without this it warns on every import of this module that type hints are missing.
    _skip_type_hint_validation = True

    def load_context(self, context):
        import torch

        from reactdiff.generator import ReactDiffGenerator

        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.generator = ReactDiffGenerator.load(context.artifacts["generator"], map_location=device)
        self.generator.eval()
        self.device = device

    def predict(self, context, model_input, params=None):
        import torch

        from reactdiff.windows import generate_reactions

        params = params or {}
        samples = int(params.get("samples", 1) or 1)
        seed = int(params.get("seed", -1))
        if seed < 0:
            seed = int(np.random.default_rng().integers(2 ** 31))
        feats = _as_feature_dict(model_input, list(self.generator.feature_widths))
        clips, frames = next(iter(feats.values())).shape[:2]
        emotion, tdmm = [], []
        with torch.no_grad():
            for b in range(clips):
                e, t, _ = generate_reactions(self.generator, {k: v[b] for k, v in feats.items()}, frames,
                                             samples=samples, seed=seed + b)
                emotion.append(e)
                tdmm.append(t)
        return {"emotion": np.stack(emotion).astype(np.float32), "tdmm": np.stack(tdmm).astype(np.float32)}


mlflow.models.set_model(ReactDiffModel())
