"""The REACT layout reader: both releases and Emotion namings, official item order, neighbour
blocks as matrix_split.py cuts them, clear errors for broken layouts, S3 roots."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from jobs.cli import main as cli
from pipeline import storage
from pipeline.data import react
from pipeline.data import synth
from pipeline.data.react import ReactLayoutError, open_dataset

NOXI = "NoXI/001_2016-03-17_Paris"
VAL_ROWS = [
    (f"{NOXI}/Expert_video/1", f"{NOXI}/Novice_video/1"),
    ("UDIVA/talk/023102/FC1/8", "UDIVA/talk/023102/FC2/8"),
    ("RECOLA/group-1/P41/1", "RECOLA/group-1/P42/1"),
]
TRAIN_ROWS = [(f"{NOXI}/Expert_video/2", f"{NOXI}/Novice_video/2")]


# ---------------------------------------------------------------------------------------------
# Items, clips, namings


def test_items_follow_the_official_order(tmp_path, write_layout):
    write_layout(tmp_path, {"val": VAL_ROWS, "train": TRAIN_ROWS})
    ds = open_dataset(str(tmp_path))
    assert ds.splits == ["train", "val"]
    items = ds.items("val")
    assert len(items) == 2 * len(VAL_ROWS)
    assert [(i.index, i.speaker, i.listener, i.mirrored) for i in items] == (
        [(k, s, l, False) for k, (s, l) in enumerate(VAL_ROWS)]
        + [(3 + k, l, s, True) for k, (s, l) in enumerate(VAL_ROWS)])
    # Clips: csv order, speaker then listener of each row.
    assert [c.clip_id for c in ds.clips("val")] == [c for row in VAL_ROWS for c in row]
    assert [c.split for c in ds.clips()] == ["train"] * 2 + ["val"] * 6


def test_2024_layout_with_renamed_emotion_roles(tmp_path, write_layout):
    write_layout(tmp_path, {"val": VAL_ROWS}, emotion_roles="P1/P2", video="mp4")
    ds = open_dataset(str(tmp_path))
    assert ds.release == "2024" and ds.emotion_naming == "P1/P2"
    clips = {c.clip_id: c for c in ds.clips("val")}
    expert = clips[f"{NOXI}/Expert_video/1"]
    assert (expert.site, expert.session, expert.role, expert.index) == ("NoXI", "001_2016-03-17_Paris", "Expert_video", "1")
    assert expert.video_format == "mp4" and expert.video.endswith(f"val/Video_files/{NOXI}/Expert_video/1.mp4")
    assert expert.emotion.endswith(f"val/Emotion/{NOXI}/P1/1.csv")
    assert clips[f"{NOXI}/Novice_video/1"].emotion.endswith(f"val/Emotion/{NOXI}/P2/1.csv")
    assert clips["RECOLA/group-1/P41/1"].emotion.endswith("val/Emotion/RECOLA/group-1/P1/1.csv")
    assert clips["RECOLA/group-1/P42/1"].emotion.endswith("val/Emotion/RECOLA/group-1/P2/1.csv")
    assert expert.tdmm.endswith(f"val/3D_FV_files/{NOXI}/Expert_video/1.npy")
    assert expert.audio.endswith(f"val/Audio_files/{NOXI}/Expert_video/1.wav")
    assert ds.layout_problems() == []


def test_2023_layout_with_png_folders_and_original_roles(tmp_path, write_layout):
    write_layout(tmp_path, {"val": VAL_ROWS}, emotion_roles="original", video="png", frames=5)
    ds = open_dataset(str(tmp_path))
    assert ds.release == "2023" and ds.emotion_naming == "original"
    clips = {c.clip_id: c for c in ds.clips("val")}
    udiva = clips["UDIVA/talk/023102/FC1/8"]
    # Five-part UDIVA paths: the session is keyed "<session>_<task>" like data_indices.csv.
    assert (udiva.site, udiva.session, udiva.role, udiva.index) == ("UDIVA", "023102_talk", "FC1", "8")
    assert udiva.video_format == "png" and udiva.video.endswith("val/Video_files/UDIVA/talk/023102/FC1/8")
    assert ds.png_frame_numbers(udiva) == [1, 2, 3, 4, 5]
    assert clips[f"{NOXI}/Expert_video/1"].emotion.endswith(f"val/Emotion/{NOXI}/Expert_video/1.csv")
    assert clips["RECOLA/group-1/P41/1"].emotion.endswith("val/Emotion/RECOLA/group-1/P41/1.csv")
    assert ds.layout_problems() == []


def test_tdmm_shapes_and_emotion_reader(tmp_path):
    a = np.random.default_rng(0).normal(size=(7, 58)).astype(np.float32)
    np.save(tmp_path / "flat.npy", a)
    np.save(tmp_path / "squeezable.npy", a[:, None, :].astype(np.float64))
    np.testing.assert_array_equal(react.read_tdmm(str(tmp_path / "flat.npy")), a)
    np.testing.assert_array_equal(react.read_tdmm(str(tmp_path / "squeezable.npy")), a)
    np.save(tmp_path / "bad.npy", np.zeros((7, 57), np.float32))
    with pytest.raises(ReactLayoutError, match=r"bad\.npy: 3DMM array has shape \(7, 57\); expected \(T, 58\)"):
        react.read_tdmm(str(tmp_path / "bad.npy"))
    (tmp_path / "e.csv").write_text(",".join(react.EMOTION_COLUMNS) + "\n" + ",".join(["0"] * 24) + "\n")
    with pytest.raises(ReactLayoutError, match=r"e\.csv: Emotion csv rows have \[24\] columns; expected 25"):
        react.read_emotion(str(tmp_path / "e.csv"))


# ---------------------------------------------------------------------------------------------
# Neighbour matrices


def _hand_built_neighbours(root):
    # data_indices rows in another order than val.csv; "Recola" in mixed case; UDIVA keyed
    # "<session>_<task>"; row 1 (NoXI clip 2) belongs to no val row.
    (root / "data_indices.csv").write_text(
        "site,chat_index,clip_index\n"
        "Recola,group-1,1\n"                      # 0
        f"NoXI,{NOXI.split('/')[1]},2\n"          # 1
        "UDIVA,023102_talk,8\n"                   # 2
        f"NoXI,{NOXI.split('/')[1]},1\n")         # 3
    big = np.eye(8, dtype=np.float64)             # M = 4 dyads -> 8 x 8, rows 4..7 mirrored
    for i, j in [(3, 0), (0, 3), (3, 6), (7, 4), (1, 3), (2, 5)]:
        big[i, j] = 1
    np.save(root / "Approprirate_facial_reaction.npy", big)


def test_neighbours_are_cut_with_matrix_split_blocks(tmp_path, write_layout):
    write_layout(tmp_path, {"val": VAL_ROWS})
    _hand_built_neighbours(tmp_path)
    ds = open_dataset(str(tmp_path))
    # val rows map to data_indices rows [3, 2, 0]; items follow [3, 2, 0, 3+4, 2+4, 0+4].
    expected = np.array([
        [1, 0, 1, 0, 1, 0],     # big row 3: (3,3), (3,0), (3,6)
        [0, 1, 0, 0, 0, 0],     # big row 2: (2,5) is outside the split
        [1, 0, 1, 0, 0, 0],     # big row 0: (0,3), (0,0)
        [0, 0, 0, 1, 0, 1],     # big row 7: (7,7), (7,4)
        [0, 0, 0, 0, 1, 0],     # big row 6: (3,6) is not symmetric
        [0, 0, 0, 0, 0, 1],     # big row 4
    ], dtype=np.uint8)
    matrix = ds.neighbours("val")
    assert matrix.dtype == np.uint8
    np.testing.assert_array_equal(matrix, expected)
    assert ds.neighbour_source("val") == "data_indices.csv + Approprirate_facial_reaction.npy"


def test_ready_split_matrix_is_preferred_and_checked(tmp_path, write_layout):
    write_layout(tmp_path, {"val": VAL_ROWS})
    _hand_built_neighbours(tmp_path)
    np.save(tmp_path / "neighbour_emotion_val.npy", np.ones((6, 6)))
    ds = open_dataset(str(tmp_path))
    np.testing.assert_array_equal(ds.neighbours("val"), np.ones((6, 6), np.uint8))
    assert ds.neighbour_source("val") == "neighbour_emotion_val.npy"
    np.save(tmp_path / "neighbour_emotion_val.npy", np.ones((4, 4)))
    with pytest.raises(ReactLayoutError, match=r"neighbour_emotion_val\.npy: shape \(4, 4\) does not match val\.csv"):
        open_dataset(str(tmp_path)).neighbours("val")


def test_no_neighbour_files_means_none(tmp_path, write_layout):
    write_layout(tmp_path, {"val": VAL_ROWS})
    ds = open_dataset(str(tmp_path))
    assert ds.neighbours("val") is None and ds.neighbour_source("val") is None
    assert ds.mean_face() is None


def test_speaker_missing_from_data_indices_names_both_files(tmp_path, write_layout):
    write_layout(tmp_path, {"val": VAL_ROWS + [("NoXI/999_x/Expert_video/1", "NoXI/999_x/Novice_video/1")]})
    _hand_built_neighbours(tmp_path)
    with pytest.raises(ReactLayoutError, match=r"val\.csv row 4: speaker 'NoXI/999_x/Expert_video/1'.*data_indices\.csv"):
        open_dataset(str(tmp_path)).neighbours("val")


# ---------------------------------------------------------------------------------------------
# Broken layouts


def test_missing_root_or_split_csvs(tmp_path, write_layout):
    with pytest.raises(ReactLayoutError, match="dataset root not found"):
        open_dataset(str(tmp_path / "nope"))
    (tmp_path / "val").mkdir()
    with pytest.raises(ReactLayoutError, match=r"no split csv \(expected train\.csv, val\.csv"):
        open_dataset(str(tmp_path))
    write_layout(tmp_path, {"val": VAL_ROWS})
    ds = open_dataset(str(tmp_path))
    with pytest.raises(ReactLayoutError, match=r"test\.csv: no test split \(split csvs found: val\)"):
        ds.items("test")


@pytest.mark.parametrize("bad", ["../../../etc/passwd/x", "/etc/NoXI/a/1", "NoXI/../../../x",
                                 "NoXI//Expert_video/1", "s3://other-bucket/a/b/c", "NoXI\\..\\..\\x\\1"])
def test_paths_escaping_the_root_are_rejected(tmp_path, bad):
    (tmp_path / "val.csv").write_text(f"idx,speaker_path,listener_path\n0,{NOXI}/Expert_video/1,{NOXI}/Novice_video/1\n"
                                      f"1,{bad},{NOXI}/Novice_video/2\n")
    with pytest.raises(ReactLayoutError, match=r"val\.csv line 3: clip path .*(escape|absolute)") as err:
        open_dataset(str(tmp_path))
    assert err.value.uri.endswith("val.csv line 3")


def test_malformed_csv_row_names_the_line(tmp_path):
    (tmp_path / "train.csv").write_text("idx,speaker_path,listener_path\n0,NoXI/a/Expert_video\n")
    with pytest.raises(ReactLayoutError, match=r"train\.csv line 2: expected idx, speaker_path, listener_path"):
        open_dataset(str(tmp_path))
    (tmp_path / "train.csv").write_text("idx,speaker_path,listener_path\n0,NoXI/a/1,NoXI/a/Novice_video/1\n")
    with pytest.raises(ReactLayoutError, match=r"train\.csv line 2: clip path 'NoXI/a/1' should look like"):
        open_dataset(str(tmp_path))


def test_missing_folder_and_missing_file_are_problems_not_crashes(tmp_path, write_layout):
    write_layout(tmp_path, {"val": VAL_ROWS})
    shutil.rmtree(tmp_path / "val" / "Audio_files")
    missing = tmp_path / "val" / "3D_FV_files" / "RECOLA/group-1/P42/1.npy"
    missing.unlink()
    ds = open_dataset(str(tmp_path))
    problems = {(p.uri, p.reason.split(" (")[0]) for p in ds.problems()}
    assert (str(tmp_path / "val" / "Audio_files"), "missing Audio_files folder") in problems
    assert (str(missing), "missing 3D_FV_files file") in problems
    assert len(problems) == 2                       # one folder problem, not one per clip
    assert ds.clip("RECOLA/group-1/P42/1").tdmm is None
    assert ds.complete_dyads(ds.problems()) == {"val": 0}
    with pytest.raises(ReactLayoutError, match="no usable dyad among 3 csv rows"):
        ds.validate()


def test_broken_files_are_named_with_the_reason(synth_2024, copy_dataset):
    root = copy_dataset(synth_2024[0])
    ds = open_dataset(str(root))
    clips = ds.clips("train")
    np.save(clips[0].tdmm, np.zeros((60, 57), np.float32))                   # wrong 3DMM width
    text = open(clips[1].emotion).read().splitlines()
    open(clips[1].emotion, "w").write("\n".join(r.rsplit(",", 1)[0] for r in text) + "\n")  # 24 columns
    open(clips[2].emotion, "w").write("\n".join(text[:51]) + "\n")           # 50 frames instead of 60
    storage.write_bytes(clips[3].video, b"\x00" * 100)                       # corrupt mp4
    problems = open_dataset(str(root)).problems(contents=True)
    by_uri = {}
    for p in problems:
        by_uri.setdefault(p.uri, []).append(p.reason)
    assert any("3DMM array has shape (60, 57)" in r for r in by_uri[clips[0].tdmm])
    assert any("rows have [24] columns; expected 25" in r for r in by_uri[clips[1].emotion])
    assert any(r.startswith("50 frames, but the clip's other files have 60") for r in by_uri[clips[2].emotion])
    assert any("cannot read video container" in r or "unreadable" in r for r in by_uri[clips[3].video])
    assert {p.clip_id for p in problems} == {c.clip_id for c in clips[:4]}
    assert open_dataset(str(root)).complete_dyads(problems) == {"train": 0, "val": 1, "test": 1}


def test_inspect_exit_codes(synth_2024, copy_dataset, tmp_path, capsys):
    root = copy_dataset(synth_2024[0])
    assert cli(["inspect", "--data", str(root)]) == 0
    out = capsys.readouterr().out
    assert "frames per clip: 60 (all 8 clips)" in out and "usable: complete dyads train 2/2, val 1/1, test 1/1" in out
    assert "train  RECOLA      1      2" in out
    assert cli(["inspect", "--data", str(root), "--frames", "751", "--strict"]) == 1   # REACT length expected
    assert "clip has 60 frames; expected 751" in capsys.readouterr().out
    clip = open_dataset(str(root)).clips("val")[0]
    (root / "val" / "Audio_files").rename(root / "val" / "Audio_gone")
    assert cli(["inspect", "--data", str(root)]) == 0                      # per-clip problems: still usable
    out = capsys.readouterr().out
    assert "problems (1):" in out and "val/Audio_files: missing Audio_files folder" in out   # not one per clip
    assert cli(["inspect", "--data", str(root), "--strict"]) == 1
    storage.remove(clip.tdmm)
    for split in ("train", "test"):
        shutil.rmtree(root / split / "Video_files")
    assert cli(["inspect", "--data", str(root), "--quick"]) == 1              # no complete dyad left
    assert "unusable: no complete dyad" in capsys.readouterr().err
    assert cli(["inspect", "--data", str(tmp_path / "empty")]) == 1
    assert "dataset root not found" in capsys.readouterr().err


def test_missing_mean_face_is_said_by_inspect_and_the_extraction_report(synth_2024, copy_dataset, capsys):
    """Without mean_face.npy the 3DMM targets stay absolute: say so instead of training silently."""
    from pipeline.data.extract import format_report
    from pipeline.data.snapshot import Manifest

    root = copy_dataset(synth_2024[0])
    assert cli(["inspect", "--data", str(root)]) == 0
    assert "warning: the dataset root has no mean_face.npy" not in capsys.readouterr().out
    (root / react.MEAN_FACE).unlink()
    assert cli(["inspect", "--data", str(root)]) == 0
    assert "mean_face.npy: no" in (out := capsys.readouterr().out) and "3DMM targets stay absolute" in out
    manifest = {"id": "s", "feature_set": {"name": "demo", "hash": "0" * 16}, "clips": {}, "splits": {},
                "counts": {"clips": 1, "processed": 1, "carried": 0, "quarantined": 0, "considered": 1},
                "timings": {"total_s": 1.0, "pipeline_s": 1.0, "frames_per_s": 1.0},
                "bytes": {"per_clip_mean": 1.0, "total": 1.0}, "resources": {"peak_worker_rss_mb": 1.0},
                "quarantine": [], "mean_face": False}
    report = format_report(Manifest.from_json(manifest), True, 0.5)
    assert "no mean_face.npy" in report
    assert "no mean_face.npy" not in format_report(Manifest.from_json({**manifest, "mean_face": True}), True, 0.5)


# ---------------------------------------------------------------------------------------------
# Object storage


def test_reads_2024_and_2023_layouts_from_s3(s3, capsys):
    for release, frames in (("2024", 30), ("2023", 8)):
        uri = s3.uri(f"react{release}")
        synth.generate(uri, dyads=(1, 1, 1), frames=frames, seed=1, release=release)
        ds = open_dataset(uri)
        assert ds.release == release and ds.splits == ["train", "val", "test"]
        clips = ds.clips()
        assert len(clips) == 6 and all(c.video.startswith("s3://") for c in clips)
        assert all(None not in (c.video, c.audio, c.emotion, c.tdmm) for c in clips)
        probes = ds.probe_all(clips, workers=4)
        assert {p.video_frames for p in probes} == {frames} and not any(p.problems for p in probes)
        assert {p.audio_rate for p in probes} == {44100}
        assert ds.problems(contents=True) == []
        assert ds.neighbours("val").shape == (2, 2) and ds.mean_face().shape == (58,)
        assert react.read_tdmm(clips[0].tdmm).shape == (frames, 58)
        assert cli(["inspect", "--data", uri]) == 0
    assert "release 2023 (PNG frame folders)" in capsys.readouterr().out
