"""`reactdiff generate --speaker-video ...`: real registry, real extraction code, real files."""

from __future__ import annotations

import json

import numpy as np

from jobs import cli
from pipeline.data import react
from pipeline.generate import render
from pipeline.generate.job import GenerateConfig, SpeakerClip, extract_speaker, generate_clip, load_model
from tests.helpers.media import write_speaker_mp4

MODEL = "models:/reactdiff@champion"
FAST = ["--samples", "3", "--steps", "2"]


def run_cli(*args: str) -> int:
    return cli.main(["generate", *args])


def test_cli_writes_react_files_plot_and_video(registry, speaker, tmp_path, capsys):
    out = tmp_path / "reactions"
    rc = run_cli("--model", MODEL, "--speaker-video", speaker.video, "--speaker-audio", speaker.audio,
                 "--speaker-attributes", speaker.emotion, "--seed", "5", "--out", str(out), *FAST)
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "3 reactions (751 frames each)" in printed and "repeat frame 749" in printed

    emotions = []
    for k in range(3):
        lines = (out / f"reaction_{k:02d}.csv").read_text().splitlines()
        assert lines[0].split(",") == list(react.EMOTION_COLUMNS)
        assert len(lines) == 1 + 751
        e = react.read_emotion(str(out / f"reaction_{k:02d}.csv"))   # the dataset reader accepts it
        assert e.shape == (751, 25)
        assert e[:, :15].min() >= 0 and e[:, :15].max() <= 1
        assert e[:, 15:17].min() >= -1 and e[:, 15:17].max() <= 1
        np.testing.assert_allclose(e[:, 17:].sum(1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(e[750], e[749])                # the padded 751st frame
        tdmm = np.load(out / f"reaction_{k:02d}.npy", allow_pickle=False)
        assert tdmm.shape == (751, 58) and tdmm.dtype == np.float32 and np.isfinite(tdmm).all()
        np.testing.assert_array_equal(tdmm[750], tdmm[749])
        emotions.append(e)
    assert np.abs(emotions[0] - emotions[1]).mean() > 1e-3           # K different reactions

    summary = json.loads((out / "generation.json").read_text())
    assert summary["model"]["name"] == "reactdiff" and summary["model"]["version"] == "1"
    assert summary["model"]["snapshot_id"] == registry.snapshot.id
    assert summary["frames"] == {"generated": 750, "written": 751, "padded": 1}
    assert summary["seed"] == 5 and summary["samples"] == 3
    assert summary["guidance"] == 1.0 and summary["decoder_dropout"] is False   # the model's own scale

    from PIL import Image

    png = Image.open(out / "reactions.png")
    pixels = np.asarray(png.convert("L"), dtype=float)
    assert png.size[0] > 1000 and png.size[1] > 800 and pixels.std() > 20

    video = out / "reaction_00.mp4"
    info = render.video_summary(str(video))
    assert info["frames"] == 751 and info["fps"] == 25.0 and info["width"] == 512 and info["audio"]
    import av

    with av.open(str(video)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for i, f in zip(range(200), c.decode(video=0))])
    speaker_half, face_half = frames[:, :256, :256].astype(float), frames[:, :256, 256:].astype(float)
    assert np.abs(np.diff(speaker_half, axis=0)).mean() > 0.5        # the speaker moves
    assert np.abs(np.diff(face_half, axis=0)).mean() > 0.5           # the generated face moves
    assert face_half.std() > 20


def test_speaker_features_equal_the_snapshot_features(registry, speaker):
    """The new-clip path runs the extraction job's code: same numbers as the snapshot's row."""
    model = load_model(MODEL)
    features, info = extract_speaker(model, SpeakerClip(speaker.video, speaker.audio))
    stored = registry.snapshot.load_clips([speaker.clip_id], list(features))[speaker.clip_id]
    assert info["frames"] == 751
    for name, values in features.items():
        spec = registry.snapshot.features[name]
        np.testing.assert_array_equal(values.astype(spec.dtype), stored[name].astype(spec.dtype), err_msg=name)


def test_same_seed_same_reactions_and_audio_from_the_container(registry, speaker, tmp_path):
    base = dict(model=MODEL, speaker_video=speaker.video, speaker_audio=speaker.audio, samples=2, steps=1,
                seed=11, plot=False, video=False)
    a = generate_clip(GenerateConfig(**base, out=str(tmp_path / "a")))
    b = generate_clip(GenerateConfig(**base, out=str(tmp_path / "b")))
    np.testing.assert_array_equal(a.emotion, b.emotion)
    np.testing.assert_array_equal(a.tdmm, b.tdmm)
    assert (tmp_path / "a" / "reaction_01.csv").read_bytes() == (tmp_path / "b" / "reaction_01.csv").read_bytes()

    # The same speaker with the wav muxed into the mp4: no --speaker-audio needed.
    muxed = tmp_path / "with_audio.mp4"
    mux_audio(speaker.video, speaker.audio, muxed)
    c = generate_clip(GenerateConfig(**{**base, "speaker_audio": None, "speaker_video": str(muxed)},
                                     out=str(tmp_path / "c")))
    assert c.summary["speaker"]["audio"] == str(muxed) and c.emotion.shape == (2, 751, 25)


def mux_audio(video: str, wav: str, out) -> None:
    """Copy the H.264 stream and add the wav as AAC (a speaker clip with its own sound)."""
    import av
    import soundfile

    samples, rate = soundfile.read(wav, dtype="float32", always_2d=True)
    with av.open(video) as src, av.open(str(out), "w") as dst:
        vin = src.streams.video[0]
        vout = dst.add_stream_from_template(vin)
        aout = dst.add_stream("aac", rate=rate)
        aout.layout = "mono"
        for packet in src.demux(vin):
            if packet.dts is None:
                continue
            packet.stream = vout
            dst.mux(packet)
        render._encode_audio(dst, aout, samples[:, 0], rate, len(samples) / rate)


# --------------------------------------------------------------------------------------------
# Errors a user can act on: clear message, exit code 1


def expect_error(capsys, *args: str, match: str) -> str:
    rc = run_cli(*args)
    err = capsys.readouterr().err
    assert rc == 1, err
    assert match in err, err
    return err


def test_unknown_model_or_alias(registry, speaker, tmp_path, capsys):
    err = expect_error(capsys, "--model", "models:/reactdiff@nosuch", "--speaker-video", speaker.video,
                       "--out", str(tmp_path), match="has no alias 'nosuch'")
    assert "@champion -> v1" in err                                   # it names what exists
    expect_error(capsys, "--model", "models:/nosuchmodel@champion", "--speaker-video", speaker.video,
                 "--out", str(tmp_path), match="no registered model named 'nosuchmodel'")
    expect_error(capsys, "--model", str(tmp_path / "missing.pt"), "--speaker-video", speaker.video,
                 "--out", str(tmp_path), match="generator file not found")


def test_video_without_a_face_sized_frame(registry, tmp_path, capsys):
    tiny = tmp_path / "tiny.mp4"
    write_speaker_mp4(tiny, frames=10, size=32)
    expect_error(capsys, "--model", MODEL, "--speaker-video", str(tiny), "--out", str(tmp_path / "o"),
                 match="32x32 pixels: no face-sized frame")
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"this is not a video" * 100)
    expect_error(capsys, "--model", MODEL, "--speaker-video", str(garbage), "--out", str(tmp_path / "o"),
                 match="garbage.mp4")
    expect_error(capsys, "--model", MODEL, "--speaker-video", str(tmp_path / "absent.mp4"),
                 "--out", str(tmp_path / "o"), match="not found")
    assert not (tmp_path / "o").exists()                               # nothing half-written


def test_audio_missing_when_the_model_listens(registry, speaker, tmp_path, capsys):
    # The synthetic mp4 has no audio stream and the small model consumes audio_mfcc26.
    expect_error(capsys, "--model", MODEL, "--speaker-video", speaker.video, "--out", str(tmp_path / "o"),
                 match="has no audio stream: pass --speaker-audio")
    expect_error(capsys, "--model", MODEL, "--speaker-video", speaker.video, "--speaker-audio",
                 str(tmp_path / "absent.wav"), "--out", str(tmp_path / "o"), match="absent.wav")


def test_clip_shorter_than_two_seconds(registry, speaker, tmp_path, capsys):
    # Issue #17: clips shorter than the model's 30-s window are generated (looped to fill it,
    # tests/generate/test_real_world_clips.py); only clips under 2 s are refused.
    short = tmp_path / "short.mp4"
    write_speaker_mp4(short, frames=40, size=96)
    expect_error(capsys, "--model", MODEL, "--speaker-video", str(short), "--speaker-audio", speaker.audio,
                 "--out", str(tmp_path / "o"), match="reactions need at least 2 s")
