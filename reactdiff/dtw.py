"""Exact dynamic time warping for FRDist, batched over many sequence pairs.

The official REACT FRDist calls ``tslearn.metrics.dtw`` once per (item, sample, neighbour,
group): three full 750 x 750 DTWs per pair, each from Python. This module computes the same
numbers for many pairs at once:

* ``dtw_pairs``: a numba kernel on CPU, parallel over pairs (``prange``). Each pair is swept
  along anti-diagonals of the accumulated-cost matrix; the cells of one anti-diagonal are
  independent, so the inner loop is a long, unit-stride loop that LLVM vectorises (AVX-512 /
  AVX2). The three REACT groups are swept one after the other on one copy of the frames held
  in a per-thread scratch buffer.
* ``closest_pairs``: FRDist's min over neighbours directly, with the same DTWs, abandoning
  pairs that provably cannot be the minimum (exact, see ``_dtw_group``).
* ``dtw_torch`` / ``dtw_pairs_torch``: the same anti-diagonal wavefront with torch tensor ops,
  batched over pairs; it runs on any torch device (GPU for large evaluations).

Semantics are those of ``tslearn.metrics.dtw`` without a global constraint (Sakoe & Chiba 1978):

    R[i, j] = ||x_i - y_j||^2 + min(R[i-1, j], R[i, j-1], R[i-1, j-1]),   R[-1, -1] = 0,
    DTW(x, y) = sqrt(R[T1-1, T2-1]),

with the local cost summed dimension by dimension in float64, in dimension order, exactly as
tslearn's ``_njit_accumulated_matrix`` does. The numba kernel performs the same floating-point
operations in the same order, so it reproduces tslearn bit for bit; the torch version sums a
group's dimensions with ``torch.sum`` (different association), agreeing to ~1e-15 relative.
Inputs are expected finite (tslearn would silently drop trailing NaN frames).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import numba
import numpy as np
import torch
from numba import njit, prange, uint64

# The REACT 25-d frame: 15 facial action units, valence and arousal, 8 expression
# probabilities. FRDist runs one DTW per group (official FRD.py).
NUM_DIMS = 25
AU_END = 15  # dims [0, 15): action units
VA_END = 17  # dims [15, 17): valence, arousal; [17, 25): expression probabilities
REACT_GROUPS: tuple[tuple[int, int], ...] = ((0, AU_END), (AU_END, VA_END), (VA_END, NUM_DIMS))

# FRDist weights of the three group DTWs (official FRD.py): 1/15, 1, 1/8.
W_AU = 1 / 15
W_EXPR = 1 / 8
REACT_WEIGHTS = (W_AU, 1, W_EXPR)

_INF = np.inf
_CHECK_EVERY = 16  # anti-diagonals between early-abandoning checks (each costs two band scans)
_BLOCK = 15        # columns per block of the local-cost bounds (``_group_lower_bound``; 10 and 30 measured slower)


@njit(cache=True, nogil=True, error_model="numpy")
def _sweep_antidiagonal(xT, yR, acc, lo, hi, off, q_prev, q_prev2, q_new, group, d_start, d_stop):
    """Cells (i, j = s - i), i in [lo, hi], of anti-diagonal s for one dimension group.

    ``yR`` is y reversed in time, so y_j = yR[:, i + off] and both reads are unit-stride in i;
    ``acc[q, g, i + 1]`` holds R_g on diagonal slot q (index 0: the virtual row i = -1). The cells
    of a diagonal are independent, so LLVM vectorises this loop. Indices are unsigned offsets
    from non-negative starts: numba's negative-index wraparound would turn the loads into
    gathers. One group per loop keeps LLVM's runtime alias checks (every store against every
    load row) few; the group's dimension range is a compile-time literal so the sum unrolls.
    The frames arrive as float32 (the official dtype) and are held here already widened to
    float64 (exact), so the loop does tslearn's float64 arithmetic without a conversion per load.
    """
    numba.literally(d_start)
    numba.literally(d_stop)
    new = acc[q_new, group]
    prev = acc[q_prev, group]
    prev2 = acc[q_prev2, group]
    i_lo = uint64(lo)
    k_lo = uint64(lo + off)
    one = uint64(1)
    for t in range(uint64(hi - lo + 1)):
        i = i_lo + t
        k = k_lo + t
        # Local cost ||x_i - y_j||^2 over the group, summed in dimension order like tslearn.
        c = 0.0
        for d in range(d_start, d_stop):
            v = xT[d, i] - yR[d, k]
            c += v * v
        # up = R[i-1, j] and left = R[i, j-1] lie on diagonal s-1, diag = R[i-1, j-1] on s-2.
        new[i + one] = c + min(prev[i], prev[i + one], prev2[i])


@njit(cache=True, nogil=True, error_model="numpy")
def _band_min(row, lo, hi):
    """min of row[lo + 1 : hi + 2]: the cells i in [lo, hi] of one stored anti-diagonal."""
    m = _INF
    for i in range(lo + 1, hi + 2):
        if row[i] < m:
            m = row[i]
    return m


@njit(cache=True, nogil=True, error_model="numpy")
def combine(d):
    """FRDist's D from the three group DTWs d[0:3] (``combine3``)."""
    return combine3(d[0], d[1], d[2])


