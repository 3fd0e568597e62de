"""ReactDiffGenerator: statistics, generation, seeding, batching, persistence."""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch

import reactdiff
from reactdiff.generator import CheckpointError, LatentStatistics, ReactDiffGenerator


# ----------------------------------------------------------------------------------------------
# Latent statistics
# ----------------------------------------------------------------------------------------------

def test_statistics_running_min_max_and_exact_inverse():
    stats = LatentStatistics(seq_len=6, feature_dim=3)
    z = torch.randn(10, 6, 3) * 4 + 1
    stats.update(z[:4])
    stats.update(z[4:])
    torch.testing.assert_close(stats.minimum, z.amin(0))
    torch.testing.assert_close(stats.maximum, z.amax(0))
    assert int(stats.count) == 10
    p = stats.normalize(z)
    assert p.min() >= -1 and p.max() <= 1                         # training latents land in [−1, 1]
    assert p.amin(0).allclose(torch.full((6, 3), -1.0)) and p.amax(0).allclose(torch.ones(6, 3), atol=1e-4)
    torch.testing.assert_close(stats.denormalize(p), z, atol=1e-5, rtol=1e-5)   # normalise∘denormalise = id
    q = torch.rand(5, 6, 3) * 2 - 1
    torch.testing.assert_close(stats.normalize(stats.denormalize(q)), q, atol=1e-5, rtol=1e-5)


def test_statistics_reference_bug_is_reproducible_on_request(make_tiny):
    """model.md §4.3: m = −2, M = 3 maps −2..3 to p = −1, 1, 3, 5, 7, 9 and back to −2, 3, 8, 13, 18, 23."""
    buggy = LatentStatistics(seq_len=1, feature_dim=1, reference_bug=True)
    buggy.update(torch.tensor([[[-2.0]], [[3.0]]]))
    z = torch.tensor([-2.0, -1, 0, 1, 2, 3]).view(6, 1, 1)
    p = buggy.normalize(z)
    assert p.flatten().tolist() == pytest.approx([-1, 1, 3, 5, 7, 9], abs=1e-3)
    assert buggy.denormalize(p).flatten().tolist() == pytest.approx([-2, 3, 8, 13, 18, 23], abs=1e-3)
    fixed = LatentStatistics(seq_len=1, feature_dim=1)
    fixed.load_state_dict(buggy.state_dict())
    assert fixed.normalize(z).flatten().tolist() == pytest.approx([-1, -0.6, -0.2, 0.2, 0.6, 1.0], abs=1e-4)
    gen = make_tiny(reference_normalisation_bug=True)
    assert gen.latent_stats.reference_bug


def test_statistics_must_be_filled_before_stage_two(speaker, make_tiny):
    gen = make_tiny()
    with pytest.raises(RuntimeError, match="latent statistics are empty"):
        gen.generate(speaker, num_samples=1, steps=1)
    with pytest.raises(ValueError, match="do not match"):
        gen.latent_stats.update(torch.zeros(1, 5, 16))


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------

def test_generate_shapes_batched_and_unbatched(tiny, speaker):
    out = tiny.generate(speaker, num_samples=3, steps=4, seed=0)
    assert isinstance(out, reactdiff.Reaction)
    assert out.emotion.shape == (3, 40, 25) and out.tdmm.shape == (3, 40, 58)
    batched = {n: torch.stack([x, x.flip(0)]) for n, x in speaker.items()}
    out = tiny.generate(batched, num_samples=3, steps=4, seed=0)
    assert out.emotion.shape == (2, 3, 40, 25) and out.tdmm.shape == (2, 3, 40, 58)


def test_generate_is_one_batched_pass(tiny, speaker):
    """All B·K samples and all windows go through the denoiser together: one call per step."""
    calls = []
    hook = tiny.denoiser.register_forward_hook(lambda m, args, out: calls.append(args[0].shape))
    try:
        batched = {n: torch.stack([x, x]) for n, x in speaker.items()}
        tiny.generate(batched, num_samples=5, steps=6, seed=0)
    finally:
        hook.remove()
    assert len(calls) == 6
    assert all(shape == (2 * 5 * 4, 10, 16) for shape in calls)   # B·K·W windows of [window, fd]


