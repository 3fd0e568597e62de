"""The worker's train batches: a small shard is read once and then served from memory.

Real Ray Data datasets stand in for a worker's ``streaming_split`` shard (the same
``iter_torch_batches`` API); one process, so the collective size decision is the local one.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.train.config import DataSettings
from pipeline.train.loop import _TrainBatches


def _batches(ray_local, rows: int, width: int, cache_mb: int, batch_size: int = 4):
    import ray.data
    import torch

    values = np.repeat(np.arange(rows, dtype=np.float32)[:, None], width, axis=1)
    ds = ray.data.from_items([{"x": v} for v in values])
    plan = SimpleNamespace(batch_size=batch_size,
                           config=SimpleNamespace(seed=3, data=DataSettings(cache_mb=cache_mb, shuffle_buffer=0)))
    return _TrainBatches(ds, plan, rank=0, device=torch.device("cpu"))


def _ids(epoch) -> list[list[int]]:
    return [b["x"][:, 0].long().tolist() for b in epoch]


def _positions(source, batches: list[list[int]]) -> list[int]:
    """Where each served row sits in the worker's cache."""
    cached = source.rows["x"][:, 0].long().tolist()
    return [cached.index(i) for b in batches for i in b]


def test_small_shard_is_cached_after_the_first_epoch_and_reshuffled(ray_local):
    source = _batches(ray_local, rows=10, width=3, cache_mb=1)
    first = _ids(source.epoch(1))
    assert [len(b) for b in first] == [4, 4]               # drop_last: the 2-row tail waits
    assert source.rows is not None and source.rows["x"].shape == (10, 3)
    epochs = [_ids(source.epoch(e)) for e in range(2, 8)]
    assert all([len(b) for b in e] == [4, 4] for e in epochs)
    assert len({tuple(sum(e, [])) for e in epochs}) == len(epochs)      # a new order every epoch
    seen = {i for e in epochs for b in e for i in b}
    assert seen == set(range(10))                          # the tail of one epoch joins another
    again = _batches(ray_local, rows=10, width=3, cache_mb=1)
    list(again.epoch(1))
    # The order is (seed, epoch, rank)'s: the same permutation of the cached rows. Which row
    # sits where in the cache follows Ray Data's arrival order, which is not deterministic.
    assert _positions(again, _ids(again.epoch(2))) == _positions(source, epochs[0])


@pytest.mark.parametrize("cache_mb", [0, 1])
def test_shard_larger_than_the_budget_streams_every_epoch(ray_local, cache_mb):
    width = 65_536                                         # 10 rows × 256 KiB = 2.5 MiB > 1 MiB
    source = _batches(ray_local, rows=10, width=width, cache_mb=cache_mb)
    for epoch in (1, 2, 3):
        assert sorted(len(b) for b in _ids(source.epoch(epoch))) == [4, 4]
        assert source.rows is None


def test_rank_zero_validation_uses_every_core_on_cpu_and_gives_the_thread_back(monkeypatch):
    """While rank 0 samples its validation reactions the other workers wait, so on CPU it may use
    the node's cores; training goes on with the one thread Ray gave each worker."""
    import os

    import torch

    from pipeline.train import loop

    val = object.__new__(loop._RankZeroValidation)
    val.subset, val.device = ["item"], torch.device("cpu")
    seen = []
    monkeypatch.setattr(loop._RankZeroValidation, "_run",
                        lambda self, gen, epoch, plot: seen.append(torch.get_num_threads()) or ({}, None))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert val.run(None, 1, False) == ({}, None)
        assert seen == [max(1, os.cpu_count() or 1)] and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