@njit(cache=True, nogil=True, error_model="numpy")
def combine3(au, va, expr):
    """FRDist's D from the three group DTWs, in the official accumulation order
    (``res = 0; res += w * dtw`` for AUs, valence/arousal, expressions; 1 * d == d exactly)."""
    return (W_AU * au + va) + W_EXPR * expr


@njit(cache=True, nogil=True, error_model="numpy")
def _dtw_group(xT, yR, acc, group, d_start, d_stop, T1, T2, d, best):
    """sqrt of the accumulated cost of one group over all anti-diagonals (tslearn's DTW), or
    -1.0 once it is certain that ``combine(d)`` with this group's value exceeds ``best``.

    Early abandoning is exact: every warping path crosses anti-diagonal s-1 or s, and along a
    path R never decreases, in floating point too (fl(c + m) >= m for c >= 0; rounding is
    monotonic), so the smallest R on two consecutive diagonals is <= the final R. ``combine``
    and sqrt are monotonic in every argument, so with d holding exact values of finished groups
    and lower bounds (or 0) for the rest, ``combine`` of that bound > best proves this pair is
    not the minimum; d[group] on entry is such a bound for this group, and stays one.
    ``best`` = inf never abandons. R_g[T1-1, T2-1] ends in slot (T1 + T2) % 3 at index T1.
    """
    numba.literally(d_start)
    numba.literally(d_stop)
    known = d[group]
    acc[:, group, :] = _INF
    acc[0, group, 0] = 0.0  # R[-1, -1] = 0, on the virtual diagonal s = -2 (slot 0)
    check = best < _INF
    for s in range(T1 + T2 - 1):
        lo = max(0, s - T2 + 1)
        hi = min(s, T1 - 1)
        q_new = (s + 2) % 3
        _sweep_antidiagonal(xT, yR, acc, lo, hi, T2 - 1 - s, (s + 1) % 3, s % 3, q_new, group, d_start, d_stop)
        # Cells just outside the band are read by the next two diagonals: they are R = inf
        # (j < 0 or i < 0), but the rotating slot still holds diagonal s-3 there.
        acc[q_new, group, lo] = _INF
        if hi + 2 <= T1:
            acc[q_new, group, hi + 2] = _INF
        if check and s % _CHECK_EVERY == _CHECK_EVERY - 1:
            bound = min(_band_min(acc[q_new, group], lo, hi),
                        _band_min(acc[(s + 1) % 3, group], max(0, s - T2), min(s - 1, T1 - 1)))
            d[group] = max(known, math.sqrt(bound))
            if combine(d) > best:
                return -1.0
    return math.sqrt(acc[(T1 + T2) % 3, group, T1])


@njit(cache=True, nogil=True, error_model="numpy")
def _bound_scratch(T1, T2):
    """Scratch of ``_group_lower_bound`` for x of T1 and y of T2 frames: the block envelopes,
    the local-cost bounds [blocks, T1] and the DP's two rows."""
    n_blocks = (T2 + _BLOCK - 1) // _BLOCK
    return np.empty((2, NUM_DIMS, n_blocks)), np.empty((n_blocks, T1)), np.empty((2, n_blocks))


