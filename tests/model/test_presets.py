"""Presets: reference sizes (on the meta device), shapes, overrides."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import reactdiff
from reactdiff.presets import PRESETS, preset_config


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def paper():
    with torch.device("meta"):
        return reactdiff.build_generator("paper")


def test_paper_parameter_counts_match_reference_within_one_percent(paper):
    counts = paper.parameter_counts()
    # model.md §3.5: stage 1 = 124.99 M including an unused 0.26 M decoder MLP we omit.
    assert counts["autoencoder"] == pytest.approx(124.99e6, rel=0.01)
    assert counts["autoencoder"] == pytest.approx(124.99e6 - 0.26e6, rel=0.002)
    assert counts["denoiser"] == pytest.approx(404.31e6, rel=0.01)       # §4.5
    assert counts["cond"] == pytest.approx(13.11e6, rel=0.01)            # §4.4
    assert counts["cond"] + counts["denoiser"] == pytest.approx(417.42e6, rel=0.01)   # §4.5 stage-2 total
    # Sub-blocks of the MMT (§3.5 table).
    enc = paper.autoencoder.encoder
    assert _count(enc.facial_self) + _count(enc.facial_cross) == pytest.approx(104.12e6, rel=0.01)
    assert _count(enc.acoustic_attn) == pytest.approx(5.83e6, rel=0.01)
    assert _count(enc.inter) == pytest.approx(8.41e6, rel=0.01)
    assert _count(enc.map_mlp) == pytest.approx(2.63e6, rel=0.01)
    assert _count(enc.latent_mlp) == pytest.approx(0.26e6, rel=0.02)
    assert all(p.is_meta for p in paper.parameters())


def test_paper_shapes_on_meta(paper):
    cfg = paper.config
    with torch.device("meta"):
        feats = {n: torch.empty(2, cfg.seq_len, w) for n, w in paper.feature_widths.items()}
        z = paper.encode(feats)
        emotion, tdmm = paper.decode(z)
        windows = paper.to_windows(z)
        cond = paper.cond(windows)
        eps = paper.denoiser(windows, torch.zeros(windows.shape[0], dtype=torch.long), cond)
    assert list(paper.feature_widths) == ["video_au", "video_fe", "video_va", "audio_wav2vec2", "audio_mfcc26"]
    assert z.shape == (2, 750, 256)
    assert emotion.shape == (2, 750, 25) and tdmm.shape == (2, 750, 58)
    assert windows.shape == (2 * 15, 50, 256)
    assert cond.shape == (30, 1024)
    assert eps.shape == windows.shape


def test_small_preset_shapes_and_generate():
    torch.manual_seed(0)
    gen = reactdiff.build_generator("small")
    assert gen.feature_widths == {"video_pixels": 1024, "audio_mfcc26": 26}
    assert gen.parameter_counts()["total"] < 5e6     # stays CPU-friendly
    g = torch.Generator().manual_seed(0)
    feats = {n: torch.randn(2, 751, w, generator=g) for n, w in gen.feature_widths.items()}
    z = gen.update_statistics(feats)
    assert z.shape == (2, 750, 32)
    out = gen.generate({n: x[0] for n, x in feats.items()}, num_samples=2, steps=2, seed=0)
    assert out.emotion.shape == (2, 750, 25) and out.tdmm.shape == (2, 750, 58)
    assert torch.isfinite(out.emotion).all() and torch.isfinite(out.tdmm).all()


def test_train_settings_are_the_reference_ones():
    s1, s2 = PRESETS["paper"].stage1, PRESETS["paper"].stage2
    assert (s1.lr, s1.weight_decay, s1.betas, s1.ema_decay, s1.epochs, s1.batch_size) == (1e-4, 5e-4, (0.9, 0.999), 0.999, 200, 16)
    assert (s2.lr, s2.weight_decay, s2.betas, s2.ema_decay) == (5e-5, 5e-4, (0.9, 0.999), 0.999)
    mmt, diff = PRESETS["paper"].mmt, PRESETS["paper"].diffusion
    assert (mmt.emotion_weight, mmt.tdmm_weight, mmt.positional_encoding, mmt.variational) == (10.0, 10.0, False, False)
    # the reference feeds its features as they are; only the raw-pixel small preset centres clips
    assert mmt.clip_centering is False and PRESETS["small"].mmt.clip_centering is True
    assert (diff.num_timesteps, diff.loss, diff.loss_weight, diff.eta, diff.clip_x0) == (20, "l1", 10.0, 0.0, True)
    assert PRESETS["paper"].reference_normalisation_bug is False


def test_overrides_top_level_nested_and_routed():
    cfg = preset_config("small", facial={"video_x": 10}, seq_len=100, mmt={"hidden_dim": 64},
                        stage1={"lr": 0.5}, model_channels=64)
    assert cfg.mmt.facial == {"video_x": 10}            # feature groups are replaced, not merged
    assert cfg.mmt.acoustic == {"audio_mfcc26": 26}     # untouched
    assert cfg.seq_len == 100 and cfg.mmt.hidden_dim == 64 and cfg.denoiser.model_channels == 64
    assert cfg.stage1.lr == 0.5 and cfg.stage1.weight_decay == 5e-4
    # The registry entry itself is never modified.
    assert PRESETS["small"].seq_len == 750 and PRESETS["small"].mmt.facial == {"video_pixels": 1024}
    cfg.mmt.facial["other"] = 3
    assert "other" not in PRESETS["small"].mmt.facial


def test_override_errors_name_the_key():
    with pytest.raises(ValueError, match="nonsense"):
        preset_config("small", nonsense=1)
    with pytest.raises(ValueError, match="dropout.*several sections"):
        preset_config("small", dropout=0.2)          # in both mmt and denoiser
    with pytest.raises(ValueError, match="mmt.bogus"):
        preset_config("small", mmt={"bogus": 1})
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("huge")
    with pytest.raises(ValueError, match="multiple of window"):
        preset_config("small", seq_len=101)


def test_config_round_trips_through_plain_dict():
    cfg = preset_config("paper")
    plain = cfg.to_dict()
    assert isinstance(plain["denoiser"]["channel_mult"], list)   # JSON-compatible
    assert reactdiff.GeneratorConfig.from_dict(plain) == cfg


def test_import_reactdiff_is_light():
    code = "import sys, reactdiff; print(reactdiff.__version__); assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0.1.0"


def test_only_the_improved_variant_guides():
    """The paper presets stay the reference (no condition dropout, no guidance); the temporal ones
    train with condition dropout and sample with guidance 2 (docs/model.md, cause 9)."""
    for name in ("paper", "small"):
        d = preset_config(name).diffusion
        assert (d.cond_drop, d.guidance) == (0.0, 1.0)
    for name in ("paper-temporal", "small-temporal"):
        d = preset_config(name).diffusion
        assert (d.cond_drop, d.guidance) == (0.1, 2.0)
