"""Decoding one clip: decord mp4 and PNG frames to reference crops, audio to mono, errors."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import media as decode
from pipeline.data.media import ClipError
from tests.helpers.media import beep, flash_frames, write_mp4, write_pngs, write_wav


def _all_crops(video, chunk):
    return np.concatenate(list(video.crops(chunk=chunk)))


def test_mp4_crops_are_the_reference_centre_crop_in_order(tmp_path):
    frames = flash_frames(30, bright=range(7, 9))
    path = write_mp4(tmp_path / "a.mp4", frames)
    with decode.open_video(path, "mp4") as video:
        assert video.num_frames == 30 and video.fps == pytest.approx(25.0)
        crops = _all_crops(video, chunk=8)               # chunks do not divide 30: the tail counts too
    assert crops.shape == (30, 224, 224, 3) and crops.dtype == np.uint8
    # 256 -> no resize, crop rows/cols 16..239 (torchvision CenterCrop); lossy codec: close, not equal.
    expected = frames[:, 16:240, 16:240]
    assert np.abs(crops.astype(int) - expected).mean() < 3
    brightness = crops.mean(axis=(1, 2, 3))
    assert set(np.flatnonzero(brightness > 200)) == {7, 8}


def test_chunk_size_does_not_change_the_frames(tmp_path):
    path = write_mp4(tmp_path / "a.mp4", flash_frames(20, bright=range(3, 4)))
    with decode.open_video(path) as v1, decode.open_video(path) as v2:
        np.testing.assert_array_equal(_all_crops(v1, 64), _all_crops(v2, 3))


def test_non_256_video_is_resized_on_the_shorter_side_then_cropped(tmp_path):
    frames = flash_frames(4, size=(240, 320))
    with decode.open_video(write_mp4(tmp_path / "wide.mp4", frames)) as video:
        crops = _all_crops(video, 64)
    assert crops.shape == (4, 224, 224, 3)
    assert decode.resized_size(240, 320) == (256, 341)
    assert decode.center_crop_box(256, 341) == (16, 58)


def test_png_frames_decode_losslessly(tmp_path):
    frames = flash_frames(6, bright=range(2, 3))
    folder = write_pngs(tmp_path / "clip", frames)
    with decode.open_video(folder, "png") as video:
        assert video.num_frames == 6 and video.fps is None
        crops = _all_crops(video, 4)
    np.testing.assert_array_equal(crops, frames[:, 16:240, 16:240])


def test_png_gap_is_an_error(tmp_path):
    folder = write_pngs(tmp_path / "clip", flash_frames(4))
    (tmp_path / "clip" / "3.png").unlink()
    with pytest.raises(ClipError, match="not numbered"):
        decode.open_video(folder, "png")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_broken_video_raises_clip_error(tmp_path, damage):
    path = write_mp4(tmp_path / "a.mp4", flash_frames(25))
    data = open(path, "rb").read()
    if damage == "truncated":
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "garbage":
        open(path, "wb").write(b"\x00" * 4096)
    else:
        path = str(tmp_path / "nope.mp4")
    with pytest.raises(ClipError) as err:
        with decode.open_video(path) as video:
            _all_crops(video, 64)
    assert err.value.stage == "decode_video" and err.value.uri == path


def test_wav_stereo_is_averaged_to_mono_and_resampled(tmp_path):
    left = beep(10, range(2, 4), rate=16000)
    stereo = np.stack([left, np.zeros_like(left)], axis=1)
    audio = decode.read_audio(write_wav(tmp_path / "s.wav", stereo, rate=16000))
    assert audio.channels == 2 and audio.sample_rate == 16000 and audio.samples.ndim == 1
    np.testing.assert_allclose(audio.samples, left / 2, atol=1e-4)       # PCM16 quantisation
    up = decode.audio_at(audio, 44100)
    assert up.sample_rate == 44100 and up.source_rate == 16000
    assert abs(len(up.samples) - 10 * 44100 // 25) <= 1
    assert up.seconds == pytest.approx(audio.seconds, abs=1e-3)


def test_container_audio_goes_through_pyav(tmp_path):
    sound = beep(25, range(10, 15))
    path = write_mp4(tmp_path / "av.mp4", flash_frames(25), audio=sound)
    audio = decode.read_audio(path)
    assert audio.sample_rate == 44100 and audio.channels == 1
    assert abs(audio.seconds - 1.0) < 0.1                           # AAC adds priming samples
    loud = np.abs(audio.samples) > 0.25
    first = np.flatnonzero(loud)[0] / 44100
    assert 0.35 < first < 0.5                                         # the beep starts at frame 10 = 0.4 s


def test_broken_audio_raises_clip_error(tmp_path):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF....WAVEfmt nonsense")
    with pytest.raises(ClipError, match="cannot read audio") as err:
        decode.read_audio(str(bad))
    assert err.value.stage == "decode_audio"
    with pytest.raises(ClipError, match="not found"):
        decode.read_audio(str(tmp_path / "missing.wav"))


def test_fit_frames_pads_with_the_last_row_and_crops():
    x = np.arange(6, dtype=np.float32).reshape(3, 2)
    np.testing.assert_array_equal(decode.fit_frames(x, 4)[-1], x[-1])
    assert decode.fit_frames(x, 2).shape == (2, 2)
    assert decode.fit_frames(x, 3) is x


def test_png_frames_and_wav_from_s3(tmp_path, s3):
    from pipeline import storage

    frames = flash_frames(5, bright=range(4, 5))
    folder = write_pngs(tmp_path / "clip", frames)
    wav = write_wav(tmp_path / "a.wav", beep(5, range(1, 2)))
    fs, base = storage.filesystem(s3.uri("Video_files", "clip"))
    fs.put([f"{folder}/{i}.png" for i in range(1, 6)], [f"{base}/{i}.png" for i in range(1, 6)])
    storage.write_bytes(s3.uri("a.wav"), open(wav, "rb").read())
    with decode.open_video(s3.uri("Video_files", "clip"), "png") as video:
        np.testing.assert_array_equal(_all_crops(video, 2), frames[:, 16:240, 16:240])
    audio = decode.read_audio(s3.uri("a.wav"))
    assert audio.sample_rate == 44100 and len(audio.samples) == 5 * 44100 // 25
