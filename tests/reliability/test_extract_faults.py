"""Faults during extraction: a Ray worker SIGKILLed mid-clip, a clip that kills its worker on every
attempt, transient S3 errors (503 SlowDown from a flaky endpoint in front of moto), and a job
interrupted at the publish point."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from pipeline import storage
from pipeline.data import react
from pipeline.data.clip import extract_clip
from pipeline.data.extract import ExtractConfig, extract
from pipeline.data.snapshot import MANIFEST, Snapshot, SnapshotError
from tests.helpers import faults as F
from tests.helpers import report as R

pytestmark = pytest.mark.slow


def test_a_worker_killed_mid_clip_is_retried_and_the_job_completes(clean_run, clean_root, request):
    """SIGKILL (what the OOM killer sends) of the Ray worker decoding a clip: Ray retries the task
    on another worker, the job completes, no clip is lost or duplicated."""
    r = clean_run
    m = r.result.manifest
    R.case(R.FAULT, "extraction worker SIGKILLed while holding a clip",
           f"retried {len(r.attempts) - 1}x on a new worker; job completed, "
           f"{m.counts.clips}/{m.counts.considered} clips extracted", nodeid=request.node.nodeid,
           detail=f"killed pid {r.killed}")
    assert r.attempts[0] == r.killed and len(r.attempts) == 2 and r.attempts[1] != r.killed
    assert r.result.published, r.result.report
    assert (m.counts.considered, m.counts.clips, m.counts.quarantined) == (8, 8, 0)
    assert sorted(m.clips) == sorted(c.clip_id for c in react.open_dataset(clean_root).clips())
    # one file per clip, and the retried clip holds the numbers the job's code path computes
    files = list(storage.walk_files(storage.join(r.result.uri, "clips"), ".parquet"))
    assert len(files) == 8
    clip = react.open_dataset(clean_root).clip(r.target)
    from pipeline.data.features import load_feature_set

    features = load_feature_set("demo")
    features.resolve()
    alone = extract_clip(clip, features)
    stored = r.result.snapshot.load_clips([r.target])[r.target]
    for column, values in stored.items():
        expected = np.asarray(alone[column]).astype(r.result.snapshot.features[column].dtype).astype(np.float32)
        np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-4, err_msg=column)


def test_a_clip_that_kills_its_worker_every_time_is_quarantined_after_bounded_retries(clean_root, ray_local,
                                                                                       tmp_path, request):
    dataset = react.open_dataset(clean_root)
    target = dataset.clips("val")[0]
    control = tmp_path / "control"
    control.mkdir()
    fset = F.holding_feature_set(tmp_path / "holding.yaml", F.array_digest(react.read_emotion(target.emotion)),
                                 control, holds=10_000)
    patience = 6            # attempts we allow before concluding the job would go on forever
    state = {"killed": [], "released": False}

    def killer():           # every attempt on the clip dies (like a decoder that always segfaults)
        try:
            while len(state["killed"]) < patience:
                pids = F.attempts(control)
                for pid in pids[len(state["killed"]):]:
                    F.kill_own(pid)
                    state["killed"].append(pid)
                if state.get("done"):
                    return
                threading.Event().wait(0.05)
        finally:
            if not state.get("done"):
                state["released"] = True
                (control / "release").write_text("")

    thread = threading.Thread(target=killer, daemon=True)
    with F.holding_emotion():
        thread.start()
        result = extract(ExtractConfig(data=clean_root, out=str(tmp_path / "snapshots"), feature_set=fset,
                                       splits=["val"], max_failure_fraction=1.0))
    state["done"] = True
    thread.join(30)
    n = len(F.attempts(control))
    q = {x.clip_id: x for x in result.manifest.quarantine}
    c = result.manifest.counts
    R.rows("val clips, one kills its worker on every attempt", c.considered, c.clips, c.quarantined)
    if state["released"]:
        outcome = f"NOT bounded: {n} attempts, still retrying when the test released the clip"
    else:
        outcome = f"quarantined [{getattr(q.get(target.clip_id), 'stage', None)}] after {n} attempts"
    R.case(R.FAULT, "a clip kills its worker on every attempt", outcome, nodeid=request.node.nodeid)
    assert not state["released"], outcome
    assert q[target.clip_id].stage == "worker" and n <= 4
    assert c.clips == 1 and c.considered == 2


def test_transient_s3_errors_are_retried_in_a_storage_round_trip(s3, request):
    proxy = F.FlakyS3(s3.endpoint)
    try:
        with F.s3_endpoint(proxy.endpoint):
            proxy.fail("PUT", 2)
            proxy.fail("HEAD", 2)
            proxy.fail("GET", 3)
            proxy.fail("POST", 1, contains="?delete")     # s3fs deletes with DeleteObjects
            data = np.random.default_rng(1).bytes(300_000)
            uri = s3.uri("round-trip", "blob.bin")
            storage.write_bytes(uri, data)
            storage.write_json(s3.uri("round-trip", "meta.json"), {"n": len(data)})
            assert storage.exists(uri) and storage.size(uri) == len(data)
            assert storage.read_bytes(uri) == data
            assert storage.read_json(s3.uri("round-trip", "meta.json")) == {"n": len(data)}
            assert storage.listdir(s3.uri("round-trip")) == ["blob.bin", "meta.json"]
            storage.remove(s3.uri("round-trip"))
            assert not storage.exists(uri)
        injected = len(proxy.injected)
        R.case(R.FAULT, "S3 503 SlowDown on PUT/HEAD/GET/DeleteObjects (round trip)",
               f"retried {injected}x by botocore standard mode; round trip intact", nodeid=request.node.nodeid,
               detail=", ".join(sorted({m for m, _, _ in proxy.injected})))
        assert proxy.pending() == 0 and injected == 8
    finally:
        proxy.close()


def test_snapshot_publishing_survives_transient_s3_errors(clean_root, s3, ray_local, request):
    """The driver's publish (quarantine, items, neighbours, mean face, then the manifest) and the
    read-back go through an endpoint answering 503 to the first writes of each and to the first
    manifest reads. (Ray workers started before the proxy keep moto's address for clip files.)"""
    proxy = F.FlakyS3(s3.endpoint)
    out = s3.uri("snapshots")
    try:
        with F.s3_endpoint(proxy.endpoint):
            proxy.fail("PUT", 2, contains=MANIFEST)
            proxy.fail("GET", 2, contains=MANIFEST)
            proxy.fail("PUT", 3)
            proxy.fail("HEAD", 1)
            result = extract(ExtractConfig(data=clean_root, out=out, splits=["val"]))
            assert result.published, result.report
            snap = Snapshot.latest(out)
            assert snap is not None and snap.id == result.manifest.id
            assert len(snap.clip_ids("val")) == 2 and len(snap.items("val")) == 2
            assert snap.neighbours("val").shape == (2, 2)
            manifest_puts = [p for m, p, s in proxy.forwarded if m == "PUT" and p.endswith(MANIFEST)]
        injected = len(proxy.injected)
        c = result.manifest.counts
        R.rows("val clips published through a flaky S3 endpoint", c.considered, c.clips, c.quarantined)
        R.case(R.FAULT, "S3 503 SlowDown while publishing a snapshot",
               f"retried {injected}x; manifest written once, last; snapshot readable",
               nodeid=request.node.nodeid, detail=f"{len(proxy.forwarded)} requests reached S3")
        assert proxy.pending() == 0 and injected == 8
        assert len(manifest_puts) == 1                      # written once, after the retries
    finally:
        proxy.close()


class Interrupted(BaseException):
    """Stands in for the process being stopped (SIGTERM/Ctrl-C) at the worst moment."""


def test_a_job_interrupted_before_publishing_leaves_no_snapshot_readers_take(clean_root, ray_local, tmp_path,
                                                                             monkeypatch, request):
    from pipeline.train.job import TrainError, _open_snapshot

    out = str(tmp_path / "snapshots")
    write_json = storage.write_json

    def interrupted_at_publish(uri, obj):
        if uri.endswith(MANIFEST):
            raise Interrupted(f"stopped just before writing {uri}")
        return write_json(uri, obj)

    with monkeypatch.context() as m:
        m.setattr(storage, "write_json", interrupted_at_publish)
        with pytest.raises(Interrupted):
            extract(ExtractConfig(data=clean_root, out=out, splits=["val"]))
    [folder] = storage.listdir(out)
    partial = storage.join(out, folder)
    # every data file is there — only the manifest is missing
    assert len(list(storage.walk_files(storage.join(partial, "clips"), ".parquet"))) == 2
    assert storage.exists(storage.join(partial, "items", "val.parquet"))
    assert not storage.exists(storage.join(partial, MANIFEST))
    assert Snapshot.latest(out) is None and Snapshot.list_ids(out) == []
    with pytest.raises(SnapshotError, match="incomplete"):
        Snapshot.open(partial)
    with pytest.raises(SnapshotError, match="no complete snapshot"):
        Snapshot.resolve("latest", out)
    with pytest.raises(TrainError, match="incomplete"):
        _open_snapshot(partial)

    again = extract(ExtractConfig(data=clean_root, out=out, splits=["val"], incremental_from="latest"))
    assert again.published and Snapshot.latest(out).id == again.manifest.id != folder
    assert Snapshot.list_ids(out) == [again.manifest.id]          # the partial folder stays invisible
    c = again.manifest.counts
    R.rows("re-run after a job stopped at the publish point", c.considered, c.clips, c.quarantined)
    R.case(R.FAULT, "job stopped just before writing the manifest",
           "partial folder ignored by latest, refused by open/train; re-run published",
           nodeid=request.node.nodeid, detail=f"{c.processed} re-extracted, {c.carried} carried")
    assert (c.clips, c.processed) == (2, 2)
