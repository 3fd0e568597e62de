"""REACT 2023/2024 facial-reaction metrics, numerically those of the official challenge code.

The official evaluation (``metric/{FRC,FRD,S_MSE,FRVar,FRDvs,TLCC}.py`` of
reactmultimodalchallenge/baseline_react2023, byte-identical in the 2024 repo) loops over items,
samples and neighbours in Python and calls ``np.corrcoef`` / ``tslearn.metrics.dtw`` once per
pair. Here the same quantities are computed in bulk (moments and matrix products for FRCorr,
batched exact DTW for FRDist, closed-form pair sums for FRDiv/FRDvs, a numba kernel for
FRSyn), with the official quirks reproduced on purpose (see each function, and the project's
metrics reference, shared/reference/metrics.md §2-7 and the checklist in §12).

Shapes (numpy arrays or torch tensors; cast to float32 as the official tensors are):

* ``pred``       [N, K, T, 25]  K generated listener reactions per item (K = 10 officially),
* ``listener``   [N, T, 25]     each item's real listener reaction,
* ``speaker``    [N, T, 25]     each item's real speaker behaviour,
* ``neighbours`` [N, N]         appropriateness matrix: ``neighbours[k, j] == 1`` means listener
  j's real reaction is also an appropriate reaction for item k (diagonal included). Items must be
  in the official order (csv order, then mirrored), the order the matrix was built in.

Listener/speaker clips longer than the predictions are cut to the first T frames (the official
``evaluate.py`` slices ``[:, :750]``). The 25-d frame: 15 action units, valence, arousal,
8 expression probabilities.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch
from numba import njit, prange

from reactdiff.dtw import AU_END, NUM_DIMS, REACT_WEIGHTS, closest_pairs, dtw_pairs_torch, numba_threads

METRIC_NAMES = ("FRCorr", "FRDist", "FRDiv", "FRVar", "FRDvs", "FRSyn")

# FRDist = (1/15) DTW(AUs) + 1 DTW(valence, arousal) + (1/8) DTW(expressions), official FRD.py.
# The weights are kept as the official Python literals (1 is an int there: 1 * d == d exactly).
DTW_WEIGHTS = REACT_WEIGHTS

# FRSyn lags: range(-int(2 s * 25 fps - 1), int(2 s * 25 fps)) = -49..49 (official TLCC.py).
MAX_LAG = 49

CCC_EPS = 1e-8  # official denominator epsilon (ReactFace's 3DMM copy uses 1e-50)
_CHUNK_BYTES = 128 * 2**20  # float64 working-set budget of the chunked reductions


# --------------------------------------------------------------------------------------------
# inputs


def _as_float32(array, name: str, ndim: int) -> np.ndarray:
    if torch.is_tensor(array):
        array = array.detach().cpu().numpy()
    array = np.asarray(array)
    if array.ndim != ndim or array.shape[-1] != NUM_DIMS:
        raise ValueError(f"{name}: expected {ndim} dims ending in {NUM_DIMS}, got shape {array.shape}")
    # copy=False keeps float32 views (e.g. the broadcast baselines) without materialising them.
    return array.astype(np.float32, copy=False)


def _real_sequences(real, name: str, pred: np.ndarray) -> np.ndarray:
    """Real listener/speaker [N, T', 25] aligned to pred [N, K, T, 25]: first T frames."""
    real = _as_float32(real, name, 3)
    n_items, _, frames, _ = pred.shape
    if real.shape[0] != n_items:
        raise ValueError(f"{name} has {real.shape[0]} items, pred has {n_items}")
    if real.shape[1] < frames:
        raise ValueError(f"{name} has {real.shape[1]} frames, pred has {frames}")
    return real[:, :frames]


def _rows(rows, n_items: int) -> np.ndarray:
    rows = np.arange(n_items) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    if rows.size and (rows.min() < 0 or rows.max() >= n_items):
        raise IndexError(f"rows must lie in [0, {n_items})")
    return rows


def _appropriate_neighbours(neighbours, n_items: int, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the indices j with ``neighbours[k, j] == 1`` in ascending order (``np.argwhere``).

    Returns (counts [len(rows)], flat column indices). The official code takes max/min over
    this list, which fails on an empty list; here that is a clear error instead.
    """
    if torch.is_tensor(neighbours):
        neighbours = neighbours.detach().cpu().numpy()
    neighbours = np.asarray(neighbours)
    if neighbours.shape != (n_items, n_items):
        raise ValueError(f"neighbours must be [{n_items}, {n_items}], got {neighbours.shape}")
    appropriate = neighbours[rows] == 1  # exactly the official `matrix == 1` test
    counts = appropriate.sum(axis=1)
    if (counts == 0).any():
        empty = rows[np.flatnonzero(counts == 0)[0]]
        raise ValueError(f"item {empty} has no appropriate neighbour (the official matrix includes the diagonal)")
    return counts, np.nonzero(appropriate)[1]


def _same_as_first_sample(pred: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """[len(rows), K] bool: sample i of the item equals its sample 0 element by element.

    GT, Mime and mean baselines and deterministic models repeat one reaction K times; their
    DTWs are computed once and reused (equal frames give identical DTW values).
    """
    n_samples = pred.shape[1]
    if pred.strides[1] == 0:  # a broadcast view: every sample is the same memory
        return np.ones((rows.size, n_samples), dtype=bool)
    same = np.empty((rows.size, n_samples), dtype=bool)
    step = max(1, _CHUNK_BYTES // max(1, pred[0].nbytes))
    for start in range(0, rows.size, step):
        block = pred[rows[start : start + step]]
        same[start : start + step] = (block == block[:, :1]).reshape(block.shape[0], n_samples, -1).all(axis=2)
    return same


def _sum_over_samples(values: np.ndarray) -> np.ndarray:
    """Sum over the K samples in sample order, as the official ``+=`` accumulation."""
    total = np.zeros(values.shape[0], dtype=np.float64)
    for i in range(values.shape[1]):
        total = total + values[:, i]
    return total


def binarize_action_units(pred) -> np.ndarray:
    """Round the 15 action units (dims 0-14) of every prediction, as the official ``--binarize``."""
    pred = np.array(_as_float32(pred, "pred", 4))  # a writable copy
    pred[..., :AU_END] = np.round(pred[..., :AU_END])  # half to even, like torch.round
    return pred


# --------------------------------------------------------------------------------------------
# appropriateness: FRCorr, FRDist


def frcorr_rows(pred, listener, neighbours, rows: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
    """Per item k in ``rows``: sum_i max_{j: A[k,j]=1} CCC(listener[j], pred[k, i]) (official FRC.py).

    CCC is Lin's concordance per channel, averaged over the 25 channels:

        CCC_d = 2 r_d s_d s^_d / (s_d^2 + s^_d^2 + (m_d - m^_d)^2 + 1e-8)

    with population (ddof 0) variances over time and the Pearson r_d of the official patched
    ``corrcoef``: NaN -> 0 (so a channel constant in either sequence contributes 0, even when
    both are the same constant), clipped to [-1, 1]. Computed for all K samples against all of
    an item's neighbours at once from centred moments: the cross term is one batched matrix
    product per chunk of items. Moments are taken in float64; the official code takes
    mean/var/std in float32 numpy, so values agree to ~1e-6 relative, not bit for bit.
    """
    pred = _as_float32(pred, "pred", 4)
    listener = _real_sequences(listener, "listener", pred)
    n_items, n_samples, frames, channels = pred.shape
    rows = _rows(rows, n_items)
    counts, columns = _appropriate_neighbours(neighbours, n_items, rows)
    starts = np.concatenate([[0], np.cumsum(counts)])

    listener_mean = listener.mean(axis=1, dtype=np.float64)  # [N, 25]
    listener_var = np.empty_like(listener_mean)
    for j in range(0, n_items, 256):
        centred = listener[j : j + 256].astype(np.float64) - listener_mean[j : j + 256, None]
        listener_var[j : j + 256] = np.mean(centred * centred, axis=1)
    listener_sd = np.sqrt(listener_var)

    out = np.empty(rows.size, dtype=np.float64)
    item_bytes = frames * channels * 8
    step = max(1, _CHUNK_BYTES // (item_bytes * (n_samples + int(counts.max()))))
    for start in range(0, rows.size, step):
        chunk = np.arange(start, min(start + step, rows.size))
        width = int(counts[chunk].max())
        # Neighbour table padded to the widest row of the chunk; padding is masked to -inf.
        slot = np.arange(width)
        valid = slot[None, :] < counts[chunk, None]
        table = columns[np.minimum(starts[chunk, None] + slot[None, :], starts[chunk + 1, None] - 1)]

        # Channel-major float64 copies, [r, 25, K, T] and [r, 25, n, T]: the cross moments are
        # then one BLAS matrix product per (item, channel), all samples x all neighbours.
        p = np.ascontiguousarray(pred[rows[chunk]].transpose(0, 3, 1, 2), dtype=np.float64)
        p_mean = p.mean(axis=3)
        p -= p_mean[..., None]
        p_var = np.mean(p * p, axis=3)
        g = np.ascontiguousarray(listener[table].transpose(0, 3, 1, 2), dtype=np.float64)
        # sum_t p_c g = sum_t p_c g_c since p_c sums to 0, so g needs no centring.
        cov = np.matmul(p, g.swapaxes(2, 3)) / frames  # [r, 25, K, n]
        del p, g

        p_sd = np.sqrt(p_var)[..., None]  # [r, 25, K, 1]
        p_var, p_mean = p_var[..., None], p_mean[..., None]
        g_mean, g_var, g_sd = (
            stat[table].transpose(0, 2, 1)[:, :, None, :] for stat in (listener_mean, listener_var, listener_sd)
        )  # [r, 25, 1, n]
        sd_product = p_sd * g_sd
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(sd_product > 0, cov / sd_product, 0.0)  # constant channel: NaN -> 0
        r = np.clip(r, -1.0, 1.0)
        numerator = 2 * r * g_sd * p_sd
        denominator = g_var + p_var + (g_mean - p_mean) ** 2
        ccc = np.mean(numerator / (denominator + CCC_EPS), axis=1)  # mean over channels: [r, K, n]
        best = np.where(valid[:, None, :], ccc, -np.inf).max(axis=2)
        out[chunk] = _sum_over_samples(best)
    return out


def frcorr(pred, listener, neighbours) -> float:
    """FRCorr (↑) = (1/N) sum_k sum_i max_{j appropriate} CCC(listener[j], pred[k, i]).

    A sum over the K samples, not a mean (range [-K, K]), as the official ``compute_FRC_mp``.
    """
    return float(np.mean(frcorr_rows(pred, listener, neighbours)))


def frdist_rows(
    pred,
    listener,
    neighbours,
    rows: Sequence[int] | np.ndarray | None = None,
    *,
    num_threads: int | None = None,
    device: str | torch.device | None = None,
) -> np.ndarray:
    """Per item k in ``rows``: sum_i min_{j: A[k,j]=1} D(pred[k, i], listener[j]) (official FRD.py).

    D(x, y) = (1/15) DTW(x[:, 0:15], y[:, 0:15]) + DTW(x[:, 15:17], y[:, 15:17])
              + (1/8) DTW(x[:, 17:25], y[:, 17:25]),

    DTW with ``tslearn.metrics.dtw`` semantics on float32 inputs (``reactdiff.dtw``). Only the
    (item, sample, neighbour) pairs present in the matrix are computed, samples identical to an
    item's sample 0 reuse its values, and on CPU a pair is abandoned once it provably cannot be
    the minimum (``reactdiff.dtw.closest_pairs``; the value is unchanged, bit for bit). ``device`` None: numba on CPU (``num_threads`` caps its
    threads); otherwise the torch wavefront on that device. For distributed evaluation split the
    rows across tasks: FRDist is the mean of the concatenated per-row values, bit for bit.
    """
    pred = _as_float32(pred, "pred", 4)
    listener = _real_sequences(listener, "listener", pred)
    n_items, n_samples, frames, _ = pred.shape
    rows = _rows(rows, n_items)
    counts, columns = _appropriate_neighbours(neighbours, n_items, rows)

    # The (row, sample) combinations to compute, each against all of its row's neighbours.
    same = _same_as_first_sample(pred, rows)
    computed = ~same
    computed[:, 0] = True
    row_pos, sample = np.nonzero(computed)  # row-major: samples of a row are consecutive
    starts = np.concatenate([[0], np.cumsum(counts)])
    per_combo = counts[row_pos]
    combo = np.repeat(np.arange(row_pos.size), per_combo)
    offset = np.arange(combo.size) - np.repeat(np.cumsum(per_combo) - per_combo, per_combo)
    listener_index = columns[starts[row_pos][combo] + offset]

    if pred.flags.c_contiguous:
        samples = pred.reshape(n_items * n_samples, frames, NUM_DIMS)
        sample_index = (rows[row_pos] * n_samples + sample)[combo]
    else:  # e.g. a broadcast baseline: gather only the samples that are computed
        samples = np.ascontiguousarray(pred[rows[row_pos], sample])
        sample_index = combo
    combo_starts = np.cumsum(per_combo) - per_combo
    if device is None:  # the minimum directly, pruning pairs that cannot be it (exact)
        closest = closest_pairs(samples, listener, sample_index[combo_starts], listener_index,
                                np.append(combo_starts, combo.size), num_threads=num_threads)
    else:
        groups = dtw_pairs_torch(samples, listener, sample_index, listener_index, device=device)
        # Official accumulation: res = 0; res += w * dtw(...) for the groups in order.
        distance = 0
        for g, weight in enumerate(DTW_WEIGHTS):
            distance = distance + weight * groups[:, g]
        closest = np.minimum.reduceat(distance, combo_starts)

    best = np.empty((rows.size, n_samples), dtype=np.float64)
    best[row_pos, sample] = closest
    repeat = np.nonzero(~computed)
    best[repeat] = best[repeat[0], 0]
    return _sum_over_samples(best)


def frdist(pred, listener, neighbours, *, num_threads: int | None = None, device=None) -> float:
    """FRDist (↓) = (1/N) sum_k sum_i min_{j appropriate} D(pred[k, i], listener[j]).

    A sum over the K samples (official ``compute_FRD_mp``); see ``frdist_rows`` for D.
    """
    return float(np.mean(frdist_rows(pred, listener, neighbours, num_threads=num_threads, device=device)))


# --------------------------------------------------------------------------------------------
# diversity: FRDiv, FRVar, FRDvs


def frdiv(pred) -> float:
    """FRDiv (↑, official S-MSE) = mean_k sum_{i != i'} ||P[k,i] - P[k,i']||^2 / (K (K-1) T 25).

    The ordered-pair sum is taken in closed form, sum_{i,i'} ||P_i - P_i'||^2 =
    2 K sum_i ||P_i - mean_i P_i||^2 (float64). With one sample the official code returns 0.
    """
    pred = _as_float32(pred, "pred", 4)
    n_items, n_samples = pred.shape[:2]
    if n_samples < 2:
        return 0.0
    elements = pred[0, 0].size
    total = 0.0
    step = max(1, _CHUNK_BYTES // (pred[0].size * 8))
    for start in range(0, n_items, step):
        p = pred[start : start + step].astype(np.float64)
        p -= p.mean(axis=1, keepdims=True)
        total += float(np.sum(p * p))
    return 2 * n_samples * total / (n_samples * (n_samples - 1) * elements) / n_items


def frvar(pred) -> float:
    """FRVar (↑) = mean over (k, i, d) of the unbiased variance over time of P[k, i, :, d]."""
    pred = _as_float32(pred, "pred", 4)
    n_items, n_samples, frames, channels = pred.shape
    total = 0.0
    step = max(1, _CHUNK_BYTES // (pred[0].size * 8))
    for start in range(0, n_items, step):
        total += float(np.sum(np.var(pred[start : start + step], axis=2, ddof=1, dtype=np.float64)))
    return total / (n_items * n_samples * channels)


def frdvs(pred) -> float:
    """FRDvs (↑) = sum_i sum_{k != l} ||P[k,i] - P[l,i]||^2 / (N (N-1) K T 25).

    Only equal sample indices i are compared across items (official ``compute_FRDvs``). The
    official code builds a [K, N, N] ``torch.cdist`` (~1.2 GB for N = 1600); here the pair sum is
    2 N sum_k ||P[k,i] - mean_k P[k,i]||^2, accumulated in float64 over chunks of items (two
    passes, O(K T 25) extra memory). N = 1 gives NaN, as the official 0/0.
    """
    pred = _as_float32(pred, "pred", 4)
    n_items, n_samples, frames, channels = pred.shape
    if n_items < 2:
        return float("nan")
    step = max(1, _CHUNK_BYTES // (pred[0].size * 8))
    mean = np.zeros(pred.shape[1:], dtype=np.float64)
    for start in range(0, n_items, step):
        mean += pred[start : start + step].sum(axis=0, dtype=np.float64)
    mean /= n_items
    total = 0.0
    for start in range(0, n_items, step):
        p = pred[start : start + step] - mean
        total += float(np.sum(p * p))
    return 2 * n_items * total / (n_items * (n_items - 1) * n_samples * frames * channels)


# --------------------------------------------------------------------------------------------
# synchrony: FRSyn


@njit(parallel=True, cache=True, error_model="numpy")
def _lagged_channel_pearson(x, speaker, speaker_index, max_lag, out):
    """out[m, lag + max_lag, d] = Pearson r of channel d of x[m] and speaker[speaker_index[m]],
    shifted by lag as the official ``shift``: lag > 0 pairs x[t + lag] with s[t], lag < 0 pairs
    x[t] with s[t - lag]. Same operations as ``np.corrcoef`` (two-pass float64 covariance,
    r = (cov / sd_x) / sd_y, clip to [-1, 1]); a window constant in either series has zero
    variance exactly (the float64 mean of equal float32 values is exact), giving NaN like numpy.
    """
    frames = x.shape[1]
    channels = x.shape[2]
    for m in prange(x.shape[0]):
        xs = x[m]
        ss = speaker[speaker_index[m]]
        mean_x = np.empty(channels)
        mean_s = np.empty(channels)
        sxx = np.empty(channels)
        sss = np.empty(channels)
        sxs = np.empty(channels)
        for lag_index in range(2 * max_lag + 1):
            lag = lag_index - max_lag
            x0 = max(lag, 0)
            s0 = max(-lag, 0)
            width = frames - abs(lag)
            mean_x[:] = 0.0
            mean_s[:] = 0.0
            for t in range(width):
                for d in range(channels):
                    mean_x[d] += xs[x0 + t, d]
                    mean_s[d] += ss[s0 + t, d]
            for d in range(channels):
                mean_x[d] /= width
                mean_s[d] /= width
            sxx[:] = 0.0
            sss[:] = 0.0
            sxs[:] = 0.0
            for t in range(width):
                for d in range(channels):
                    dx = xs[x0 + t, d] - mean_x[d]
                    ds = ss[s0 + t, d] - mean_s[d]
                    sxx[d] += dx * dx
                    sss[d] += ds * ds
                    sxs[d] += dx * ds
            scale = 1.0 / (width - 1)  # np.cov multiplies by 1 / (n - ddof)
            for d in range(channels):
                r = (sxs[d] * scale) / math.sqrt(sxx[d] * scale) / math.sqrt(sss[d] * scale)
                if r > 1.0:
                    r = 1.0
                elif r < -1.0:
                    r = -1.0
                out[m, lag_index, d] = r  # the official list of Python floats -> float32 tensor


def frsyn(pred, speaker, *, all_samples: bool = False, num_threads: int | None = None) -> float:
    """FRSyn (↓, official TLCC) = mean over items of |49 - argmax_lag r(lag)|, in frames.

    r(lag) is the mean over the 25 channels (float32, ``torch.mean``) of the Pearson correlation
    between the prediction and the item's *speaker*, for lags -49..49 (see
    ``_lagged_channel_pearson`` for the shift convention, taken from the official ``shift``).
    Quirks kept: only sample 0 is scored (the official ``compute_TLCC_mp`` returns inside its
    sample loop; ``all_samples=True`` gives the serial ``compute_TLCC``, mean over all N K);
    a constant channel in a window makes r NaN, and ``torch.argmax`` on CPU returns the first
    NaN, so a channel constant over the whole clip yields |offset| = 49.
    """
    pred = _as_float32(pred, "pred", 4)
    speaker = _real_sequences(speaker, "speaker", pred)
    n_items, n_samples, frames, channels = pred.shape
    if frames < MAX_LAG + 3:
        raise ValueError(f"FRSyn needs more than {MAX_LAG + 2} frames, got {frames}")
    if all_samples:
        x = np.ascontiguousarray(pred).reshape(n_items * n_samples, frames, channels)
        speaker_index = np.repeat(np.arange(n_items), n_samples)
    else:
        x = np.ascontiguousarray(pred[:, 0])
        speaker_index = np.arange(n_items)
    r = np.empty((x.shape[0], 2 * MAX_LAG + 1, channels), dtype=np.float32)
    with numba_threads(num_threads):
        _lagged_channel_pearson(x, np.ascontiguousarray(speaker), speaker_index, MAX_LAG, r)
    lag_mean = torch.from_numpy(r).mean(dim=2)
    best = torch.argmax(lag_mean, dim=1)  # CPU: the first NaN wins, as in the official run
    offsets = (MAX_LAG - best).abs().to(torch.float32)
    return torch.mean(offsets).item()


# --------------------------------------------------------------------------------------------
# all metrics


def compute_all(
    pred,
    listener,
    speaker,
    neighbours,
    binarize: bool = False,
    *,
    timings: dict[str, float] | None = None,
    dtw_device: str | torch.device | None = None,
    num_threads: int | None = None,
) -> dict[str, float]:
    """The six official REACT metrics: {FRCorr, FRDist, FRDiv, FRVar, FRDvs, FRSyn}.

    ``binarize``: round the action units of the predictions first (official ``--binarize``).
    ``timings``: if a dict is given, it receives the seconds spent per metric.
    ``dtw_device``: None for the numba CPU DTW, else a torch device for the wavefront DTW.
    """
    pred = binarize_action_units(pred) if binarize else _as_float32(pred, "pred", 4)
    metrics = {
        "FRCorr": lambda: frcorr(pred, listener, neighbours),
        "FRDist": lambda: frdist(pred, listener, neighbours, num_threads=num_threads, device=dtw_device),
        "FRDiv": lambda: frdiv(pred),
        "FRVar": lambda: frvar(pred),
        "FRDvs": lambda: frdvs(pred),
        "FRSyn": lambda: frsyn(pred, speaker, num_threads=num_threads),
    }
    results = {}
    for name, metric in metrics.items():
        start = time.perf_counter()
        results[name] = metric()
        if timings is not None:
            timings[name] = time.perf_counter() - start
    return results


# --------------------------------------------------------------------------------------------
# baselines (official run_baselines.py)

BASELINES = ("gt", "mime", "random", "mean")


def baseline_predictions(
    kind: str,
    listener,
    speaker,
    num_samples: int = 10,
    seed: int = 0,
    train_mean=None,
) -> np.ndarray:
    """Reference "reactions" [N, K, T, 25] float32 for the baseline rows of the results table.

    * ``gt``: each item's own real listener reaction, K times (the oracle; FRDist = FRDiv = 0),
    * ``mime``: the item's speaker behaviour, K times (on the bidirectional item set it has
      exactly GT's FRVar and FRDvs),
    * ``random``: i.i.d. uniform [0, 1) per element, like ``torch.rand`` (FRDiv = FRDvs ~ 1/6,
      FRVar ~ 1/12),
    * ``mean``: ``train_mean`` repeated over samples (and time, if it is one frame [25];
      [T, 25] is the official "MeanSeq"); without it, the mean listener frame of the given items.
      The official mean is over training speakers and listeners.

    gt, mime and mean are read-only broadcast views (no K-fold copy); ``np.array`` copies them.
    """
    kind = kind.lower()
    listener = _as_float32(listener, "listener", 3)
    speaker = _as_float32(speaker, "speaker", 3)
    n_items, frames, channels = listener.shape
    if speaker.shape[0] != n_items or speaker.shape[1] < frames:
        raise ValueError(f"speaker {speaker.shape} does not match listener {listener.shape}")
    shape = (n_items, num_samples, frames, channels)
    if kind == "gt":
        return np.broadcast_to(listener[:, None], shape)
    if kind == "mime":
        return np.broadcast_to(speaker[:, None, :frames], shape)
    if kind == "random":
        return np.random.default_rng(seed).random(shape, dtype=np.float32)
    if kind == "mean":
        if train_mean is None:
            mean = listener.mean(axis=(0, 1), dtype=np.float64).astype(np.float32)
        else:
            mean = np.asarray(train_mean.detach().cpu() if torch.is_tensor(train_mean) else train_mean, dtype=np.float32)
            if mean.shape not in ((channels,), (frames, channels)):
                raise ValueError(f"train_mean must be [{channels}] or [{frames}, {channels}], got {mean.shape}")
        return np.broadcast_to(mean, shape)
    raise ValueError(f"unknown baseline {kind!r}; expected one of {BASELINES}")