@njit(cache=True, nogil=True, error_model="numpy")
def _block_envelopes(yR, d_start, d_stop, T2, env):
    """env[0, d, b], env[1, d, b]: min and max of y_j[d] over the columns j of block b
    (j in [b * _BLOCK, (b + 1) * _BLOCK)); yR is y reversed in time."""
    for d in range(d_start, d_stop):
        for b in range(env.shape[2]):
            lo, hi = _INF, -_INF
            for j in range(b * _BLOCK, min(T2, (b + 1) * _BLOCK)):
                v = yR[d, T2 - 1 - j]
                lo = min(lo, v)
                hi = max(hi, v)
            env[0, d, b] = lo
            env[1, d, b] = hi


@njit(cache=True, nogil=True, error_model="numpy")
def _cost_bounds(xT, env, d_start, d_stop, T1, lb):
    """lb[b, i] <= ||x_i - y_j||^2 over the group for every column j of block b, exactly in
    floating point: per dimension, x's distance to the block's [min, max] is at most |x - y_j|
    (rounding is monotonic), squared and summed in dimension order like the local cost itself.
    The group's dimension range is a compile-time literal (unrolled, the sum in registers);
    the loop over rows i is unit-stride and vectorised."""
    numba.literally(d_start)
    numba.literally(d_stop)
    for b in range(lb.shape[0]):
        row = lb[b]
        for i in range(T1):
            c = 0.0
            for d in range(d_start, d_stop):
                e = max(max(env[0, d, b] - xT[d, i], xT[d, i] - env[1, d, b]), 0.0)  # lo <= hi
                c += e * e
            row[i] = c


@njit(cache=True, nogil=True, error_model="numpy")
def _group_lower_bound(xT, yR, d_start, d_stop, T1, T2, scratch):
    """A lower bound of one group's DTW from T1 x (T2 / _BLOCK) local-cost bounds (~1/8 of a sweep).

    Any warping path visits every row i; let j_i be the first column it visits there (j_0 = 0,
    non-decreasing). Row i is then visited at least from j_i to j_{i+1} - 1 (the last row to
    T2 - 1), so the path's cost is at least, over the blocks b_i of the j_i, the sum of the
    bound of cell (i, j_i) and, for every block strictly between b_i and b_{i+1}, its width times
    its bound in row i. A DP over (row, block) takes the minimum of that sum over all
    non-decreasing block sequences: F[b] for rows up to i, H the best way to arrive from a lower
    block. It lower-bounds R in real arithmetic; both are sums of at most T1 + T2 non-negative
    rounded terms, so each is within a relative (T1 + T2) * 2^-53 of its real value, and the
    result is shrunk by twice that (and a spare factor 2) to stay below R in floating point.
    """
    numba.literally(d_start)
    numba.literally(d_stop)
    env, lb, dp = scratch
    F, F_new = dp[0], dp[1]
    n_blocks = lb.shape[0]
    _block_envelopes(yR, d_start, d_stop, T2, env)
    _cost_bounds(xT, env, d_start, d_stop, T1, lb)
    F[:] = _INF
    F[0] = lb[0, 0]
    for i in range(1, T1):
        H = _INF
        for b in range(n_blocks):
            F_new[b] = lb[b, i] + min(F[b], H)
            H = min(H + min(_BLOCK, T2 - b * _BLOCK) * lb[b, i - 1], F[b])
        F[:] = F_new
    total, tail = _INF, 0.0
    for b in range(n_blocks - 1, -1, -1):   # the last row runs on to column T2 - 1
        total = min(total, F[b] + tail)
        tail += min(_BLOCK, T2 - b * _BLOCK) * lb[b, T1 - 1]
    return math.sqrt(total * (1.0 - 4.0 * (T1 + T2) * 2.0 ** -52))


@njit(cache=True, nogil=True, error_model="numpy")
def _load_x(x, xT):
    """x [T1, 25] -> xT [25, T1], float64."""
    for t in range(x.shape[0]):
        for dim in range(NUM_DIMS):
            xT[dim, t] = x[t, dim]


