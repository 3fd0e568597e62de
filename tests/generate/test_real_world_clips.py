"""`reactdiff generate` on recordings as people make them (issue #17): 30 fps webcam clips with
AAC inside the mp4, variable frame rate with Opus, a phone's portrait clip with rotation
metadata, 5-s and 70-s clips, the face off centre and moving — every file written here by PyAV,
the face a real photo (scikit-image's astronaut)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jobs import cli
from pipeline.data import face_crop, media
from pipeline.generate import render
from reactdiff.windows import crossfade_weights, windows
from tests.helpers.media import beep, flash_frames, moving_face_frames, write_recording, write_wav

MODEL = "models:/reactdiff@champion"
FAST = ["--samples", "2", "--steps", "1"]


def generate(tmp_path, video, *args: str) -> dict:
    out = tmp_path / "out"
    rc = cli.main(["generate", "--model", MODEL, "--speaker-video", str(video), "--out", str(out), *FAST, *args])
    assert rc == 0
    return json.loads((out / "generation.json").read_text())


def expect_error(capsys, video, *args: str, match: str) -> str:
    rc = cli.main(["generate", "--model", MODEL, "--speaker-video", str(video), *FAST, *args])
    err = capsys.readouterr().err
    assert rc == 1, err
    assert match in err, err
    return err


def wav(tmp_path, frames: int, fps: float = 25) -> str:
    """A separate audio file as long as a clip of ``frames`` frames (``--speaker-audio``)."""
    return write_wav(tmp_path / "speaker.wav", beep(int(frames), range(5, 25), rate=16000, fps=fps), rate=16000)


def rows(tmp_path, k: int = 0) -> int:
    return len((tmp_path / "out" / f"reaction_{k:02d}.csv").read_text().splitlines()) - 1


def test_webcam_clip_30fps_with_aac_and_the_face_off_centre(registry, tmp_path):
    seconds, fps = 6, 30
    frames, centres = moving_face_frames(seconds * fps, size=(240, 320), side=140, amplitude=(30, 10))
    video = write_recording(tmp_path / "webcam.mp4", frames, fps=fps,
                            audio=beep(seconds * fps, range(30, 90), rate=48000, fps=fps), rate=48000)
    s = generate(tmp_path, video)
    assert s["speaker"]["video_fps"] == 30.0 and s["speaker"]["audio"] == video    # sound from the mp4
    assert s["frames"]["written"] == seconds * 25 == rows(tmp_path)                # resampled to 25 fps
    assert s["face"]["mode"] == "detected" and s["face"]["found"] >= 0.8 * s["face"]["searched"]
    assert s["face"]["smoothed_jitter_px"] < s["face"]["jitter_px"]
    info = render.video_summary(str(tmp_path / "out" / "reaction_00.mp4"))
    assert info["frames"] == seconds * 25 and info["audio"]


def test_the_crop_follows_the_face_without_jitter(tmp_path):
    frames, centres = moving_face_frames(150, size=(240, 320), side=140, amplitude=(30, 10))
    video = write_recording(tmp_path / "moving.mp4", frames, fps=25)
    recording, report = face_crop.open_face_video(video, 25)
    boxes = recording.boxes
    assert boxes.shape == (150, 3) and report["found"] >= 0.8 * report["searched"]
    crop_centres = boxes[:, :2] + boxes[:, 2:3] / 2
    error = crop_centres - centres
    # The face sits a few pixels below the pasted photo's centre (its hair): a constant offset.
    assert np.abs(error.mean(axis=0)).max() < 20
    assert np.linalg.norm(error - error.mean(axis=0), axis=1).max() < 8       # it follows the face
    steps = np.abs(np.diff(boxes, axis=0))
    assert steps[:, 2].max() <= 2 and steps[:, :2].max() <= 4                   # no shaking box
    crops = np.concatenate(list(recording.crops(64)))
    assert crops.shape == (150, media.CROP, media.CROP, 3)
    assert len(face_crop.FaceDetector().detect(crops[75])) >= 1                 # the crop holds the face


def test_variable_frame_rate_2997_with_opus_stereo(registry, tmp_path):
    n = 120
    frames, _ = moving_face_frames(n, size=(240, 320), side=140)
    gaps = np.random.default_rng(1).uniform(0.6, 1.4, n - 1) / 29.97
    times = np.concatenate([[0.0], np.cumsum(gaps)])
    audio = beep(n, range(20, 60), rate=48000, fps=30, channels=2)
    video = write_recording(tmp_path / "vfr.mp4", frames, fps=29.97, times=times, audio=audio,
                            audio_codec="libopus")
    timeline = media.video_timeline(video)
    assert timeline.variable
    np.testing.assert_allclose(timeline.pts, times, atol=1e-3)
    expected = len(timeline.resample(25))
    assert abs(expected - round(timeline.seconds * 25)) <= 1
    s = generate(tmp_path, video)
    assert s["frames"]["written"] == expected == rows(tmp_path)


def test_portrait_phone_clip_with_rotation_metadata(registry, tmp_path):
    upright, _ = moving_face_frames(75, size=(320, 180), side=120, amplitude=(10, 20))
    stored = np.ascontiguousarray(np.rot90(upright, k=-1, axes=(1, 2)))        # the sensor's landscape
    video = write_recording(tmp_path / "phone.mp4", stored, fps=30, rotation=90,
                            audio=beep(75, range(10, 40), rate=44100, fps=30), rate=44100)
    timeline = media.video_timeline(video)
    assert (timeline.rotation, timeline.height, timeline.width) == (90, 320, 180)
    s = generate(tmp_path, video)
    assert s["speaker"]["video_size"] == [180, 320]
    assert s["face"]["mode"] == "detected" and s["face"]["found"] >= 1        # upright: the face is found


def test_five_second_clip_is_looped_to_the_window_and_cut_back(registry, tmp_path):
    frames, _ = moving_face_frames(125, size=(240, 320), side=140)
    video = write_recording(tmp_path / "five.mp4", frames, fps=25,
                            audio=beep(125, range(10, 40), rate=22050, fps=25), rate=22050, audio_codec="libmp3lame")
    s = generate(tmp_path, video)
    assert s["frames"] == {"generated": 125, "written": 125, "padded": 0} and rows(tmp_path) == 125
    assert any("looped" in n for n in s["notes"])
    assert render.video_summary(str(tmp_path / "out" / "reaction_00.mp4"))["frames"] == 125


def test_seventy_second_clip_gets_reactions_for_every_frame_without_seams(registry, tmp_path):
    n = 70 * 25
    frames, _ = moving_face_frames(n, size=(120, 160), side=90, amplitude=(10, 4))
    audio = beep(n, range(100, 900), rate=16000, fps=25)
    video = write_recording(tmp_path / "long.mp4", frames, fps=25, audio=audio, rate=16000)
    s = generate(tmp_path, video, "--no-plot")
    assert s["frames"]["written"] == n == rows(tmp_path)
    assert any("cross-faded" in note for note in s["notes"])
    assert render.video_summary(str(tmp_path / "out" / "reaction_00.mp4"))["frames"] == n
    e = np.loadtxt(tmp_path / "out" / "reaction_00.csv", delimiter=",", skiprows=1)
    steps = np.abs(np.diff(e[:, 15:17], axis=0)).max(axis=1)                   # valence/arousal
    for start in windows(n, 750, 150)[1:]:                                      # at each window's edges
        for seam in (start, start + 150):
            assert steps[seam - 1] <= 3 * np.percentile(steps, 99) + 1e-6


def test_windows_cover_the_clip_and_cross_fade_weights():
    assert windows(751, 750, 150) == [0] and windows(750, 750, 150) == [0]
    starts = windows(1750, 750, 150)
    assert starts == [0, 600, 1000] and starts[-1] + 750 == 1750
    w = crossfade_weights(starts, 750, 150)
    assert w.min() > 0 and w[0, 0] == 1 and w[-1, -1] == 1
    cover = np.zeros(1750)
    for s, row in zip(starts, w):
        cover[s:s + 750] += row
    assert cover.min() > 0.99


def test_resampling_by_timestamps():
    t = media.Timeline(np.arange(90) / 30, 3.0, 0, 64, 64)
    index = t.resample(25)
    assert len(index) == 75 and index[0] == 0 and index[-1] == 88       # on screen at 2.96 s
    assert (np.diff(index) >= 1).all() and (np.diff(index) <= 2).all()
    same = media.Timeline(np.arange(50) / 25, 2.0, 0, 64, 64)
    np.testing.assert_array_equal(same.resample(25), np.arange(50))


def test_face_box_overrides_detection(registry, tmp_path):
    frames = flash_frames(60, size=(240, 320))       # no face at all: the user says where it is
    video = write_recording(tmp_path / "nobody.mp4", frames, fps=25)
    s = generate(tmp_path, video, "--speaker-audio", wav(tmp_path, 60), "--face-box", "100,40,120,120", "--no-video")
    assert s["face"] == {"mode": "face-box", "face_box": [100, 40, 120, 120]}


def test_clip_without_a_face(registry, tmp_path, capsys):
    video = write_recording(tmp_path / "nobody.mp4", flash_frames(60, size=(240, 320)), fps=25)
    err = expect_error(capsys, video, "--speaker-audio", wav(tmp_path, 60), "--out", str(tmp_path / "o"),
                       match="nobody.mp4")
    assert "no face found" in err and "Haar" in err and "--face-box" in err
    assert not (tmp_path / "o").exists()


def test_recording_without_audio_and_no_speaker_audio(registry, tmp_path, capsys):
    frames, _ = moving_face_frames(60, size=(240, 320), side=140)
    video = write_recording(tmp_path / "silent.mp4", frames, fps=30)
    expect_error(capsys, video, "--out", str(tmp_path / "o"), match="silent.mp4 has no audio stream: pass --speaker-audio")


def test_clip_shorter_than_two_seconds(registry, tmp_path, capsys):
    frames, _ = moving_face_frames(45, size=(240, 320), side=140)
    video = write_recording(tmp_path / "blink.mp4", frames, fps=30)
    expect_error(capsys, video, "--speaker-audio", wav(tmp_path, 45, 30), "--out", str(tmp_path / "o"),
                 match="reactions need at least 2 s")


@pytest.mark.slow
def test_forty_second_640x480_webcam_clip_side_by_side_over_its_whole_length(registry, tmp_path):
    seconds, fps = 40, 30
    frames, _ = moving_face_frames(seconds * fps, size=(480, 640), side=200)
    video = write_recording(tmp_path / "webcam40.mp4", frames, fps=fps,
                            audio=beep(seconds * fps, range(100, 600), rate=44100, fps=fps), rate=44100)
    s = generate(tmp_path, video)
    assert s["frames"]["written"] == 1000 == rows(tmp_path)
    out = tmp_path / "out" / "reaction_00.mp4"
    assert render.video_summary(str(out))["frames"] == 1000
    import av

    with av.open(str(out)) as c:   # the speaker half holds the face crop on every second of the clip
        halves = [f.to_ndarray(format="rgb24")[:256, :256] for i, f in enumerate(c.decode(video=0)) if i % 100 == 0]
    detector = face_crop.FaceDetector()
    assert sum(len(detector.detect(h)) > 0 for h in halves) >= 0.8 * len(halves)
