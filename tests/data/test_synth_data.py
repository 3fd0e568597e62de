"""The synthetic REACT generator: real media files, label formats, a learnable one-to-many
reaction, neighbours consistent with how speakers were drawn, determinism, re-runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile

from jobs.cli import main as cli
from pipeline.data import react
from pipeline.data import synth
from pipeline.data.react import EMOTION_COLUMNS, open_dataset


def test_synth_output_passes_inspect(tmp_path, capsys):
    out = str(tmp_path / "data")
    assert cli(["synth", "--out", out, "--dyads", "2,1,1", "--frames", "40", "--seed", "5"]) == 0
    assert "8 person clips" in capsys.readouterr().out
    assert cli(["inspect", "--data", out, "--frames", "40", "--strict"]) == 0
    report = capsys.readouterr().out
    assert "frames per clip: 40 (all 8 clips)" in report
    assert "video: 25 fps (all 8 clips); 256x256 (all 8 clips)" in report
    assert "usable: complete dyads train 2/2, val 1/1, test 1/1" in report
    assert cli(["synth", "--out", out, "--dyads", "2,1,1", "--frames", "40", "--seed", "5"]) == 0
    assert "already complete" in capsys.readouterr().out
    with pytest.raises(SystemExit):                                   # argparse rejects the counts
        cli(["synth", "--out", out, "--dyads", "2,x"])


def test_mp4_decodes_with_decord_at_25_fps(synth_2024):
    import decord

    ds = open_dataset(str(synth_2024[0]))
    for clip in ds.clips():
        vr = decord.VideoReader(clip.video, num_threads=1)
        assert len(vr) == 60 and vr.get_avg_fps() == pytest.approx(25.0)
        frames = vr.get_batch([0, 30, 59]).asnumpy()
        assert frames.shape == (3, 256, 256, 3)
        assert frames[0].std() > 20                          # a drawn face, not a flat image
        assert np.abs(frames[0].astype(int) - frames[2]).mean() > 0.5   # and it moves


def test_wav_is_44k1_mono_and_loudness_follows_the_mouth(synth_2024):
    ds = open_dataset(str(synth_2024[0]))
    for clip in ds.clips():
        info = soundfile.info(clip.audio)
        assert (info.samplerate, info.channels, info.frames) == (44100, 1, 60 * 1764)
    speaker = ds.clips("train")[0]
    audio, _ = soundfile.read(speaker.audio)
    rms = np.sqrt((audio.reshape(60, 1764) ** 2).mean(1))
    jaw = react.read_tdmm(speaker.tdmm)[:, 57]          # translation z moves with the mouth opening
    assert np.corrcoef(rms, jaw)[0, 1] > 0.9
    listener, _ = soundfile.read(ds.clips("train")[1].audio)
    assert np.sqrt((listener ** 2).mean()) < 0.5 * np.sqrt((audio ** 2).mean())   # listeners mostly listen


def test_label_files_have_the_react_formats(synth_2024, synth_2023):
    ds = open_dataset(str(synth_2024[0]))
    for clip in ds.clips():
        header = open(clip.emotion).readline().strip().split(",")
        assert header == list(EMOTION_COLUMNS)
        emotion = react.read_emotion(clip.emotion)
        assert emotion.shape == (60, 25)
        assert set(np.unique(emotion[:, :15])) <= {0.0, 1.0}
        assert np.abs(emotion[:, 15:17]).max() <= 1.0
        np.testing.assert_allclose(emotion[:, 17:].sum(1), 1.0, atol=1e-4)
        assert (emotion[:, 17:] >= 0).all()
        raw = np.load(clip.tdmm)
        assert raw.shape == (60, 58) and raw.dtype == np.float32
    assert ds.mean_face().shape == (58,)
    ds23 = open_dataset(str(synth_2023[0]))
    assert {np.load(c.tdmm).shape for c in ds23.clips()} == {(60, 1, 58)}


def test_2023_release_has_png_folders_udiva_and_original_roles(synth_2023):
    from PIL import Image

    ds = open_dataset(str(synth_2023[0]))
    assert ds.release == "2023" and ds.emotion_naming == "original"
    clips = ds.clips()
    assert {c.site for c in clips} == {"NoXI", "RECOLA", "UDIVA"}
    for clip in clips:
        assert ds.png_frame_numbers(clip) == list(range(1, 61))
        assert "/P1/" not in clip.emotion and "/P2/" not in clip.emotion
    first = Image.open(Path(clips[0].video) / "1.png")
    assert first.size == (256, 256) and first.mode == "RGB"
    assert ds.problems(contents=True) == []


def test_neighbours_are_the_speaker_prototypes(synth_2024):
    root, summary = synth_2024
    ds = open_dataset(str(root))
    for split in ds.splits:
        truth = {(t["speaker"], t["listener"]): t for t in summary.truth if t["split"] == split}
        classes = []
        for item in ds.items(split):
            t = truth[(item.listener, item.speaker) if item.mirrored else (item.speaker, item.listener)]
            classes.append(("listener", t["prototype"], t["style"]) if item.mirrored else ("speaker", t["prototype"]))
        expected = np.array([[a == b for b in classes] for a in classes], np.uint8)
        np.testing.assert_array_equal(ds.neighbours(split), expected)


def test_one_speaker_behaviour_has_several_appropriate_reactions(tmp_path):
    """Same prototype -> similar speakers; different styles -> different lagged reactions."""
    summary = synth.generate(str(tmp_path / "d"), dyads=(6, 0, 0), frames=250, seed=2, workers=1)
    ds = open_dataset(str(tmp_path / "d"))
    valence = {c.clip_id: react.read_emotion(c.emotion)[:, 15] for c in ds.clips()}
    tdmm = {c.clip_id: react.read_tdmm(c.tdmm) for c in ds.clips()}
    by_proto: dict[int, list[dict]] = {}
    for t in summary.truth:
        by_proto.setdefault(t["prototype"], []).append(t)
    assert all(len(v) == 2 for v in by_proto.values())
    for a, b in by_proto.values():
        assert a["style"] != b["style"]
        assert np.corrcoef(valence[a["speaker"]], valence[b["speaker"]])[0, 1] > 0.7
        assert np.abs(tdmm[a["listener"]] - tdmm[b["listener"]])[:, :52].mean() > 0.05
    for t in summary.truth:
        if t["style"] == "mirror":       # the listener copies the speaker, lag frames later
            s, l, lag = valence[t["speaker"]], valence[t["listener"]], t["lag"]
            assert np.corrcoef(s[:-lag], l[lag:])[0, 1] > 0.8
    np.testing.assert_array_equal(ds.neighbours("train").diagonal(), 1)


def _files(root: Path, suffixes) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.suffix in suffixes}


def test_same_seed_same_data_whatever_the_worker_count(tmp_path):
    import decord

    kwargs = dict(dyads=(1, 0, 1), frames=30, seed=7)
    synth.generate(str(tmp_path / "a"), workers=1, **kwargs)
    synth.generate(str(tmp_path / "b"), workers=2, **kwargs)
    synth.generate(str(tmp_path / "c"), workers=1, **{**kwargs, "seed": 8})
    a, b, c = (_files(tmp_path / x, {".csv", ".npy", ".wav"}) for x in "abc")
    assert a.keys() == b.keys() and len(a) == 4 * 3 + 6          # 4 clips x (csv, npy, wav) + root files
    assert all(a[k] == b[k] for k in a)
    assert all(a[k] != c[k] for k in a if "3D_FV_files" in k)       # another seed, other behaviour
    for rel in _files(tmp_path / "a", {".mp4"}):
        fa = decord.VideoReader(str(tmp_path / "a" / rel)).get_batch(list(range(30))).asnumpy()
        fb = decord.VideoReader(str(tmp_path / "b" / rel)).get_batch(list(range(30))).asnumpy()
        np.testing.assert_array_equal(fa, fb)


def test_reruns_and_foreign_folders(tmp_path):
    out = tmp_path / "d"
    first = synth.generate(str(out), dyads=(1, 0, 0), frames=10)
    assert not first.skipped and first.clips == 2
    assert synth.generate(str(out), dyads=(1, 0, 0), frames=10).skipped
    with pytest.raises(synth.SynthError, match="other parameters"):
        synth.generate(str(out), dyads=(1, 0, 0), frames=12)
    (out / "synthetic.json").unlink()                               # an interrupted run: redone
    assert not synth.generate(str(out), dyads=(1, 0, 0), frames=12).skipped
    assert len(open_dataset(str(out)).items("train")) == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(synth.SynthError, match="not empty"):
        synth.generate(str(foreign), dyads=(1, 0, 0), frames=10)
    synth.generate(str(foreign), dyads=(1, 0, 0), frames=10, overwrite=True)
    assert (foreign / "notes.txt").read_text() == "mine"            # --overwrite only touches its own files
    with pytest.raises(ValueError, match="three non-negative counts"):
        synth.generate(str(tmp_path / "e"), dyads=(0, 0, 0))


def test_backchannel_behaviour_is_another_learnable_generator(tmp_path, capsys):
    """The second behaviour model: speaker groups define appropriateness, listeners smile and
    nod while the partner talks (lag frames later), and the data pass inspect like the first."""
    out = tmp_path / "b"
    assert cli(["synth", "--out", str(out), "--dyads", "8,0,0", "--frames", "250", "--seed", "3",
                "--behaviour", "backchannel", "--workers", "1"]) == 0
    assert cli(["inspect", "--data", str(out), "--frames", "250", "--strict"]) == 0
    capsys.readouterr()
    ds = open_dataset(str(out))
    truth = {(t["speaker"], t["listener"]): t for t in synth.generate(str(out), dyads=(8, 0, 0), frames=250,
                                                                     seed=3, behaviour="backchannel").truth}
    assert {t["style"] for t in truth.values()} == {"backchannel"} and len({t["prototype"] for t in truth.values()}) == 4
    groups = [("listener" if i.mirrored else "speaker",
               truth[(i.listener, i.speaker) if i.mirrored else (i.speaker, i.listener)]["prototype"])
              for i in ds.items("train")]
    np.testing.assert_array_equal(ds.neighbours("train"), np.array([[a == b for b in groups] for a in groups], np.uint8))
    # The listener's mouth stays near closed and its smile follows the partner's talking.
    emotion = {c.clip_id: react.read_emotion(c.emotion) for c in ds.clips()}
    mouth = {c.clip_id: react.read_tdmm(c.tdmm)[:, 57] for c in ds.clips()}     # translation z follows the mouth
    follows = []
    for (s, listener), t in truth.items():
        lag = t["lag"]
        talk = np.convolve(mouth[s], np.ones(13) / 13, "same")
        follows.append(np.corrcoef(talk[:-lag], emotion[listener][lag:, 15])[0, 1])   # valence
        assert mouth[listener].std() < mouth[s].std()
    assert np.mean(follows) > 0.3
    with pytest.raises(ValueError, match="unknown behaviour"):
        synth.generate(str(tmp_path / "c"), behaviour="mirror-only")


def test_contagion_behaviour_listeners_catch_the_partners_mood(tmp_path):
    """The third behaviour model: group moods define appropriateness; a listener's valence follows
    the partner's with a lag (causally: the past predicts it better than the future)."""
    out = tmp_path / "c"
    summary = synth.generate(str(out), dyads=(8, 0, 0), frames=250, seed=5, behaviour="contagion", workers=1)
    assert {t["style"] for t in summary.truth} == {"contagious", "reserved"}
    assert len({t["prototype"] for t in summary.truth}) == 4
    ds = open_dataset(str(out))
    emotion = {c.clip_id: react.read_emotion(c.emotion) for c in ds.clips()}
    before, after = [], []
    for t in summary.truth:
        speaker, listener, lag = emotion[t["speaker"]][:, 15], emotion[t["listener"]][:, 15], t["lag"]
        before.append(np.corrcoef(speaker[:-lag], listener[lag:])[0, 1])      # speaker leads
        after.append(np.corrcoef(listener[:-lag], speaker[lag:])[0, 1])       # listener leads
    assert np.mean(before) > 0.3 and np.mean(before) > np.mean(after)
