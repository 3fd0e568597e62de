"""Extraction repairs what it can (issue #17 item 3): a REACT clip whose video has another frame
rate is resampled by timestamps, a video a few frames short of its labels (<= max_pad_fraction)
is padded with its last frame — each with a warning in the manifest; beyond that, quarantine."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import react
from pipeline.data.clip import ClipPlan, clip_row, decode_clip
from pipeline.data.extract import ExtractConfig, extract, feature_policy
from pipeline.data.features import load_feature_set
from pipeline.data.media import ClipError
from tests.helpers.media import flash_frames, write_mp4

FRAMES = 251                       # 2 % of it: 5 frames


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Four REACT clips of 251 frames: one at 30 fps, one 5 frames short, one 11 short, one intact."""
    from pipeline.data import synth

    root = tmp_path_factory.mktemp("repair") / "react"
    synth.generate(str(root), dyads=(2, 0, 0), frames=FRAMES, seed=4)
    clips = react.open_dataset(str(root)).clips()
    fps30, short, too_short, intact = clips[:4]
    # The same 10.04 s at 30 fps (a bright flash at 4 s), 5 and 11 frames short at 25 fps.
    write_mp4(fps30.video, flash_frames(round(FRAMES * 30 / 25), bright=range(120, 126)), fps=30)
    write_mp4(short.video, flash_frames(FRAMES - 5))
    write_mp4(too_short.video, flash_frames(FRAMES - 11))
    return {"root": str(root), "fps30": fps30, "short": short, "too_short": too_short, "intact": intact}


def plan(**kw) -> ClipPlan:
    features = load_feature_set("demo")
    features.resolve()
    return ClipPlan(features, **{"max_pad_fraction": 0.02, **kw})


def test_a_30fps_video_is_resampled_by_timestamps(dataset):
    out = decode_clip(clip_row(dataset["fps30"]), plan())
    assert out["num_frames"] == FRAMES
    assert "30 fps: resampled to 25 fps" in out["warnings"]
    bright = np.flatnonzero(out["video_pixels"].astype(np.float32).mean(axis=1) > 0.5)
    assert bright.min() == 100 and bright.max() == 104              # the flash at 4.0-4.2 s, now at 25 fps


def test_a_video_a_few_frames_short_is_padded_beyond_it_is_refused(dataset):
    out = decode_clip(clip_row(dataset["short"]), plan())
    assert out["num_frames"] == FRAMES and "padded by repeating its last frame 5 time(s)" in out["warnings"]
    np.testing.assert_array_equal(out["video_pixels"][-1], out["video_pixels"][FRAMES - 6])
    with pytest.raises(ClipError, match=f"video has {FRAMES - 11} frames"):
        decode_clip(clip_row(dataset["too_short"]), plan())
    with pytest.raises(ClipError, match=f"video has {FRAMES - 5} frames"):       # max_pad_fraction=0: as before
        decode_clip(clip_row(dataset["short"]), plan(max_pad_fraction=0.0))


def test_the_manifest_records_the_repairs(ray_local, dataset, tmp_path):
    result = extract(ExtractConfig(data=dataset["root"], out=str(tmp_path / "snapshots"), max_failure_fraction=0.5))
    m = result.manifest
    assert result.published
    clips = m.clips
    assert clips[dataset["fps30"].clip_id].warnings[0].startswith("video is 30 fps: resampled to 25 fps")
    assert "padded" in clips[dataset["short"].clip_id].warnings[0]
    assert clips[dataset["short"].clip_id].num_frames == FRAMES
    assert clips[dataset["intact"].clip_id].warnings == []
    assert [(q.clip_id, q.stage) for q in m.quarantine] == [(dataset["too_short"].clip_id, "frames")]
    assert any("2 clip(s) repaired" in w for w in m.warnings)


def test_face_crop_for_datasets_whose_videos_are_not_face_crops(tmp_path):
    """ExtractConfig.face_crop: the tracked face, not the whole frame, reaches the extractors."""
    from tests.helpers.media import moving_face_frames, write_recording

    frames, _ = moving_face_frames(50, size=(240, 320), side=140)
    clip = react.Clip(clip_id="webcam", split="train", site="", session="", role="", index="",
                      video=write_recording(tmp_path / "webcam.mp4", frames, fps=30), video_format="mp4",
                      audio=None, emotion=None, tdmm=None)
    features = load_feature_set("demo")
    features.extractors = [e for e in features.extractors if e.kind == "facial"]
    features.resolve()
    cropped = decode_clip(clip_row(clip), ClipPlan(features, face_crop=True))
    whole = decode_clip(clip_row(clip), ClipPlan(features))
    assert cropped["num_frames"] == whole["num_frames"] == 42                 # 50 frames at 30 fps -> 25 fps
    assert np.abs(cropped["video_pixels"].astype(np.float32) - whole["video_pixels"].astype(np.float32)).mean() > 0.05
    nobody = react.Clip(clip_id="nobody", split="train", site="", session="", role="", index="",
                        video=write_recording(tmp_path / "nobody.mp4", flash_frames(30, size=(240, 320))),
                        video_format="mp4", audio=None, emotion=None, tdmm=None)
    with pytest.raises(ClipError, match="no face found"):
        decode_clip(clip_row(nobody), ClipPlan(features, face_crop=True))


def test_face_cropping_is_part_of_the_feature_set_hash():
    """A cropped snapshot must never carry clips over from an uncropped one (incremental runs
    compare hashes); leaving it off keeps the hashes of existing snapshots."""
    features = load_feature_set("demo")
    plain, cropped = (features.hash(**feature_policy(ExtractConfig(data="d", face_crop=crop))) for crop in (False, True))
    assert plain == features.hash(fps=25.0, frames=None) and cropped != plain
