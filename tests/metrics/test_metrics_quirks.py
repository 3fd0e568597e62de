"""Hand-checkable cases for each official quirk the metrics reproduce on purpose."""

from __future__ import annotations

import numpy as np
import pytest

from reactdiff import metrics


def _smooth_clips(n: int, t: int, seed: int = 0) -> np.ndarray:
    """[n, t, 25] clips in which every channel varies (no constant channel)."""
    rng = np.random.default_rng(seed)
    return (rng.random((n, t, 25)) * 0.8 + 0.1).astype(np.float32)


def test_identical_sequences_have_ccc_one_and_distance_zero():
    listener = _smooth_clips(3, 60)
    pred = listener[:, None]  # K = 1
    eye = np.eye(3, dtype=np.uint8)
    # 2 s^2 / (2 s^2 + 1e-8) per channel: 1 up to the epsilon.
    assert metrics.frcorr(pred, listener, eye) == pytest.approx(1.0, abs=1e-6)
    assert metrics.frdist(pred, listener, eye) == 0.0


def test_constant_channel_has_ccc_zero_even_when_identical():
    listener = _smooth_clips(2, 60)
    listener[:, :, :5] = 0.0  # five action units that never fire, identical in pred and listener
    pred = listener[:, None]
    # NaN Pearson -> 0, so those channels contribute 0: the mean over 25 channels is 20/25.
    assert metrics.frcorr(pred, listener, np.eye(2)) == pytest.approx(20 / 25, abs=1e-6)


def test_frcorr_and_frdist_sum_over_samples():
    listener = _smooth_clips(4, 60)
    rng = np.random.default_rng(1)
    pred_one = (listener + rng.normal(0, 0.05, listener.shape)).astype(np.float32)[:, None]
    neighbours = np.eye(4) + np.eye(4, k=1)
    single = metrics.frcorr(pred_one, listener, neighbours)
    ten = np.repeat(pred_one, 10, axis=1)
    # Each of the 10 samples adds its own max CCC: 10 x the single-sample value, not the mean.
    assert metrics.frcorr(ten, listener, neighbours) == pytest.approx(10 * single, rel=1e-12)
    assert metrics.frdist(ten, listener, neighbours) == pytest.approx(10 * metrics.frdist(pred_one, listener, neighbours), rel=1e-12)


def test_gt_as_prediction_scores_ten_times_its_per_sample_correlation():
    listener = _smooth_clips(3, 60)
    listener[0, :, 7] = 1.0
    gt = metrics.baseline_predictions("gt", listener, listener, num_samples=10)
    per_sample = metrics.frcorr(gt[:, :1], listener, np.eye(3))
    assert metrics.frcorr(gt, listener, np.eye(3)) == pytest.approx(10 * per_sample, rel=1e-12)
    assert per_sample < 1.0  # the constant channel costs GT its perfect score


def test_frdist_takes_the_closest_appropriate_reaction():
    listener = _smooth_clips(3, 40)
    pred = np.repeat(np.stack([listener[1], listener[2]])[None], 3, axis=0)  # predicts listeners 1, 2
    neighbours = np.array([[1, 1, 1], [0, 1, 0], [0, 0, 1]])
    per_row = metrics.frdist_rows(pred, listener, neighbours, rows=[0])
    assert per_row.tolist() == [0.0]  # each sample matches one appropriate reaction exactly


def test_constant_speaker_channel_gives_frsyn_49():
    rng = np.random.default_rng(2)
    speaker = rng.random((2, 120, 25)).astype(np.float32)
    pred = rng.random((2, 3, 120, 25)).astype(np.float32)
    speaker[:, :, 9] = 0.0  # every lag has a NaN channel -> argmax returns lag index 0
    assert metrics.frsyn(pred, speaker) == 49.0


def test_frsyn_argmax_returns_the_first_nan_lag():
    rng = np.random.default_rng(3)
    t = 120
    speaker = rng.random((1, t, 25)).astype(np.float32)
    pred = rng.random((1, 1, t, 25)).astype(np.float32)
    # A prediction channel that varies only in its first 3 frames: for lags >= 3 the shifted
    # window x[lag:] is constant, so r is NaN from lag +3 on. The first NaN is lag index 52,
    # whatever the real correlations are: offset |49 - 52| = 3.
    pred[0, 0, 3:, 11] = 0.5
    assert metrics.frsyn(pred, speaker) == 3.0
    # Mirror case on the speaker side: speaker varies only in its first 3 frames -> for
    # lags <= -3 the window s[-lag:] is constant -> the first NaN is lag -49 -> offset 49.
    speaker2 = speaker.copy()
    pred2 = rng.random((1, 1, t, 25)).astype(np.float32)
    speaker2[0, 3:, 11] = 0.5
    assert metrics.frsyn(pred2, speaker2) == 49.0


def test_frsyn_finds_a_known_lag():
    rng = np.random.default_rng(4)
    t, lag = 200, 7
    speaker = rng.normal(size=(1, t, 25)).astype(np.float32)
    pred = rng.normal(size=(1, 1, t, 25)).astype(np.float32)
    pred[0, 0, lag:] = speaker[0, :-lag]  # the listener copies the speaker 7 frames later
    # The official shift pairs x[t + lag] with s[t] for lag > 0: r = 1 at lag +7 (index 56),
    # reported as |49 - 56| = 7 frames.
    assert metrics.frsyn(pred, speaker) == float(lag)


def test_binarize_rounds_only_action_units_half_to_even():
    pred = np.full((1, 1, 60, 25), 0.5, dtype=np.float32)
    pred[..., 0] = 0.51
    pred[..., 1] = 1.5
    out = metrics.binarize_action_units(pred)
    assert out[0, 0, 0, 0] == 1.0 and out[0, 0, 0, 1] == 2.0 and out[0, 0, 0, 2] == 0.0
    assert np.all(out[..., 15:] == 0.5) and np.all(pred[..., 2] == 0.5)  # input untouched