def test_seeds(tiny, speaker):
    a = tiny.generate(speaker, num_samples=4, steps=5, seed=11)
    b = tiny.generate(speaker, num_samples=4, steps=5, seed=11)
    c = tiny.generate(speaker, num_samples=4, steps=5, seed=12)
    torch.testing.assert_close(a.emotion, b.emotion, rtol=0, atol=0)
    torch.testing.assert_close(a.tdmm, b.tdmm, rtol=0, atol=0)
    assert not torch.allclose(a.emotion, c.emotion)
    # the samples of one call differ from each other (fresh noise per sample)
    assert not torch.allclose(a.emotion[0], a.emotion[1])
    # no seed → fresh randomness
    assert not torch.allclose(tiny.generate(speaker, num_samples=1, steps=3).emotion,
                              tiny.generate(speaker, num_samples=1, steps=3).emotion)


def test_batched_rows_do_not_depend_on_batch_composition(tiny, speaker, make_features):
    other = make_features(tiny.feature_widths, None, 41, seed=7)
    batched = {n: torch.stack([speaker[n], other[n]]) for n in speaker}
    out = tiny.generate(batched, num_samples=3, steps=4, seed=[5, 9])
    alone = tiny.generate(other, num_samples=3, steps=4, seed=9)
    torch.testing.assert_close(out.emotion[1], alone.emotion, atol=1e-5, rtol=1e-5)
    first = tiny.generate(speaker, num_samples=3, steps=4, seed=5)
    torch.testing.assert_close(out.emotion[0], first.emotion, atol=1e-5, rtol=1e-5)
    # an int seed s gives row b the stream s + b; numpy integers are accepted
    same = tiny.generate(batched, num_samples=3, steps=4, seed=np.int64(8))
    torch.testing.assert_close(same.emotion[1], tiny.generate(other, num_samples=3, steps=4, seed=9).emotion,
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="seeds for a batch of 2"):
        tiny.generate(batched, num_samples=1, steps=1, seed=[1, 2, 3])


def test_decoder_dropout_flag(tiny, speaker):
    tiny.train()          # the caller's mode must not matter for sampling, and must be restored
    eval_a = tiny.generate(speaker, num_samples=2, steps=3, seed=5)
    eval_b = tiny.generate(speaker, num_samples=2, steps=3, seed=5)
    torch.testing.assert_close(eval_a.emotion, eval_b.emotion, rtol=0, atol=0)
    assert tiny.training and tiny.autoencoder.decoder.training

    state = torch.random.get_rng_state()
    drop_a = tiny.generate(speaker, num_samples=2, steps=3, seed=5, decoder_dropout=True)
    assert torch.equal(torch.random.get_rng_state(), state)      # global RNG untouched
    drop_b = tiny.generate(speaker, num_samples=2, steps=3, seed=5, decoder_dropout=True)
    assert not torch.allclose(drop_a.emotion, eval_a.emotion)     # dropout changes the reaction
    torch.testing.assert_close(drop_a.emotion, drop_b.emotion, rtol=0, atol=0)   # yet seeded


def test_inputs_are_cropped_and_cast(tiny, speaker):
    exact = {n: x[: tiny.config.seq_len] for n, x in speaker.items()}
    long = tiny.generate(speaker, num_samples=2, steps=3, seed=1)     # 41 frames → first 40 used
    crop = tiny.generate(exact, num_samples=2, steps=3, seed=1)
    torch.testing.assert_close(long.emotion, crop.emotion, rtol=0, atol=0)
    half = tiny.generate({n: x.half() for n, x in speaker.items()}, num_samples=2, steps=3, seed=1)
    assert half.emotion.dtype == torch.float32
    torch.testing.assert_close(half.emotion, long.emotion, atol=0.05, rtol=0.05)
    numpy_in = tiny.generate({n: x.numpy() for n, x in speaker.items()}, num_samples=2, steps=3, seed=1)
    torch.testing.assert_close(numpy_in.emotion, long.emotion, rtol=0, atol=0)
    # read-only arrays (Ray's object store) are copied, with no torch warning
    frozen = {n: x.numpy().copy() for n, x in speaker.items()}
    for x in frozen.values():
        x.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read_only = tiny.generate(frozen, num_samples=2, steps=3, seed=1)
    torch.testing.assert_close(read_only.emotion, long.emotion, rtol=0, atol=0)


def test_input_errors_are_clear(tiny, speaker):
    with pytest.raises(KeyError, match="audio_y"):
        tiny.generate({n: x for n, x in speaker.items() if n != "audio_y"}, num_samples=1, steps=1)
    with pytest.raises(ValueError, match="at least seq_len=40"):
        tiny.generate({n: x[:30] for n, x in speaker.items()}, num_samples=1, steps=1)
    with pytest.raises(ValueError, match="width 7"):
        tiny.generate({**speaker, "video_b": torch.zeros(41, 7)}, num_samples=1, steps=1)
    extra = {**speaker, "emotion": torch.zeros(41, 25)}             # extra snapshot columns are ignored
    assert tiny.generate(extra, num_samples=1, steps=1, seed=0).emotion.shape == (1, 40, 25)