@njit(cache=True, nogil=True, error_model="numpy")
def _load_y(y, yR):
    """y [T2, 25] -> yR [25, T2] reversed in time, float64."""
    T2 = y.shape[0]
    for t in range(T2):
        for dim in range(NUM_DIMS):
            yR[dim, T2 - 1 - t] = y[t, dim]


@njit(cache=True, nogil=True, error_model="numpy")
def _dtw_react_groups(xT, yR, acc, T1, T2, d, out):
    """The three REACT group DTWs of one loaded pair into out[0:3], in full.

    One group after the other: a group's DP depends only on itself, and the rows one group
    touches on consecutive diagonals stay in L1 (all 25 dims together do not fit).
    """
    d[:] = 0.0
    out[0] = _dtw_group(xT, yR, acc, 0, 0, AU_END, T1, T2, d, _INF)
    out[1] = _dtw_group(xT, yR, acc, 1, AU_END, VA_END, T1, T2, d, _INF)
    out[2] = _dtw_group(xT, yR, acc, 2, VA_END, NUM_DIMS, T1, T2, d, _INF)


@njit(cache=True, nogil=True, error_model="numpy")
def _finish_pair(xT, yR, acc, T1, T2, d, va, best, out, scratch):
    """D's other two groups for a pair whose valence/arousal DTW ``va`` is known: out[0:3] and
    True, or False once the pair provably cannot be below ``best`` (inf: never).

    With ``best`` finite the AU and then the expression lower bounds (``_group_lower_bound``,
    an eighth of their sweeps) are tried first: they often prove it before either group is
    swept, and keep tightening the checks of the sweeps that do run (expressions first, the
    cheaper sweep, whose exact value then tightens the AU sweep's checks).
    """
    d[:] = 0.0
    d[1] = va
    if best < _INF:
        d[0] = _group_lower_bound(xT, yR, 0, AU_END, T1, T2, scratch)
        if combine(d) > best:
            return False
        d[2] = _group_lower_bound(xT, yR, VA_END, NUM_DIMS, T1, T2, scratch)
        if combine(d) > best:
            return False
    v = _dtw_group(xT, yR, acc, 2, VA_END, NUM_DIMS, T1, T2, d, best)
    if v < 0.0:
        return False
    d[2] = v
    v = _dtw_group(xT, yR, acc, 0, 0, AU_END, T1, T2, d, best)
    if v < 0.0:
        return False
    out[0], out[1], out[2] = v, va, d[2]
    return True


