"""Extractors and feature sets: reference MFCC, frame alignment, the network loaders."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from pipeline.data import features
from pipeline.data.media import Audio, face_crops
from pipeline.data.features import FeatureSetError
from tests.helpers.media import beep, flash_frames
from tests.helpers.models import TINY_WAV2VEC2, save_tiny_torchscript, save_tiny_wav2vec2, tiny_wav2vec2


def _ext(name, **spec):
    return features.build_extractor(name, spec)


def _audio(samples, rate=44100):
    return Audio(np.asarray(samples, np.float32), rate, rate, 1)


# ---------------------------------------------------------------------------------------------
# Acoustic


@pytest.mark.parametrize("rate", [44100, 16000, 48000, 22050, 8000])
def test_vectorised_mfcc_equals_the_reference_per_chunk_loop(rate):
    frames = 30
    x = np.random.default_rng(rate).standard_normal(frames * rate // 25 - 123).astype(np.float32) * 0.1
    mfcc = _ext("mfcc26", type="mfcc")
    ours = mfcc.audio_features(_audio(x, rate), frames, 25.0)
    ref = features.mfcc_reference(x, rate, frames)
    assert ours.shape == (frames, 26) == ref.shape and ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_mfcc_at_an_odd_rate_still_equals_the_reference():
    rate = 11111                      # 40 ms = 444.44 samples: chunks and Kaldi windows both truncate to 444
    frames = 5
    x = np.random.default_rng(0).standard_normal(frames * 444).astype(np.float32)
    out = _ext("m", type="mfcc").audio_features(_audio(x, rate), frames, 25.0)
    np.testing.assert_allclose(out, features.mfcc_reference(x, rate, frames), rtol=1e-4, atol=1e-4)


def test_beep_lands_on_its_frames_in_mfcc_and_logmel():
    frames, on = 40, range(17, 21)
    x = beep(frames, on)
    mfcc = _ext("mfcc26", type="mfcc").audio_features(_audio(x), frames, 25.0)
    energy = mfcc[:, 0]                                    # use_energy: coefficient 0 is log energy
    loud = set(np.flatnonzero(energy > energy.min() + 0.5 * (energy.max() - energy.min())))
    assert loud == set(on)
    logmel = _ext("logmel", type="logmel").audio_features(_audio(x), frames, 25.0)
    assert logmel.shape == (frames, 64)
    level = logmel.max(axis=1)
    # Windows are centred on each frame's middle: full level inside, at most partial leakage
    # into the two neighbours, nothing beyond.
    inside, outside = level[list(on)], np.delete(level, [16, 17, 18, 19, 20, 21])
    assert inside.min() > outside.max() + 5
    assert level[16] < inside.min() and level[21] < inside.min()


def test_logmel_frames_follow_the_audio_length_policy():
    out = _ext("lm", type="logmel", n_mels=16).audio_features(_audio(np.zeros(1000)), 12, 25.0)
    assert out.shape == (12, 16) and np.isfinite(out).all()


def test_wav2vec2_loads_a_state_dict_and_pairs_20ms_vectors(tmp_path):
    path = save_tiny_wav2vec2(tmp_path / "w2v.pt")
    ext = _ext("wav2vec2", type="wav2vec2", uri=path)
    ext.resolve()
    assert ext.width == 64 and ext.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    ext.load("cpu")
    frames = 20
    x = beep(frames, range(5, 8), rate=16000)
    out = ext.audio_features(_audio(x, 16000), frames, 25.0)
    assert out.shape == (frames, 64) and out.dtype == np.float16
    # By hand: normalise, last hidden state, pad to even, two consecutive vectors per frame.
    model = tiny_wav2vec2()
    t = torch.from_numpy(x)
    with torch.no_grad():
        h, _ = model(((t - t.mean()) / torch.sqrt(t.var(unbiased=False) + 1e-7))[None])
    h = h[0].numpy()
    assert len(h) == 2 * frames - 1                        # 0.8 s at 16 kHz -> 39 hidden states
    h = np.concatenate([h, h[-1:]]).reshape(frames, 64)
    np.testing.assert_allclose(out.astype(np.float32), h, rtol=1e-2, atol=1e-2)


def test_wav2vec2_accepts_hugging_face_key_names(tmp_path):
    model = tiny_wav2vec2()
    hf = {}
    for k, v in model.state_dict().items():   # torchaudio -> transformers naming (Wav2Vec2ForCTC)
        k = k.replace("encoder.transformer.", "wav2vec2.encoder.").replace(
            "encoder.feature_projection.", "wav2vec2.feature_projection.")
        k = k.replace("parametrizations.weight.original0", "weight_g").replace(
            "parametrizations.weight.original1", "weight_v")
        if k.startswith("feature_extractor."):
            k = "wav2vec2." + k
        hf[k] = v
    hf["lm_head.weight"] = torch.zeros(32, 32)
    path = tmp_path / "pytorch_model.bin"
    torch.save(hf, path)
    ext = _ext("wav2vec2", type="wav2vec2", uri=str(path), config=dict(TINY_WAV2VEC2))
    ext.resolve()
    ext.load("cpu")
    for name, p in model.state_dict().items():
        torch.testing.assert_close(ext._model.state_dict()[name], p)


def test_wav2vec2_rejects_pickles_that_are_not_weights(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "obj": object.__new__(_Unpicklable)}, path)
    ext = _ext("wav2vec2", type="wav2vec2", uri=str(path))
    with pytest.raises(FeatureSetError, match="weights-only"):
        ext.resolve()


class _Unpicklable:
    pass


# ---------------------------------------------------------------------------------------------
# Facial


def test_pixels_is_a_downsampled_grayscale_crop_in_minus_one_one():
    frames = flash_frames(3, bright=range(1, 2))
    crops = face_crops(frames)
    ext = _ext("pixels", type="pixels")
    out = ext.frame_features(crops)
    assert out.shape == (3, 1024) and out.dtype == np.float16 and ext.width == 1024
    img = out.astype(np.float32).reshape(3, 32, 32)
    assert img[1].min() > 0.9                                         # the white frame
    assert (np.diff(img[0], axis=1) >= 0).all() and img[0, :, -1].mean() > img[0, :, 0].mean()
    expected = crops[0].astype(np.float32) @ np.array([0.299, 0.587, 0.114])
    expected = expected.reshape(32, 7, 32, 7).mean(axis=(1, 3)) / 127.5 - 1
    np.testing.assert_allclose(img[0], expected, atol=6e-3)          # 8-bit box reduce + float16
    colour = _ext("rgb", type="pixels", size=16, grayscale=False)
    assert colour.frame_features(crops).shape == (3, 16 * 16 * 3)
    odd = _ext("odd", type="pixels", size=30)                       # 224 / 30 is not whole: pooling path
    assert odd.frame_features(crops).shape == (3, 900)


def test_torchscript_network_goes_through_the_real_loader(tmp_path):
    path = save_tiny_torchscript(tmp_path / "tiny.pt", width=8)
    ext = _ext("tiny", type="torchscript", uri=path, frame_batch=2)  # width probed from the network
    ext.resolve()
    assert ext.width == 8 and ext.column == "video_tiny" and ext.spec.kind == "facial"
    assert ext.sha256 == hashlib.sha256(open(path, "rb").read()).hexdigest()
    ext.load("cpu")
    crops = face_crops(flash_frames(5, bright=range(2, 3)))
    out = ext.frame_features(crops)
    assert out.shape == (5, 8) and out.dtype == np.float16
    model = torch.jit.load(path)
    x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
        expected = model((x - 0.5) / 0.5).numpy()                    # reference [-1, 1] normalisation
    np.testing.assert_allclose(out.astype(np.float32), expected, rtol=1e-2, atol=1e-2)


def test_torchscript_width_mismatch_and_changed_file_are_errors(tmp_path):
    path = save_tiny_torchscript(tmp_path / "tiny.pt", width=8)
    ext = _ext("tiny", type="torchscript", uri=path, width=9)
    ext.resolve()
    ext.load("cpu")
    with pytest.raises(ValueError, match="declares width 9"):
        ext.frame_features(np.zeros((1, 224, 224, 3), np.uint8))
    save_tiny_torchscript(path, width=8, seed=1)                     # replaced after the driver hashed it
    with pytest.raises(FeatureSetError, match="changed during the job"):
        ext.load("cpu")


# ---------------------------------------------------------------------------------------------
# Feature sets


def test_bundled_feature_sets():
    demo = features.load_feature_set("demo")
    assert [e.column for e in demo.extractors] == ["video_pixels", "audio_mfcc26", "emotion", "tdmm"]
    assert demo.specs["video_pixels"] == (1024, "float16", "facial")
    assert demo.modalities() == ["video", "audio", "emotion", "tdmm"] and not demo.networks
    with pytest.raises(FeatureSetError, match="--model au=URI"):
        features.load_feature_set("paper")
    paper = features.load_feature_set("paper", {n: f"s3://m/{n}.pt" for n in ("au", "va", "fe", "wav2vec2")})
    widths = {e.column: e._width for e in paper.extractors}
    assert widths["video_au"] == 25088 and widths["video_va"] == 64 and widths["video_fe"] == 1408
    assert [e.name for e in paper.networks] == ["au", "va", "fe", "wav2vec2"]


def test_feature_set_errors_name_the_extractor():
    with pytest.raises(FeatureSetError, match="unknown type 'sift'"):
        features.feature_set_from_dict({"extractors": {"x": {"type": "sift"}}})
    with pytest.raises(FeatureSetError, match="pixels.*unknown key"):
        features.feature_set_from_dict({"extractors": {"pixels": {"type": "pixels", "sise": 3}}})
    with pytest.raises(FeatureSetError, match="no extractor 'au'"):
        features.load_feature_set("demo", {"au": "x.pt"})
    with pytest.raises(FeatureSetError, match="not found"):
        features.load_feature_set("nope")


def test_feature_set_hash_tracks_what_changes_the_numbers(tmp_path):
    def fs(size=32, uri=None):
        ex = {"pixels": {"type": "pixels", "size": size}, "mfcc26": {"type": "mfcc"}}
        return features.feature_set_from_dict({"name": "a", "extractors": ex})

    a = fs()
    assert a.hash(fps=25.0) == fs().hash(fps=25.0)
    assert a.hash(fps=25.0) != fs(size=16).hash(fps=25.0)
    assert a.hash(fps=25.0) != a.hash(fps=30.0)
    p1 = save_tiny_torchscript(tmp_path / "a.pt", seed=0)
    p2 = save_tiny_torchscript(tmp_path / "b.pt", seed=1)
    same_file_elsewhere = str(tmp_path / "copy.pt")
    open(same_file_elsewhere, "wb").write(open(p1, "rb").read())

    def net(uri):
        s = features.feature_set_from_dict({"extractors": {"n": {"type": "torchscript", "width": 8}}}, {"n": uri})
        s.resolve()
        return s.hash()

    assert net(p1) == net(same_file_elsewhere) != net(p2)            # the model's bytes, not its URI
