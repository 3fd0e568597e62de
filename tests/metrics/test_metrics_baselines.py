"""Baseline reactions (official run_baselines.py) and the values they must reach."""

from __future__ import annotations

import numpy as np
import pytest

from reactdiff import metrics


@pytest.fixture(scope="module")
def bidirectional():
    """L dyads evaluated in both directions (N = 2L), as the official item order: items L..2L-1
    swap the roles of items 0..L-1. Neighbours: the diagonal plus each mirrored item."""
    rng = np.random.default_rng(11)
    dyads, t = 4, 80
    person_a = rng.random((dyads, t, 25)).astype(np.float32)
    person_b = rng.random((dyads, t, 25)).astype(np.float32)
    person_a[:, :, :15] = person_a[:, :, :15] > 0.8
    speaker = np.concatenate([person_a, person_b])
    listener = np.concatenate([person_b, person_a])
    n = 2 * dyads
    neighbours = np.eye(n, dtype=np.uint8) + np.eye(n, k=dyads, dtype=np.uint8) + np.eye(n, k=-dyads, dtype=np.uint8)
    return listener, speaker, neighbours


def test_random_baseline_reaches_the_uniform_constants():
    listener = np.zeros((8, 300, 25), dtype=np.float32)
    pred = metrics.baseline_predictions("random", listener, listener, num_samples=6, seed=0)
    assert pred.shape == (8, 6, 300, 25) and pred.dtype == np.float32
    assert pred.min() >= 0.0 and pred.max() < 1.0
    # E|U - U'|^2 = 1/6 and Var U = 1/12 for U ~ uniform[0, 1); 360k values each: < 1% noise.
    assert metrics.frdiv(pred) == pytest.approx(1 / 6, rel=0.01)
    assert metrics.frdvs(pred) == pytest.approx(1 / 6, rel=0.01)
    assert metrics.frvar(pred) == pytest.approx(1 / 12, rel=0.01)
    again = metrics.baseline_predictions("random", listener, listener, num_samples=6, seed=0)
    assert np.array_equal(pred, again)


def test_gt_baseline_has_zero_distance_and_zero_diversity(bidirectional):
    listener, speaker, neighbours = bidirectional
    gt = metrics.baseline_predictions("gt", listener, speaker, num_samples=10)
    assert gt.shape == (8, 10, 80, 25) and not gt.flags.writeable
    assert metrics.frdist(gt, listener, neighbours) == 0.0
    assert metrics.frdiv(gt) == 0.0


def test_mime_has_gt_frvar_and_frdvs_on_bidirectional_items(bidirectional):
    listener, speaker, neighbours = bidirectional
    gt = metrics.baseline_predictions("gt", listener, speaker, num_samples=10)
    mime = metrics.baseline_predictions("mime", listener, speaker, num_samples=10)
    # The same set of sequences in another item order.
    assert metrics.frvar(mime) == pytest.approx(metrics.frvar(gt), rel=1e-12)
    assert metrics.frdvs(mime) == pytest.approx(metrics.frdvs(gt), rel=1e-12)
    assert metrics.frdiv(mime) == 0.0
    # Copying the speaker is the mirrored item's real listener, itself an appropriate neighbour.
    assert metrics.frdist(mime, listener, neighbours) == 0.0


def test_broadcast_baselines_score_like_materialised_copies(bidirectional):
    listener, speaker, neighbours = bidirectional
    mean = metrics.baseline_predictions("mean", listener, speaker, num_samples=3)
    copy = np.array(mean)
    assert metrics.frdist(mean, listener, neighbours) == metrics.frdist(copy, listener, neighbours)
    assert metrics.frcorr(mean, listener, neighbours) == metrics.frcorr(copy, listener, neighbours)
    # A frame repeated over time: zero temporal variance, and every channel constant -> FRSyn 49.
    assert metrics.frvar(mean) == 0.0
    assert metrics.frsyn(mean, speaker) == 49.0
    np.testing.assert_allclose(mean[0, 0, 0], listener.mean(axis=(0, 1)), rtol=1e-6)


def test_mean_baseline_accepts_a_training_mean_frame_or_sequence(bidirectional):
    listener, speaker, _ = bidirectional
    frame = np.linspace(0, 1, 25, dtype=np.float32)
    assert np.all(metrics.baseline_predictions("mean", listener, speaker, 2, train_mean=frame)[3, 1, 40] == frame)
    sequence = np.random.default_rng(0).random((80, 25)).astype(np.float32)
    out = metrics.baseline_predictions("Mean", listener, speaker, 2, train_mean=sequence)
    assert np.array_equal(out[5, 0], sequence)
    with pytest.raises(ValueError):
        metrics.baseline_predictions("mean", listener, speaker, 2, train_mean=np.zeros(24))
    with pytest.raises(ValueError):
        metrics.baseline_predictions("oracle", listener, speaker)