@njit(parallel=True, cache=True, error_model="numpy")
def _dtw_react_pairs(x, y, x_index, y_index, out, n_blocks):
    T1 = x.shape[1]
    T2 = y.shape[1]
    n_pairs = x_index.shape[0]
    for b in prange(n_blocks):
        xT = np.empty((NUM_DIMS, T1))  # scratch reused by the block's pairs
        yR = np.empty((NUM_DIMS, T2))
        acc = np.empty((3, 3, T1 + 1))
        d = np.zeros(3)
        for p in range(b * n_pairs // n_blocks, (b + 1) * n_pairs // n_blocks):
            _load_x(x[x_index[p]], xT)
            _load_y(y[y_index[p]], yR)
            _dtw_react_groups(xT, yR, acc, T1, T2, d, out[p])


@njit(cache=True, nogil=True, error_model="numpy")
def _path_upper_bound(x, y, u):
    """D along one warping path (the diagonal, then straight on), accumulated like the DP.

    An upper bound on D, exactly in floating point: the DP's R at each cell of the path is
    fl(c + min(...)) <= fl(c + R at the path's previous cell), and by induction <= this sum.
    """
    T1 = x.shape[0]
    T2 = y.shape[0]
    u[:] = 0.0
    for t in range(max(T1, T2)):
        i = min(t, T1 - 1)
        j = min(t, T2 - 1)
        for g in range(3):
            start = 0 if g == 0 else (AU_END if g == 1 else VA_END)
            stop = AU_END if g == 0 else (VA_END if g == 1 else NUM_DIMS)
            c = 0.0
            for dim in range(start, stop):
                v = np.float64(x[i, dim]) - np.float64(y[j, dim])
                c += v * v
            u[g] = c + u[g]
    for g in range(3):
        u[g] = math.sqrt(u[g])
    return combine(u)


@njit(parallel=True, cache=True, error_model="numpy")
def _closest_react(x, y, x_index, y_index, starts, out, n_blocks):
    T1 = x.shape[1]
    T2 = y.shape[1]
    n = x_index.shape[0]
    width = 1
    for c in range(n):
        width = max(width, starts[c + 1] - starts[c])
    for b in prange(n_blocks):
        xT = np.empty((NUM_DIMS, T1))
        yR = np.empty((NUM_DIMS, T2))
        acc = np.empty((3, 3, T1 + 1))
        d = np.zeros(3)
        groups = np.empty(3)
        scratch = _bound_scratch(T1, T2)
        upper = np.empty((width, 3))   # per neighbour: the groups along the diagonal path
        va = np.empty(width)
        key = np.empty(width)
        for c in range(b * n // n_blocks, (b + 1) * n // n_blocks):
            _load_x(x[x_index[c]], xT)
            first, count = starts[c], starts[c + 1] - starts[c]
            best = _INF
            for m in range(count):
                best = min(best, _path_upper_bound(x[x_index[c]], y[y_index[first + m]], upper[m]))
            # Valence/arousal (weight 1: most of D) of every neighbour first, a tenth of a pair's
            # sweeps each: a neighbour whose VA alone exceeds the best upper bound is out. With
            # it exact and the other two groups along the diagonal, each D's upper bound is
            # tight enough to name the minimising neighbour first nearly always (98 % against
            # 73 % by the diagonal alone, benchmark data), and the best of them caps D*.
            for m in range(count):
                _load_y(y[y_index[first + m]], yR)
                d[:] = 0.0
                va[m] = _dtw_group(xT, yR, acc, 1, AU_END, VA_END, T1, T2, d, best)
                key[m] = _INF if va[m] < 0.0 else combine3(upper[m, 0], va[m], upper[m, 2])
                best = min(best, key[m])
            order = np.argsort(key[:count])
            found = _INF
            for m in order:
                if key[m] == _INF:   # abandoned on VA: not the minimum
                    break
                _load_y(y[y_index[first + m]], yR)
                # The first is finished in full: nothing can exceed its own upper bound, the
                # best; its exact D is what prunes the rest.
                if _finish_pair(xT, yR, acc, T1, T2, d, va[m], best if found < _INF else _INF, groups, scratch):
                    value = combine(groups)
                    found = min(found, value)
                    best = min(best, value)
            # The minimising neighbour is never abandoned (its bounds <= D* <= best), so
            # ``found`` is exactly the minimum over all of them.
            out[c] = found


@contextlib.contextmanager
def numba_threads(num_threads: int | None) -> Iterator[None]:
    """Around every parallel kernel: cap numba's thread count (None: leave it), e.g. inside a
    Ray task, and give torch back its own.

    numba's OpenMP threading layer and torch share one OpenMP runtime, and a parallel numba
    call sets that runtime's thread count to numba's (the core count). Without the reset, a
    process that scores metrics and then trains — a Ray Train worker validating with FRDist,
    where Ray gave torch one thread per worker — goes on training with as many threads as
    cores, and its workers oversubscribe the CPU (the demo's stage 2 ran at half speed after
    its first validation).
    """
    torch_threads = torch.get_num_threads()
    previous = numba.get_num_threads()
    if num_threads is not None:
        numba.set_num_threads(max(1, min(int(num_threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(previous)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def _checked(x, y, x_index, y_index):
    """Contiguous float32 frames (the official dtype: one compiled specialisation, unit-stride
    frames) and int64 indices, validated."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    y = np.ascontiguousarray(y, dtype=np.float32)
    if x.ndim != 3 or y.ndim != 3 or x.shape[2] != NUM_DIMS or y.shape[2] != NUM_DIMS:
        raise ValueError(f"expected x [M, T1, {NUM_DIMS}] and y [M', T2, {NUM_DIMS}], got {x.shape}, {y.shape}")
    x_index = np.ascontiguousarray(x_index, dtype=np.int64)
    y_index = np.ascontiguousarray(y_index, dtype=np.int64)
    if x_index.ndim != 1 or y_index.ndim != 1:
        raise ValueError("x_index and y_index must be 1-d")
    if (x_index.size and (x_index.min() < 0 or x_index.max() >= x.shape[0])) or \
            (y_index.size and (y_index.min() < 0 or y_index.max() >= y.shape[0])):
        raise IndexError("pair index out of range")
    return _read_only(x), _read_only(y), _read_only(x_index), _read_only(y_index)


def _read_only(a: np.ndarray) -> np.ndarray:
    """A read-only view: numba compiles read-only and writable arrays as different types, and
    arrays from Parquet/Arrow arrive read-only, others not; one type = one cached specialisation
    per kernel (the kernels never write their inputs). The caller's array is not touched."""
    v = a.view()
    v.flags.writeable = False
    return v


def dtw_pairs(
    x: np.ndarray,
    y: np.ndarray,
    x_index: Sequence[int] | np.ndarray,
    y_index: Sequence[int] | np.ndarray,
    *,
    num_threads: int | None = None,
) -> np.ndarray:
    """tslearn DTW of x[x_index[p]] vs y[y_index[p]] on the REACT groups, numba on CPU.

    x [M, T1, 25], y [M', T2, 25] (cast to float32 like the official ``astype(np.float32)``).
    Returns float64 [P, 3]: DTW on dims 0-14, 15-16 and 17-24 for each pair p.
    """
    x, y, x_index, y_index = _checked(x, y, x_index, y_index)
    if x_index.shape != y_index.shape:
        raise ValueError("x_index and y_index must be 1-d and of equal length")
    out = np.empty((x_index.shape[0], 3), dtype=np.float64)
    if out.shape[0] == 0:
        return out
    with numba_threads(num_threads):
        # A few blocks per thread balance the load; each block reuses its scratch buffers.
        _dtw_react_pairs(x, y, x_index, y_index, out, min(out.shape[0], 4 * numba.get_num_threads()))
    return out


def closest_pairs(
    x: np.ndarray,
    y: np.ndarray,
    x_index: Sequence[int] | np.ndarray,
    y_index: Sequence[int] | np.ndarray,
    starts: Sequence[int] | np.ndarray,
    *,
    num_threads: int | None = None,
) -> np.ndarray:
    """Per group c of pairs: min over p in [starts[c], starts[c+1]) of FRDist's D(x[x_index[c]], y[y_index[p]]).

    D = (1/15) DTW(AUs) + DTW(valence, arousal) + (1/8) DTW(expressions), each DTW bit-identical
    to ``dtw_pairs`` and the minimum bit-identical to taking it over all of them; but pairs that
    provably cannot be the minimum are abandoned part-way (see ``_dtw_group``), the most
    promising first (a warping path's cost bounds each D from above). Groups run in parallel on
    numba threads. Returns float64 [C].
    """
    x, y, x_index, y_index = _checked(x, y, x_index, y_index)
    starts = _read_only(np.ascontiguousarray(starts, dtype=np.int64))
    if starts.ndim != 1 or starts.size != x_index.size + 1 or starts[0] != 0 or starts[-1] != y_index.size \
            or (np.diff(starts) < 1).any():
        raise ValueError("starts must rise from 0 to len(y_index), one non-empty group per x_index entry")
    out = np.empty(x_index.shape[0], dtype=np.float64)
    if out.shape[0] == 0:
        return out
    with numba_threads(num_threads):
        # Abandoning makes groups unequal in cost: many small blocks keep both cores busy.
        _closest_react(x, y, x_index, y_index, starts, out, min(out.shape[0], 16 * numba.get_num_threads()))
    return out


def compile_kernels() -> None:
    """Compile (or load from numba's on-disk cache) both CPU kernels once, on tiny inputs.

    The specialisations do not depend on sizes, so this is what every later process loads from
    ``__pycache__`` instead of compiling again; ``make venv`` runs it at install time (a first
    evaluation otherwise spends ~20 s per kernel and process compiling, in every Ray task).
    """
    x = np.zeros((2, 4, 25), dtype=np.float32)
    dtw_pairs(x, x, [0], [1])
    closest_pairs(x, x, [0], [0, 1], [0, 2])


def dtw_torch(
    x: torch.Tensor, y: torch.Tensor, groups: Sequence[tuple[int, int]] | None = REACT_GROUPS
) -> torch.Tensor:
    """Batched anti-diagonal DTW (tslearn semantics) for pairs x[b] vs y[b], on x's device.

    x [B, T1, D], y [B, T2, D]. ``groups``: dimension ranges, one DTW each (None: all D dims
    as one group). Returns float64 [B, G]. Cost per call: T1 + T2 - 1 steps of a few tensor
    ops over [B, D, diagonal length]; use large B on GPU to amortise kernel launches.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"expected x [B, T1, D] and y [B, T2, D], got {tuple(x.shape)}, {tuple(y.shape)}")
    batch, T1, D = x.shape
    T2 = y.shape[1]
    groups = [(0, D)] if groups is None else [(int(a), int(b)) for a, b in groups]
    # Round to float32 (the official astype), then widen to float64 (tslearn's dtype), exactly.
    xT = x.to(torch.float32).to(torch.float64).transpose(1, 2).contiguous()  # [B, D, T1]
    yR = y.to(device=x.device, dtype=torch.float32).to(torch.float64).flip(1).transpose(1, 2).contiguous()
    acc = torch.full((3, batch, len(groups), T1 + 1), math.inf, dtype=torch.float64, device=x.device)
    acc[0, :, :, 0] = 0.0  # R[-1, -1] = 0 on the virtual diagonal s = -2
    for s in range(T1 + T2 - 1):
        lo, hi, off = max(0, s - T2 + 1), min(s, T1 - 1), T2 - 1 - s
        diff = xT[:, :, lo : hi + 1] - yR[:, :, lo + off : hi + 1 + off]
        sq = diff * diff
        cost = torch.stack([sq[:, a:b].sum(dim=1) for a, b in groups], dim=1)  # [B, G, n]
        prev, prev2, new = acc[(s + 1) % 3], acc[s % 3], acc[(s + 2) % 3]
        up, left, diag = prev[..., lo : hi + 1], prev[..., lo + 1 : hi + 2], prev2[..., lo : hi + 1]
        best = torch.minimum(torch.minimum(up, left), diag)
        new[..., lo + 1 : hi + 2] = cost + best
        new[..., lo] = math.inf
        if hi + 2 <= T1:
            new[..., hi + 2] = math.inf
    return acc[(T1 + T2) % 3][..., T1].sqrt()


def dtw_pairs_torch(
    x: np.ndarray | torch.Tensor,
    y: np.ndarray | torch.Tensor,
    x_index: Sequence[int] | np.ndarray,
    y_index: Sequence[int] | np.ndarray,
    *,
    device: str | torch.device = "cuda",
    batch_size: int = 2048,
    groups: Sequence[tuple[int, int]] | None = REACT_GROUPS,
) -> np.ndarray:
    """``dtw_pairs`` computed with ``dtw_torch`` on ``device``, ``batch_size`` pairs at a time."""
    x_t = torch.as_tensor(np.asarray(x, dtype=np.float32) if not torch.is_tensor(x) else x)
    y_t = torch.as_tensor(np.asarray(y, dtype=np.float32) if not torch.is_tensor(y) else y)
    x_index = torch.as_tensor(np.asarray(x_index, dtype=np.int64))
    y_index = torch.as_tensor(np.asarray(y_index, dtype=np.int64))
    num_groups = 1 if groups is None else len(groups)
    out = np.empty((x_index.shape[0], num_groups), dtype=np.float64)
    y_dev = y_t.to(device=device, dtype=torch.float32)  # listeners are reused across batches
    for start in range(0, x_index.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        xb = x_t[x_index[sl]].to(device=device, dtype=torch.float32)
        yb = y_dev[y_index[sl].to(y_dev.device)]
        out[sl] = dtw_torch(xb, yb, groups).cpu().numpy()
    return out
