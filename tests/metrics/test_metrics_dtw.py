"""reactdiff.dtw: hand-computed cases, bitwise agreement with tslearn, torch wavefront == numba."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tslearn.metrics import dtw as tslearn_dtw

from reactdiff import dtw as dtw_module
from reactdiff.dtw import REACT_GROUPS, closest_pairs, combine3, dtw_pairs, dtw_pairs_torch, dtw_torch


def _embed(sequence, dim: int) -> np.ndarray:
    """A 1-d sequence placed in one dimension of otherwise-zero 25-d frames."""
    frames = np.zeros((len(sequence), 25), dtype=np.float32)
    frames[:, dim] = sequence
    return frames


@pytest.mark.parametrize(
    ("x", "y", "expected"),
    [
        ([1, 2, 3], [1, 2, 2, 3], 0.0),  # a repeated frame is absorbed by the warping
        ([1, 2, 3], [1, 2, 2, 3, 4], 1.0),  # the extra 4 matches 3 at cost 1
        ([0, 0, 0], [1, 1], np.sqrt(3.0)),  # every x frame pays 1: path length 3
        ([0, 3], [1, 2, 4], np.sqrt(1 + 1 + 1)),  # (0,1) (3,2) (3,4): 1 + 1 + 1
    ],
)
def test_small_dtw_by_hand(x, y, expected):
    # Valence (dim 15) is in group 1; the other two groups see only zeros.
    out = dtw_pairs(_embed(x, 15)[None], _embed(y, 15)[None], [0], [0])
    np.testing.assert_allclose(out[0], [0.0, expected, 0.0], rtol=0, atol=1e-12)
    as_batch = lambda seq: torch.tensor(seq, dtype=torch.float32)[None, :, None]  # noqa: E731
    by_torch = dtw_torch(as_batch(x), as_batch(y), None)
    assert by_torch.shape == (1, 1)
    assert by_torch.item() == pytest.approx(expected, abs=1e-12)


def test_multivariate_cost_is_squared_euclidean_over_the_group():
    # Two AU dims differ by 3 and 4 at every frame: local cost 25 per frame, 4 frames -> sqrt(100).
    x = np.zeros((4, 25), dtype=np.float32)
    y = np.zeros((4, 25), dtype=np.float32)
    y[:, 0], y[:, 14] = 3.0, 4.0
    assert dtw_pairs(x[None], y[None], [0], [0])[0].tolist() == [10.0, 0.0, 0.0]


def test_identical_sequences_are_exactly_zero():
    x = np.random.default_rng(0).random((3, 50, 25)).astype(np.float32)
    assert np.all(dtw_pairs(x, x, [0, 1, 2], [0, 1, 2]) == 0.0)


def test_bitwise_equal_to_tslearn_on_unequal_lengths_and_constant_channels():
    rng = np.random.default_rng(1)
    x = rng.random((5, 37, 25)).astype(np.float32)
    y = rng.random((4, 29, 25)).astype(np.float32)
    x[:, :, :15] = x[:, :, :15] > 0.6  # binary action units
    x[1, :, 5] = 0.0  # constant channels
    y[2, :, 20] = 0.3
    x_index, y_index = np.array([0, 1, 2, 3, 4, 1]), np.array([0, 1, 2, 3, 2, 2])
    ours = dtw_pairs(x, y, x_index, y_index)
    reference = np.array(
        [[tslearn_dtw(x[a][:, s:e], y[b][:, s:e]) for s, e in REACT_GROUPS] for a, b in zip(x_index, y_index)]
    )
    np.testing.assert_array_equal(ours, reference)  # same operations in the same order


def test_float64_inputs_are_rounded_to_float32_like_the_official_astype():
    rng = np.random.default_rng(2)
    x, y = rng.random((1, 20, 25)), rng.random((1, 23, 25))
    expected = [tslearn_dtw(x[0].astype(np.float32)[:, s:e], y[0].astype(np.float32)[:, s:e]) for s, e in REACT_GROUPS]
    np.testing.assert_array_equal(dtw_pairs(x, y, [0], [0])[0], expected)


def test_torch_wavefront_equals_numba():
    rng = np.random.default_rng(3)
    x = rng.random((6, 41, 25)).astype(np.float32)
    y = rng.random((6, 33, 25)).astype(np.float32)
    x[2, :, 17:] = 0.125
    pairs = (np.array([0, 1, 2, 3, 4, 5, 0]), np.array([5, 4, 3, 2, 1, 0, 0]))
    expected = dtw_pairs(x, y, *pairs)
    np.testing.assert_allclose(dtw_pairs_torch(x, y, *pairs, device="cpu", batch_size=4), expected, rtol=1e-13, atol=0)
    batch = dtw_torch(torch.from_numpy(x[pairs[0]]), torch.from_numpy(y[pairs[1]]))
    assert batch.dtype == torch.float64 and batch.shape == (7, 3)
    np.testing.assert_allclose(batch.numpy(), expected, rtol=1e-13, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_torch_wavefront_on_gpu_equals_numba():
    rng = np.random.default_rng(4)
    x, y = rng.random((8, 60, 25)).astype(np.float32), rng.random((8, 60, 25)).astype(np.float32)
    pairs = (np.arange(8), np.arange(8)[::-1].copy())
    np.testing.assert_allclose(dtw_pairs_torch(x, y, *pairs, device="cuda"), dtw_pairs(x, y, *pairs), rtol=1e-12)


def _smooth(rng, n, frames):
    """[n, frames, 25] float32 random walks: the slowly varying signals real reactions are."""
    return np.cumsum(rng.normal(0, 0.05, (n, frames, 25)), axis=1).astype(np.float32)


@pytest.mark.parametrize(("t1", "t2"), [(60, 60), (47, 83), (120, 31), (3, 100), (16, 1)])
def test_group_lower_bounds_never_exceed_the_dtw(t1, t2):
    """``_group_lower_bound`` (block envelopes + a DP over row blocks) is what lets FRDist skip a
    neighbour's sweeps: it must stay <= the exact group DTW, lengths not multiples of a block,
    fewer rows than blocks, constant channels and identical frames included."""
    rng = np.random.default_rng(t1 * 1000 + t2)
    x, y = _smooth(rng, 4, t1), _smooth(rng, 4, t2)
    x[1], y[1, :, 3] = 0.0, 0.25              # constant channels
    y[2, : min(t1, t2)] = x[2, : min(t1, t2)]  # a shared stretch of frames
    exact = dtw_pairs(x, y, range(4), range(4))
    ratios = []
    for p in range(4):
        xT, yR = np.empty((25, t1)), np.empty((25, t2))
        dtw_module._load_x(x[p], xT)
        dtw_module._load_y(y[p], yR)
        scratch = dtw_module._bound_scratch(t1, t2)
        for g, (a, b) in enumerate(REACT_GROUPS):
            bound = dtw_module._group_lower_bound(xT, yR, a, b, t1, t2, scratch)
            assert 0.0 <= bound <= exact[p, g], (p, g, bound, exact[p, g])
            if exact[p, g] > 0:
                ratios.append(bound / exact[p, g])
    assert np.mean(ratios) > 0.2, ratios   # and it bounds something: the pruning depends on it


def test_closest_pairs_is_the_exact_minimum_among_close_competitors():
    """Neighbours a little noisier than each other (close D values, the case where bounds and
    abandoning must not cut the minimum), far ones and an exact copy: the minimum over them is
    the full computation's, bit for bit."""
    rng = np.random.default_rng(3)
    frames, n_x = 90, 6
    x = _smooth(rng, n_x, frames)
    y, x_index, y_index, starts = [], [], [], [0]
    for c in range(n_x):
        for scale in rng.permutation([0.02, 0.021, 0.022, 0.03, 0.3, 1.0])[: 2 + c % 5]:
            y_index.append(len(y))
            y.append(x[c] + rng.normal(0, scale, x[c].shape).astype(np.float32))
        if c == 2:   # an identical neighbour: D = 0 exactly
            y_index.append(len(y))
            y.append(x[c].copy())
        x_index.append(c)
        starts.append(len(y_index))
    y = np.stack(y)
    full = dtw_pairs(x, y, np.repeat(x_index, np.diff(starts)), y_index)
    d = np.array([combine3(*row) for row in full])
    expected = [d[a:b].min() for a, b in zip(starts[:-1], starts[1:])]
    got = closest_pairs(x, y, x_index, y_index, starts)
    assert got.tolist() == expected and got[2] == 0.0
    assert closest_pairs(x, y, x_index, y_index, starts, num_threads=1).tolist() == expected


