"""The extraction job on real local Ray, local and S3 (moto) storage, with synthetic REACT data."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.helpers.media import beep, copy_dataset, flash_frames, write_mp4, write_wav
from tests.helpers.models import save_tiny_torchscript, save_tiny_wav2vec2
from pipeline import storage
from pipeline.data import react
from pipeline.data.extract import ExtractConfig, extract
from pipeline.data.snapshot import Snapshot, SnapshotError

pytestmark = pytest.mark.slow
DEMO_COLUMNS = ["video_pixels", "audio_mfcc26", "emotion", "tdmm"]


def run(data, out, **kwargs):
    return extract(ExtractConfig(data=str(data), out=str(out), **kwargs))


def _file(root, split, modality, clip_id, suffix):
    return os.path.join(root, split, modality, clip_id + suffix)


@pytest.fixture(scope="module")
def demo(ray_local, synth_root, tmp_path_factory):
    """One demo extraction of the synthetic dataset, shared by the reader tests."""
    result = run(synth_root, tmp_path_factory.mktemp("snapshots"))
    assert result.published, result.report
    return result


def test_demo_snapshot_rows_items_and_readers(demo, synth_root):
    dataset = react.open_dataset(synth_root)
    snap = Snapshot.open(demo.uri)
    m = snap.manifest
    assert m.counts.clips == m.counts.processed == 8 and m.counts.quarantined == 0
    assert snap.facial == {"video_pixels": 1024} and snap.acoustic == {"audio_mfcc26": 26}
    assert snap.labels == {"emotion": 25, "tdmm": 58}
    assert snap.features["video_pixels"] == (1024, "float16", "facial")
    assert Snapshot.latest(os.path.dirname(demo.uri)).id == snap.id == m.id
    assert m.feature_set.hash.startswith(m.id.split("-")[1])
    assert m.code["reactdiff"] and m.source.uri == synth_root

    for split in ("train", "val", "test"):
        assert snap.items(split) == dataset.items(split)                       # official order
        np.testing.assert_array_equal(snap.neighbours(split), dataset.neighbours(split))
        assert snap.clip_ids(split) == sorted(c.clip_id for c in dataset.clips(split))
    np.testing.assert_array_equal(snap.mean_face(), dataset.mean_face())

    # Ray Data reader: only the asked columns, [T, D] arrays, clip_id order.
    ds = snap.clips_dataset(["video_pixels", "emotion"], splits=["train"])
    rows = ds.take_all()
    assert [r["clip_id"] for r in rows] == snap.clip_ids("train")
    assert set(rows[0]) == {"clip_id", "split", "num_frames", "video_pixels", "emotion"}
    assert rows[0]["video_pixels"].shape == (50, 1024) and rows[0]["video_pixels"].dtype == np.float32
    batch = next(iter(ds.select_columns(["video_pixels", "emotion"]).iter_torch_batches(batch_size=2)))
    assert tuple(batch["video_pixels"].shape) == (2, 50, 1024) and tuple(batch["emotion"].shape) == (2, 50, 25)

    # pyarrow reader agrees with Ray's, and labels round-trip exactly.
    clip = dataset.clip(rows[1]["clip_id"])
    loaded = snap.load_clips([clip.clip_id], DEMO_COLUMNS)[clip.clip_id]
    np.testing.assert_array_equal(loaded["video_pixels"], rows[1]["video_pixels"])
    np.testing.assert_array_equal(loaded["emotion"], react.read_emotion(clip.emotion))
    np.testing.assert_array_equal(loaded["tdmm"], react.read_tdmm(clip.tdmm))
    assert all(v.dtype == np.float32 for v in loaded.values())
    # Video content reaches the features: frames of one clip differ, two clips differ.
    assert loaded["video_pixels"].std(axis=0).mean() > 0.01
    other = snap.load_clips([rows[0]["clip_id"]], ["audio_mfcc26"])[rows[0]["clip_id"]]["audio_mfcc26"]
    assert not np.allclose(other, loaded["audio_mfcc26"])

    # Files: one per clip, compact per-frame tensors, bytes recorded in the manifest.
    info = m.clips[clip.clip_id]
    path = os.path.join(demo.uri, info.file)
    assert info.bytes == os.path.getsize(path) > 0 and info.num_frames == 50
    schema = pq.read_schema(path)
    assert str(schema.field("video_pixels").type) == "list<element: fixed_size_list<element: halffloat>[1024]>"
    assert m.bytes.per_clip_mean > 0 and set(m.bytes.per_column_per_clip_mean) == set(DEMO_COLUMNS)
    assert m.timings.frames_per_s > 0
    assert "total" in demo.report and "published" in demo.report


def test_s3_input_and_output_give_the_same_features(demo, synth_root, s3, ray_local):
    fs, base = storage.filesystem(s3.uri("data"))
    local = [os.path.join(d, f) for d, _, files in os.walk(synth_root) for f in files]
    fs.put(local, [base + "/" + os.path.relpath(p, synth_root) for p in local])
    result = run(s3.uri("data"), s3.uri("snapshots"), splits=["train", "val"])
    assert result.published, result.report
    snap = Snapshot.open(s3.uri("snapshots", result.manifest.id))
    assert snap.uri.startswith("s3://") and snap.splits == ["train", "val"]
    assert Snapshot.latest(s3.uri("snapshots")).id == snap.id
    local = Snapshot.open(demo.uri)
    ids = snap.clip_ids()
    assert len(ids) == 6
    # Deterministic: the same inputs and feature set give the same numbers, wherever they live.
    remote_arrays, local_arrays = snap.load_clips(ids, DEMO_COLUMNS), local.load_clips(ids, DEMO_COLUMNS)
    for cid in ids:
        for col in DEMO_COLUMNS:
            np.testing.assert_array_equal(remote_arrays[cid][col], local_arrays[cid][col])
    rows = snap.clips_dataset(["audio_mfcc26"], splits="val").take_all()
    assert [r["clip_id"] for r in rows] == snap.clip_ids("val")
    assert snap.items("val") == local.items("val")
    assert snap.manifest.clips[ids[0]].bytes == storage.size(s3.uri("snapshots", snap.id, snap.manifest.clips[ids[0]].file))


def test_incremental_runs_process_only_new_and_changed_clips(ray_local, synth_root, tmp_path):
    data = copy_dataset(synth_root, tmp_path / "data")
    out = tmp_path / "snapshots"
    first = run(data, out, splits=["train"])
    assert first.manifest.counts.processed == 4

    dataset = react.open_dataset(str(data))
    changed = dataset.clips("train")[0]
    rows = open(changed.emotion).read().splitlines()
    cells = rows[1].split(",")
    cells[15] = "0.5"                                              # valence of frame 0
    rows[1] = ",".join(cells)
    time.sleep(0.01)
    open(changed.emotion, "w").write("\n".join(rows) + "\n")

    second = run(data, out, incremental_from="latest")            # now every split
    c = second.manifest.counts
    assert (c.clips, c.carried, c.processed, c.quarantined) == (8, 3, 5, 0)
    assert second.manifest.incremental_from == first.manifest.id
    carried = {cid for cid, info in second.manifest.clips.items() if info.carried}
    assert carried == {c.clip_id for c in dataset.clips("train")} - {changed.clip_id}
    snap1, snap2 = Snapshot.open(first.uri), Snapshot.open(second.uri)
    for cid in carried:                                            # byte-identical copies
        a = open(os.path.join(first.uri, first.manifest.clips[cid].file), "rb").read()
        assert a == open(os.path.join(second.uri, second.manifest.clips[cid].file), "rb").read()
    new = snap2.load_clips([changed.clip_id], ["emotion"])[changed.clip_id]["emotion"]
    assert new[0, 15] == 0.5 and snap1.load_clips([changed.clip_id], ["emotion"])[changed.clip_id]["emotion"][0, 15] != 0.5

    third = run(data, out, incremental_from=second.uri)             # nothing changed: nothing decoded
    c = third.manifest.counts
    assert (c.clips, c.carried, c.processed) == (8, 8, 0)
    assert Snapshot.list_ids(str(out)) == sorted([first.manifest.id, second.manifest.id, third.manifest.id])
    rows = Snapshot.open(third.uri).clips_dataset(["emotion"]).take_all()
    assert sorted(r["clip_id"] for r in rows) == sorted(c.clip_id for c in dataset.clips())   # no duplicates
    assert "carried" in third.report


def test_broken_clips_are_quarantined_and_the_others_extracted(ray_local, synth_root, tmp_path):
    data = str(copy_dataset(synth_root, tmp_path / "data"))
    clips = {c.clip_id: c for c in react.open_dataset(data).clips()}
    ids = sorted(clips)
    truncated, no_audio, nan_labels, long_tdmm, resampled = ids[:5]
    video = clips[truncated].video
    blob = open(video, "rb").read()
    open(video, "wb").write(blob[: len(blob) // 3])
    os.remove(clips[no_audio].audio)
    rows = open(clips[nan_labels].emotion).read().splitlines()
    rows[5] = ",".join(["nan"] + rows[5].split(",")[1:])
    open(clips[nan_labels].emotion, "w").write("\n".join(rows) + "\n")
    tdmm = np.load(clips[long_tdmm].tdmm)
    np.save(clips[long_tdmm].tdmm, np.concatenate([tdmm, tdmm[:10]]))     # 60 frames vs 50: beyond tolerance
    write_wav(clips[resampled].audio, beep(50, range(10, 12), rate=16000, channels=2), rate=16000)

    out = tmp_path / "snapshots"
    result = run(data, out, max_failure_fraction=0.6)
    assert result.published, result.report
    q = {r.clip_id: r for r in result.manifest.quarantine}
    assert set(q) == {truncated, no_audio, nan_labels, long_tdmm}
    assert q[truncated].stage == "decode_video" and q[truncated].uri == video
    assert q[no_audio].stage == "decode_audio" and "missing audio" in q[no_audio].reason
    assert q[nan_labels].stage == "labels" and "NaN" in q[nan_labels].reason
    assert q[long_tdmm].stage == "frames" and "60 frames" in q[long_tdmm].reason
    snap = result.snapshot
    assert len(snap.clip_ids()) == 4 and resampled in snap.clip_ids()       # 16 kHz stereo: resampled, mono
    assert snap.load_clips([resampled], ["audio_mfcc26"])[resampled]["audio_mfcc26"].shape == (50, 26)
    table = pq.read_table(os.path.join(result.uri, "quarantine", "quarantine.parquet"))
    assert sorted(table.column("clip_id").to_pylist()) == sorted(q)
    items = pq.read_table(os.path.join(result.uri, "items", "train.parquet")).to_pydict()
    for speaker, listener, ok in zip(items["speaker"], items["listener"], items["available"]):
        assert ok == (speaker not in q and listener not in q)
    with pytest.raises(SnapshotError, match="quarantined"):
        snap.load_clips([truncated], ["emotion"])
    assert "quarantined clips" in result.report and truncated in result.report

    # Above the failure limit: the job says so, exits 1 and publishes nothing.
    failed = run(data, out, max_failure_fraction=0.05)
    assert not failed.published and failed.exit_code == 1 and "NOT published" in failed.report
    assert os.path.exists(os.path.join(failed.uri, "_report.json"))
    with pytest.raises(SnapshotError, match="incomplete"):
        Snapshot.open(failed.uri)
    assert Snapshot.latest(str(out)).id == result.manifest.id


def test_network_extractors_run_in_actor_pools_with_av_alignment(ray_local, synth_root, tmp_path):
    data = str(copy_dataset(synth_root, tmp_path / "data"))
    dataset = react.open_dataset(data)
    flash, broken = dataset.clips("train")[0], dataset.clips("val")[0]
    on = range(30, 33)                                               # a flash and a beep on frames 30..32
    write_mp4(flash.video, flash_frames(50, bright=on))
    write_wav(flash.audio, beep(50, on))
    open(broken.video, "wb").write(b"\x00" * 1000)
    ts = save_tiny_torchscript(tmp_path / "tiny.pt", width=8)
    w2v = save_tiny_wav2vec2(tmp_path / "w2v.pt")
    fset = tmp_path / "nets.yaml"
    fset.write_text(json.dumps({"name": "nets", "extractors": {
        "pixels": {"type": "pixels", "size": 16}, "tiny": {"type": "torchscript", "width": 8},
        "mfcc26": {"type": "mfcc"}, "logmel": {"type": "logmel", "n_mels": 32},
        "wav2vec2": {"type": "wav2vec2"}, "emotion": {"type": "emotion"}}}))

    result = run(data, tmp_path / "snapshots", feature_set=str(fset), models={"tiny": ts, "wav2vec2": w2v},
                 max_failure_fraction=0.2)
    assert result.published, result.report
    snap = result.snapshot
    assert snap.facial == {"video_pixels": 256, "video_tiny": 8}
    assert snap.acoustic == {"audio_mfcc26": 26, "audio_logmel": 32, "audio_wav2vec2": 64}
    models = result.manifest.feature_set.models
    assert models["tiny"]["sha256"] == __import__("hashlib").sha256(open(ts, "rb").read()).hexdigest()
    assert models["wav2vec2"]["sha256"] and [q.clip_id for q in result.manifest.quarantine] == [broken.clip_id]
    assert result.manifest.counts.processed == 7

    f = snap.load_clips([flash.clip_id])[flash.clip_id]
    assert all(v.shape[0] == 50 for v in f.values())
    assert set(np.argsort(f["video_pixels"].mean(axis=1))[-3:]) == set(on)      # the flash rows
    assert set(np.argsort(f["audio_mfcc26"][:, 0])[-3:]) == set(on)             # the beep rows (log energy)
    assert set(np.argsort(f["audio_logmel"].max(axis=1))[-3:]) == set(on)
    assert np.abs(f["video_tiny"][30] - f["video_tiny"][10]).max() > 1e-3      # the network sees the flash
    assert np.isfinite(f["audio_wav2vec2"]).all() and f["audio_wav2vec2"].std() > 0

    # The actor stage computes what the extractor computes in-process on the same crops.
    from pipeline.data import media as decode
    from pipeline.data import features

    ext = features.build_extractor("tiny", {"type": "torchscript", "uri": ts, "width": 8})
    ext.resolve()
    ext.load("cpu")
    with decode.open_video(flash.video) as video:
        crops = np.concatenate(list(video.crops()))
    np.testing.assert_allclose(f["video_tiny"], ext.frame_features(crops).astype(np.float32), atol=1e-3)

    # One clip in this process (what `reactdiff generate` runs on a new speaker), with the feature
    # set rebuilt from the manifest: the job's code path, so the snapshot's numbers.
    from pipeline.data.clip import extract_clip

    rebuilt, policy = features.feature_set_from_manifest(result.manifest)
    assert policy == {"fps": 25.0, "frames": None, "frame_tolerance": 2, "decode_chunk": 64}
    rebuilt.resolve()
    one = extract_clip(flash, rebuilt, **policy)
    assert one["num_frames"] == 50 and set(one) == {*snap.features, "num_frames"}
    for column, spec in snap.features.items():
        np.testing.assert_array_equal(np.asarray(one[column]).astype(spec.dtype), f[column].astype(spec.dtype),
                                      err_msg=column)


def test_cli_png_release_and_errors(ray_local, tmp_path, capsys):
    from jobs import cli
    from pipeline.data import synth

    root = tmp_path / "react2023"
    synth.generate(str(root), dyads=(1, 0, 0), frames=20, seed=1, release="2023")
    out = tmp_path / "snapshots"
    code = cli.main(["extract", "--data", str(root), "--out", str(out), "--json"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "published" in printed and '"processed": 2' in printed
    snap = Snapshot.latest(str(out))
    assert snap.manifest.source.release == "2023"
    clip_id = snap.clip_ids()[0]
    assert snap.load_clips([clip_id], ["video_pixels"])[clip_id]["video_pixels"].shape == (20, 1024)

    # The `ray job submit` entry point: python -m jobs.extract --config ... --set ...
    import jobs.extract

    code = cli.run_module(jobs.extract, ["--config", "extract", "--set", f"data={root}", "--set", f"out={out}",
                                         "--set", "incremental_from=latest", "--set", "frames=20"])
    assert code == 0
    resumed = Snapshot.latest(str(out))
    assert resumed.manifest.config["incremental_from"] == "latest" and resumed.manifest.config["frames"] == 20
    assert Snapshot.resolve(resumed.id, str(out)).id == resumed.id

    assert cli.main(["extract", "--data", str(root), "--out", str(out), "--feature-set", "paper"]) == 2
    assert "--model au=URI" in capsys.readouterr().err
    assert cli.main(["extract", "--data", str(tmp_path / "nothing"), "--out", str(out)]) == 2
    assert "dataset root not found" in capsys.readouterr().err

    os.makedirs(out / "20990101T000000Z-deadbeef" / "clips")         # a run that never finished
    assert Snapshot.latest(str(out)).id == resumed.id
    with pytest.raises(SnapshotError, match="incomplete"):
        Snapshot.open(str(out / "20990101T000000Z-deadbeef"))
    with pytest.raises(SnapshotError, match="not found"):
        Snapshot.open(str(out / "nope"))
    with pytest.raises(SnapshotError, match="no feature column"):
        snap.load_clips([clip_id], ["video_au"])


def test_frame_count_policy_crops_within_tolerance_and_quarantines_beyond(ray_local, synth_root, tmp_path):
    cropped = run(synth_root, tmp_path / "a", splits=["val"], frames=48)        # 50 frames, tolerance 2
    assert cropped.published and cropped.manifest.counts.clips == 2
    clip_id = cropped.snapshot.clip_ids()[0]
    arrays = cropped.snapshot.load_clips([clip_id])[clip_id]
    assert {v.shape[0] for v in arrays.values()} == {48}
    rejected = run(synth_root, tmp_path / "b", splits=["val"], frames=45, max_failure_fraction=1.0)
    assert rejected.published and rejected.manifest.counts.quarantined == 2
    assert {q.stage for q in rejected.manifest.quarantine} == {"frames"}
    assert "tolerance 2" in rejected.manifest.quarantine[0].reason
