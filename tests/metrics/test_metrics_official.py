"""reactdiff.metrics against straightforward per-pair implementations of the official code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import official_reference as official
from reactdiff import metrics


@pytest.fixture(scope="module")
def react_like():
    """Small REACT-shaped data with the features that trigger the quirks: binary action units,
    channels constant over a clip, a neighbour matrix with the diagonal and a few more ones."""
    rng = np.random.default_rng(7)
    n, k, t = 6, 3, 60
    listener = rng.random((n, t, 25)).astype(np.float32)
    listener[:, :, :15] = listener[:, :, :15] > 0.7
    listener[1, :, 4] = 0.0  # an action unit that never fires
    listener[2, :, 20] = 0.3  # a constant expression probability
    speaker = rng.random((n, t, 25)).astype(np.float32)
    speaker[3, :, 2] = 1.0
    pred = rng.random((n, k, t, 25)).astype(np.float32)
    pred[0, :, :, 3] = 0.25
    pred[4, 1, :, 16] = 0.5
    neighbours = (rng.random((n, n)) < 0.35).astype(np.uint8)
    np.fill_diagonal(neighbours, 1)
    return pred, listener, speaker, neighbours


def test_frcorr_matches_official(react_like):
    pred, listener, _, neighbours = react_like
    # float64 moments here vs float32 numpy moments officially: ~1e-7 relative.
    assert metrics.frcorr(pred, listener, neighbours) == pytest.approx(official.frcorr(pred, listener, neighbours), rel=1e-6)


def test_frdist_matches_official_and_splits_by_rows(react_like):
    pred, listener, _, neighbours = react_like
    expected = official.frdist_rows(pred, listener, neighbours)
    per_row = metrics.frdist_rows(pred, listener, neighbours)
    # Same DTW arithmetic as tslearn and the same accumulation order: bit-identical.
    np.testing.assert_array_equal(per_row, expected)
    total = metrics.frdist(pred, listener, neighbours)
    assert total == official.frdist(pred, listener, neighbours)
    # The distributed evaluation sums per-row values computed by separate tasks.
    parts = [metrics.frdist_rows(pred, listener, neighbours, rows) for rows in ([4, 5], [0, 1, 2, 3])]
    assert float(np.mean(np.concatenate([parts[1], parts[0]]))) == total
    assert metrics.frdist(pred, listener, neighbours, num_threads=1) == total


def test_frdist_torch_device_matches_numba(react_like):
    pred, listener, _, neighbours = react_like
    assert metrics.frdist(pred, listener, neighbours, device="cpu") == pytest.approx(
        metrics.frdist(pred, listener, neighbours), rel=1e-13
    )


def test_diversity_metrics_match_official(react_like):
    pred = react_like[0]
    # Official values come from float32 torch (cdist/var); ours are float64 closed forms.
    assert metrics.frdiv(pred) == pytest.approx(official.frdiv(pred), rel=1e-5)
    assert metrics.frvar(pred) == pytest.approx(official.frvar(pred), rel=1e-5)
    assert metrics.frdvs(pred) == pytest.approx(official.frdvs(pred), rel=1e-5)
    assert metrics.frdiv(pred[:, :1]) == 0.0  # one sample: the official early return


def test_frsyn_matches_official_exactly(react_like):
    pred, _, speaker, _ = react_like
    assert metrics.frsyn(pred, speaker) == official.frsyn(pred, speaker)
    # The serial official variant scores every sample (a few items keep the oracle fast).
    assert metrics.frsyn(pred[:3], speaker[:3], all_samples=True) == official.frsyn(pred[:3], speaker[:3], True)


def test_compute_all_with_binarize_and_timings(react_like):
    pred, listener, speaker, neighbours = react_like
    timings: dict[str, float] = {}
    results = metrics.compute_all(
        torch.from_numpy(pred), listener, speaker, torch.from_numpy(neighbours), binarize=True, timings=timings
    )
    assert list(results) == list(metrics.METRIC_NAMES) == list(timings)
    assert all(seconds >= 0 for seconds in timings.values())
    rounded = pred.copy()
    rounded[..., :15] = np.round(rounded[..., :15])
    assert results["FRCorr"] == pytest.approx(official.frcorr(rounded, listener, neighbours), rel=1e-6)
    assert results["FRDist"] == official.frdist(rounded, listener, neighbours)
    assert results == {
        "FRCorr": metrics.frcorr(rounded, listener, neighbours),
        "FRDist": metrics.frdist(rounded, listener, neighbours),
        "FRDiv": metrics.frdiv(rounded),
        "FRVar": metrics.frvar(rounded),
        "FRDvs": metrics.frdvs(rounded),
        "FRSyn": metrics.frsyn(rounded, speaker),
    }


def test_longer_real_clips_are_cut_to_the_prediction_length(react_like):
    pred, listener, speaker, neighbours = react_like
    padded = np.concatenate([listener, listener[:, :1]], axis=1)  # 751 vs 750 frames in REACT
    assert metrics.frcorr(pred, padded, neighbours) == metrics.frcorr(pred, listener, neighbours)
    with pytest.raises(ValueError):
        metrics.frsyn(pred, speaker[:, :-1])


def test_rows_without_appropriate_neighbours_are_rejected(react_like):
    pred, listener, _, neighbours = react_like
    broken = neighbours.copy()
    broken[2] = 0
    with pytest.raises(ValueError, match="item 2"):
        metrics.frdist(pred, listener, broken)
