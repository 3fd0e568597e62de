"""Bad inputs into ONE extraction run: every broken clip is quarantined with its file and a reason
(or, for a split csv escaping the root, the job is rejected up front), the other clips come out
exactly as if the broken ones were not there, and every clip is accounted for (rows lost 0)."""

from __future__ import annotations

import os
import re
import shutil

import numpy as np
import pytest

from pipeline.data import react
from pipeline.data.clip import extract_clip
from pipeline.data.extract import ExtractConfig, extract
from tests.helpers import report as R
from tests.helpers.faults import FRAMES, Payload
from tests.helpers.media import beep, flash_frames, write_mp4, write_wav

pytestmark = pytest.mark.slow


# ---------------------------------------------------------------------------------------------
# The corruptions: one per clip. Each returns the file it broke (or removed).

def _truncate(clip, ctx):
    blob = open(clip.video, "rb").read()
    open(clip.video, "wb").write(blob[: len(blob) // 3])
    return clip.video


def _random_bytes(clip, ctx):
    open(clip.video, "wb").write(np.random.default_rng(7).bytes(20_000))
    return clip.video


def _zero(modality):
    def corrupt(clip, ctx):
        path = getattr(clip, modality)
        open(path, "wb").close()
        return path
    return corrupt


def _fps30(clip, ctx):
    write_mp4(clip.video, flash_frames(FRAMES * 30 // 25), fps=30)   # the same 2 s at 30 fps
    return clip.video


def _short_video(clip, ctx):
    write_mp4(clip.video, flash_frames(FRAMES - 10))
    return clip.video


def _stereo_16k(clip, ctx):
    write_wav(clip.audio, beep(FRAMES, range(10, 14), rate=16000, channels=2), rate=16000)
    return clip.audio


def _remove_tdmm(clip, ctx):
    os.remove(clip.tdmm)
    return clip.tdmm


def _emotion_cell(value):
    def corrupt(clip, ctx):
        rows = open(clip.emotion).read().splitlines()
        rows[7] = ",".join([value] + rows[7].split(",")[1:])
        open(clip.emotion, "w").write("\n".join(rows) + "\n")
        return clip.emotion
    return corrupt


def _emotion_24_columns(clip, ctx):
    rows = open(clip.emotion).read().splitlines()
    open(clip.emotion, "w").write("\n".join(",".join(r.split(",")[:24]) for r in rows) + "\n")
    return clip.emotion


def _pickled_npy(clip, ctx):
    payload = np.empty(1, dtype=object)
    payload[0] = Payload(ctx["payload_dir"])
    np.save(clip.tdmm, payload, allow_pickle=True)
    return clip.tdmm


OK = None
# name, corruption, expected: None (extracted) or (stage, reason pattern)
CASES = [
    ("truncated mp4 (first third)", _truncate, ("decode_video", r"cannot (decode|open)|truncated")),
    ("corrupt mp4 (20 kB random bytes)", _random_bytes, ("decode_video", r"cannot open video")),
    ("zero-byte mp4", _zero("video"), ("decode_video", r"cannot open video|no frames")),
    ("zero-byte wav", _zero("audio"), ("decode_audio", r"cannot read audio|no samples")),
    ("zero-byte Emotion csv", _zero("emotion"), ("labels", r"no frame rows")),
    ("zero-byte 3DMM npy", _zero("tdmm"), ("labels", r"3DMM|npy")),
    ("mp4 at 30 fps (resampled)", _fps30, OK),
    (f"mp4 of {FRAMES - 10} frames, labels {FRAMES}", _short_video, ("frames", rf"{FRAMES - 10}")),
    ("missing 3DMM npy", _remove_tdmm, ("labels", r"missing tdmm file")),
    ("NaN in the Emotion csv", _emotion_cell("nan"), ("labels", r"NaN or infinite")),
    ("inf in the Emotion csv", _emotion_cell("inf"), ("labels", r"NaN or infinite")),
    ("Emotion csv with 24 columns", _emotion_24_columns, ("labels", r"\[24\] columns; expected 25")),
    ("3DMM npy holding a pickled object", _pickled_npy, ("labels", r"allow_pickle|readable")),
    ("stereo 16 kHz wav (resampled)", _stereo_16k, OK),
]


@pytest.fixture(scope="module")
def broken(ray_local, tmp_path_factory):
    """16 person clips (6/1/1 dyads), 14 broken one way each, extracted in one run."""
    from pipeline.data import synth

    tmp = tmp_path_factory.mktemp("rel-bad")
    root = str(tmp / "data")
    synth.generate(root, dyads=(6, 1, 1), frames=FRAMES, seed=5, release="2024")
    ctx = {"payload_dir": str(tmp / "payload-ran")}
    clips = react.open_dataset(root).clips()
    assert len(clips) == 16 > len(CASES)
    plan = {}
    for (name, corrupt, expected), clip in zip(CASES, clips):
        plan[clip.clip_id] = (name, corrupt(clip, ctx), expected)
    untouched = [c for c in clips if c.clip_id not in plan]
    result = extract(ExtractConfig(data=root, out=str(tmp / "snapshots"), max_failure_fraction=0.9))
    c = result.manifest.counts
    R.rows("bad inputs (16 clips, 14 broken)", c.considered, c.clips, c.quarantined)
    return {"root": root, "result": result, "plan": plan, "untouched": untouched, "ctx": ctx, "clips": clips}


def test_every_clip_is_accounted_for_and_each_broken_one_names_its_file(broken, request):
    result, plan = broken["result"], broken["plan"]
    m = result.manifest
    assert result.published, result.report
    quarantine = {q.clip_id: q for q in m.quarantine}
    extracted = set(m.clips)
    # rows lost 0: every clip listed in a split csv is either in the snapshot or quarantined, once
    listed = {c.clip_id for c in broken["clips"]}
    assert extracted | set(quarantine) == listed and not extracted & set(quarantine)
    assert m.counts.considered == len(listed) == m.counts.clips + m.counts.quarantined
    assert len(m.quarantine) == len(quarantine)                       # one row per clip

    problems = []
    for clip_id, (name, path, expected) in plan.items():
        q = quarantine.get(clip_id)
        if expected is OK:
            outcome = "extracted (ok)" if clip_id in extracted else f"quarantined: {q and q.reason}"
            R.case(R.INPUT, name, outcome, nodeid=request.node.nodeid, detail=os.path.basename(path))
            if clip_id not in extracted:
                problems.append(f"{name}: expected to be extracted, got {q}")
            continue
        stage, pattern = expected
        if q is None:
            R.case(R.INPUT, name, "NOT quarantined", nodeid=request.node.nodeid)
            problems.append(f"{name}: not quarantined")
            continue
        R.case(R.INPUT, name, f"quarantined [{q.stage}] {q.reason}", nodeid=request.node.nodeid,
               detail=f"file {q.uri[len(broken['root']) + 1:]}")
        if q.stage != stage or not re.search(pattern, q.reason):
            problems.append(f"{name}: stage/reason {q.stage!r}: {q.reason!r}")
        # the row names one of the clip's own files (the broken one, except for frame-count
        # disagreements, see test_frame_count_disagreement_names_the_odd_file_out)
        clip = next(c for c in broken["clips"] if c.clip_id == clip_id)
        own = {clip.video, clip.audio, clip.emotion, clip.tdmm, path} - {None}
        if q.uri not in own:
            problems.append(f"{name}: quarantine row names {q.uri}, not one of the clip's files")
        elif stage != "frames" and q.uri != path:
            problems.append(f"{name}: quarantine row names {q.uri}, the broken file is {path}")
        if q.clip_id not in result.report:
            problems.append(f"{name}: not in the job's printed report")
    assert not problems, "\n".join(problems)
    assert not os.path.exists(broken["ctx"]["payload_dir"]), "the pickled payload in a .npy ran"


def test_the_other_clips_come_out_as_if_nothing_was_broken(broken):
    """Untouched clips are byte-for-byte what the job's own per-clip code path computes alone."""
    from pipeline.data.features import load_feature_set

    snap = broken["result"].snapshot
    features = load_feature_set("demo")
    features.resolve()
    for clip in broken["untouched"]:
        alone = extract_clip(clip, features)
        stored = snap.load_clips([clip.clip_id])[clip.clip_id]
        assert set(stored) == {e.column for e in features.extractors}
        for column, values in stored.items():
            expected = np.asarray(alone[column]).astype(snap.features[column].dtype).astype(np.float32)
            np.testing.assert_allclose(values, expected, rtol=1e-4, atol=1e-4, err_msg=f"{clip.clip_id} {column}")
    # 16 kHz stereo audio is resampled to the feature set's rate and mixed down, not rejected
    resampled = next(cid for cid, (name, _, _) in broken["plan"].items() if name.startswith("stereo"))
    assert resampled in snap.clip_ids()
    mfcc = snap.load_clips([resampled], ["audio_mfcc26"])[resampled]["audio_mfcc26"]
    assert mfcc.shape == (FRAMES, 26) and np.isfinite(mfcc).all()


def test_a_video_at_another_frame_rate_is_resampled_with_a_warning_in_the_manifest(broken):
    clip_id = next(cid for cid, (name, _, _) in broken["plan"].items() if name.startswith("mp4 at 30 fps"))
    entry = broken["result"].manifest.clips[clip_id]
    assert entry.num_frames == FRAMES and any("30 fps" in w and "25 fps" in w for w in entry.warnings), entry


def test_frame_count_disagreement_names_the_odd_file_out(broken):
    quarantine = {q.clip_id: q for q in broken["result"].manifest.quarantine}
    clip_id, (name, path, _) = next((cid, p) for cid, p in broken["plan"].items() if p[0].startswith("mp4 of"))
    assert quarantine[clip_id].uri == path, quarantine[clip_id]


def test_a_split_csv_escaping_the_dataset_root_is_rejected_before_any_work(clean_root, tmp_path, capsys, request):
    from jobs import cli

    root = tmp_path / "data"
    shutil.copytree(clean_root, root)
    rows = (root / "train.csv").read_text().splitlines()
    cells = rows[2].split(",")
    cells[2] = "../../../etc/NoXI/x/1"
    rows[2] = ",".join(cells)
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "snapshots"
    code = cli.main(["extract", "--data", str(root), "--out", str(out)])
    err = capsys.readouterr().err
    R.case(R.INPUT, "split csv row with '../' path", f"rejected, exit {code}", nodeid=request.node.nodeid,
           detail=" ".join(err.split())[:120])
    assert code == 2
    assert f"{root / 'train.csv'} line 3" in err and "escape the dataset root" in err
    assert not out.exists() or not any(out.iterdir()), "a rejected job must not start a snapshot"