def test_mean_face_is_added_once(tiny, speaker, make_features):
    base = tiny.generate(speaker, num_samples=2, steps=2, seed=3)
    mean = torch.linspace(-1, 1, 58)
    tiny.set_mean_face(mean)
    shifted = tiny.generate(speaker, num_samples=2, steps=2, seed=3)
    torch.testing.assert_close(shifted.tdmm, base.tdmm + mean)
    torch.testing.assert_close(shifted.emotion, base.emotion)
    # the stage-1 loss compares the decoder output with tdmm − mean_face
    emotion, tdmm = torch.rand(2, 40, 25), torch.randn(2, 40, 58)
    feats = make_features(tiny.feature_widths, 2, 40, seed=4)
    tiny.eval()
    with_mean, _ = tiny.autoencoder_loss(feats, emotion, tdmm + mean)
    tiny.set_mean_face(torch.zeros(58))
    without, _ = tiny.autoencoder_loss(feats, emotion, tdmm)
    assert with_mean.item() == pytest.approx(without.item(), rel=1e-5)


# ----------------------------------------------------------------------------------------------
# Persistence
# ----------------------------------------------------------------------------------------------

def test_state_dict_holds_everything(tiny):
    keys = set(tiny.state_dict())
    for prefix in ("autoencoder.", "cond.proj.", "cond.norm.", "denoiser."):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert {"latent_stats.minimum", "latent_stats.maximum", "latent_stats.count", "mean_face"} <= keys


def test_save_load_gives_identical_samples(tiny, speaker, tmp_path):
    tiny.set_mean_face(torch.arange(58.0) / 58)
    tiny.metadata["feature_set_hash"] = "abc123"
    expected = tiny.generate(speaker, num_samples=3, steps=4, seed=9)

    path = tmp_path / "sub" / "generator.pt"
    tiny.save(path)
    for loaded in (ReactDiffGenerator.load(path), ReactDiffGenerator.load(str(path)),
                   ReactDiffGenerator.load(f"file://{path}"),
                   ReactDiffGenerator.from_bytes(tiny.to_bytes()),
                   ReactDiffGenerator.load(io.BytesIO(path.read_bytes()))):
        assert loaded.config == tiny.config
        assert loaded.metadata == {"feature_set_hash": "abc123"}
        assert not any(t.is_meta for t in loaded.state_dict().values())
        got = loaded.generate(speaker, num_samples=3, steps=4, seed=9)
        torch.testing.assert_close(got.emotion, expected.emotion, rtol=0, atol=0)
        torch.testing.assert_close(got.tdmm, expected.tdmm, rtol=0, atol=0)


def test_save_load_through_fsspec_uri(tiny, speaker):
    from pipeline import storage   # object stores are the pipeline's: the generator takes bytes

    uri = "memory://reactdiff-tests/generator.pt"
    storage.write_bytes(uri, tiny.to_bytes())
    loaded = ReactDiffGenerator.from_bytes(storage.read_bytes(uri))
    torch.testing.assert_close(loaded.generate(speaker, num_samples=1, steps=2, seed=0).emotion,
                               tiny.generate(speaker, num_samples=1, steps=2, seed=0).emotion, rtol=0, atol=0)


class _Payload:
    """Any class instance: unpickling it would mean running code."""
    def __reduce__(self):
        return (print, ("this must never run",))


def test_load_refuses_pickled_objects(tiny, tmp_path, monkeypatch):
    path = tmp_path / "evil.pt"
    torch.save({"format": "reactdiff-generator/1", "config": tiny.config.to_dict(),
                "state_dict": tiny.state_dict(), "extra": _Payload()}, path)
    with pytest.raises(CheckpointError, match="refusing"):
        ReactDiffGenerator.load(path)
    # a legacy whole-object pickle is refused as well
    path2 = tmp_path / "legacy.pt"
    torch.save(tiny, path2)
    with pytest.raises(CheckpointError):
        ReactDiffGenerator.load(path2)
    # plain but foreign content → clear format error
    path3 = tmp_path / "other.pt"
    torch.save({"state_dict": tiny.state_dict()}, path3)
    with pytest.raises(CheckpointError, match="not a ReactDiff generator"):
        ReactDiffGenerator.load(path3)

    seen = {}
    real_load = torch.load

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    ReactDiffGenerator.from_bytes(tiny.to_bytes())
    assert seen.get("weights_only") is True
