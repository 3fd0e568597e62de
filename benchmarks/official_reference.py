"""Straightforward per-pair implementations of the official REACT metrics.

Written from the specification in shared/reference/metrics.md (§2-7), looping over items,
samples and neighbours the way the official ``metric/*.py`` do, with ``np.corrcoef``-style
statistics, ``tslearn.metrics.dtw`` and ``torch.cdist``/``torch.var``. Slow; small inputs only.
The one reference for both the test oracle (tests/metrics) and the speed baseline
(benchmarks/metrics.py); ``*_rows`` functions score a subset of items.
"""

from __future__ import annotations

import numpy as np
import torch
from tslearn.metrics import dtw

GROUPS = ((0, 15, 1 / 15), (15, 17, 1), (17, 25, 1 / 8))


def nan_safe_pearson(a: np.ndarray, b: np.ndarray) -> float:
    """The patched ``corrcoef`` of FRC.py: covariance / (std std), NaN -> 0, clip [-1, 1]."""
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.cov(a, b)
        sd = np.sqrt(np.diag(c))
        c = c / sd[:, None]
        c = c / sd[None, :]
    return float(np.clip(np.nan_to_num(c), -1, 1)[0, 1])


def ccc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Lin's CCC per channel (float32 numpy moments, as the official code), mean over channels."""
    values = []
    for d in range(y_true.shape[1]):
        t, p = y_true[:, d], y_pred[:, d]
        cor = nan_safe_pearson(t, p)
        numerator = 2 * cor * np.std(t) * np.std(p)
        denominator = np.var(t) + np.var(p) + (np.mean(t) - np.mean(p)) ** 2
        # numpy 1.23 (pinned officially) promotes float32 scalar + Python float to float64.
        values.append(numerator / (np.float64(denominator) + 1e-8))
    return float(np.mean(values))


def _rows(n_items: int, rows) -> list[int]:
    return list(range(n_items)) if rows is None else [int(k) for k in rows]


def _best_per_item(pred, listener, neighbours, rows, pair, best) -> list[float]:
    """Per item k: sum over its samples i of best(pair(i, j) for each appropriate neighbour j),
    accumulated in the official loop order (FRC.py / FRD.py)."""
    per_item = []
    for k in _rows(pred.shape[0], rows):
        appropriate = np.argwhere(neighbours[k] == 1).reshape(-1)
        total = 0
        for i in range(pred.shape[1]):
            total += best(pair(pred[k, i], listener[j]) for j in appropriate)
        per_item.append(total)
    return per_item


def weighted_dtw(x: np.ndarray, y: np.ndarray) -> float:
    """FRD.py's distance: DTW per channel group (AUs, valence/arousal, expressions), weighted."""
    distance = 0
    for start, stop, weight in GROUPS:
        distance += weight * dtw(x.astype(np.float32)[:, start:stop], y.astype(np.float32)[:, start:stop])
    return distance


def frcorr_rows(pred, listener, neighbours, rows=None) -> list[float]:
    """Per item: sum over samples of the best CCC with an appropriate real reaction (FRC.py)."""
    return _best_per_item(pred, listener, neighbours, rows, lambda p, g: ccc(g, p), max)


def frcorr(pred, listener, neighbours) -> float:
    return float(np.mean(frcorr_rows(pred, listener, neighbours)))


def frdist_rows(pred, listener, neighbours, rows=None) -> list[float]:
    """Per item: sum over samples of the smallest weighted DTW to an appropriate reaction (FRD.py)."""
    return _best_per_item(pred, listener, neighbours, rows, weighted_dtw, min)


def frdist(pred, listener, neighbours) -> float:
    return float(np.mean(frdist_rows(pred, listener, neighbours)))


def frdiv(pred) -> float:
    preds = torch.as_tensor(np.asarray(pred, dtype=np.float32))
    total = 0
    for item in preds:
        if item.shape[0] == 1:
            return 0.0
        flat = item.reshape(item.shape[0], -1)
        squared = torch.cdist(flat, flat) ** 2
        total += torch.sum(squared) / (item.shape[0] * (item.shape[0] - 1) * flat.shape[1])
    return float(total / preds.shape[0])


def frvar(pred) -> float:
    return float(torch.mean(torch.var(torch.as_tensor(np.asarray(pred, dtype=np.float32)), dim=2)))


def frdvs(pred) -> float:
    preds = torch.as_tensor(np.asarray(pred, dtype=np.float32))
    n, k = preds.shape[:2]
    by_sample = preds.reshape(n, k, -1).transpose(0, 1)
    squared = torch.cdist(by_sample, by_sample) ** 2
    return float(torch.sum(squared) / (n * (n - 1) * k) / by_sample.shape[-1])


def lagged_windows(x: np.ndarray, s: np.ndarray, lag: int):
    """The official ``shift``: lag > 0 drops the first lag frames of x and the last of s."""
    if lag > 0:
        return x[lag:], s[:-lag]
    if lag < 0:
        return x[:lag], s[-lag:]
    return x, s


def best_lag_offset(x: np.ndarray, s: np.ndarray) -> int:
    curve = []
    for lag in range(-49, 50):
        per_channel = []
        for d in range(s.shape[-1]):
            a, b = lagged_windows(x[:, d], s[:, d], lag)
            with np.errstate(divide="ignore", invalid="ignore"):
                per_channel.append(np.corrcoef(a, b)[0, 1].item())
        curve.append(torch.mean(torch.Tensor(per_channel)))
    return abs(int(len(curve) // 2 - torch.argmax(torch.Tensor(curve))))


def frsyn_rows(pred, speaker, rows=None, all_samples: bool = False) -> list[int]:
    """Per (item, sample) in order: |best lag offset| against the item's speaker (TLCC.py)."""
    pred = np.asarray(pred, dtype=np.float32)
    speaker = np.asarray(speaker, dtype=np.float32)
    offsets = []
    for k in _rows(pred.shape[0], rows):
        for i in range(pred.shape[1] if all_samples else 1):
            offsets.append(best_lag_offset(pred[k, i], speaker[k]))
    return offsets


def frsyn(pred, speaker, all_samples: bool = False) -> float:
    return torch.mean(torch.Tensor(frsyn_rows(pred, speaker, all_samples=all_samples))).item()