def test_input_validation():
    x = np.zeros((2, 5, 25), dtype=np.float32)
    with pytest.raises(ValueError):
        dtw_pairs(np.zeros((2, 5, 24)), x, [0], [0])
    with pytest.raises(IndexError):
        dtw_pairs(x, x, [2], [0])
    with pytest.raises(ValueError):
        dtw_pairs(x, x, [0, 1], [0])
    assert dtw_pairs(x, x, [], []).shape == (0, 3)


def test_parallel_kernels_leave_torch_its_thread_count(tmp_path):
    """numba's OpenMP layer and torch share one OpenMP runtime: a parallel numba call set
    torch's intra-op threads to the core count, so a Ray Train worker that Ray gave one thread
    (OMP_NUM_THREADS=1) trained with every core after scoring FRDist/FRSyn in its validation."""
    import os
    import subprocess
    import sys

    script = tmp_path / "probe.py"
    script.write_text(
        "import numpy as np, torch\n"
        "from reactdiff import metrics\n"
        "rng = np.random.default_rng(0)\n"
        "pred = rng.random((3, 2, 60, 25), dtype=np.float32)\n"
        "real = rng.random((3, 60, 25), dtype=np.float32)\n"
        "before = torch.get_num_threads()\n"
        "metrics.frdist(pred, real, np.eye(3, dtype=bool))\n"
        "metrics.frsyn(pred, real)\n"
        "print('THREADS', before, torch.get_num_threads())\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("THREADS")]
    assert line, proc.stderr[-2000:]
    assert line[0].split()[1:] == ["1", "1"], line
