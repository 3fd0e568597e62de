"""The ``temporal`` stage-2 variant: a dilated temporal denoiser over whole clips, conditioned
frame by frame on the speaker, x₀-prediction, latent statistics shared over time."""

from __future__ import annotations

import pytest
import torch

from reactdiff.diffusion import DiffusionConfig, NoiseSchedule, ddim_sample, epsilon_loss
from reactdiff.temporal import TemporalConfig, TemporalDenoiser

TEMPORAL = dict(architecture="temporal", diffusion={"prediction": "x0"},
                temporal={"channels": 16, "dilations": (1, 2, 4), "cond_channels": 8, "norm_groups": 4})


@pytest.fixture
def temporal(make_tiny, make_features):
    gen = make_tiny(**TEMPORAL)
    gen.update_statistics(make_features(gen.feature_widths, 6, gen.config.seq_len, seed=1))
    return gen


def test_frames_are_the_length_axis_and_any_length_works():
    net = TemporalDenoiser(TemporalConfig(channels=16, dilations=(1, 2), cond_channels=8, norm_groups=4), 6)
    for frames in (7, 40, 333):
        x, cond = torch.randn(3, frames, 6), torch.randn(3, frames, 8)
        assert net(x, torch.tensor([0, 5, 19]), cond).shape == (3, frames, 6)
    with pytest.raises(ValueError, match="does not align"):
        net(torch.randn(1, 10, 6), torch.tensor([0]), torch.randn(1, 9, 8))


def test_output_at_a_frame_depends_only_on_its_receptive_field():
    cfg = TemporalConfig(channels=16, dilations=(1, 2), cond_channels=8, norm_groups=4)
    net = TemporalDenoiser(cfg, 6)
    for p in net.parameters():          # undo the zero init so the dependency is visible
        torch.nn.init.normal_(p, std=0.1)
    x, cond = torch.randn(1, 80, 6), torch.randn(1, 80, 8)
    out = net(x, torch.tensor([3]), cond)
    bumped = cond.clone()
    bumped[:, 40] += 5.0                # one speaker frame changes
    delta = (net(x, torch.tensor([3]), bumped) - out).abs().sum(-1)[0]
    # GroupNorm spans all frames, so far frames move a little; near frames move most.
    near = delta[40 - cfg.receptive_field // 2: 40 + cfg.receptive_field // 2 + 1]
    assert float(near.max().detach()) > 10 * float(delta[:20].max().detach())


def test_x0_prediction_loss_and_sampler():
    cfg = DiffusionConfig(prediction="x0")
    schedule = NoiseSchedule.from_config(cfg)
    x0 = torch.rand(4, 10, 6) * 2 - 1
    # A denoiser that always returns the true x0 has zero loss and samples it exactly.
    loss, parts = epsilon_loss(lambda x, t, c: x0, x0, schedule, prediction="x0")
    assert float(loss) == 0.0 and "x0_l1" in parts
    sample = ddim_sample(lambda x, t, c: x0, tuple(x0.shape), schedule, prediction="x0",
                         generator=torch.Generator().manual_seed(0))
    assert torch.allclose(sample, x0, atol=1e-5)
    with pytest.raises(ValueError, match="prediction"):
        DiffusionConfig(prediction="v")


def test_generator_trains_samples_saves_and_loads(temporal, make_features, tmp_path):
    gen = temporal
    assert gen.latent_stats.minimum.shape == (1, gen.config.mmt.feature_dim)   # shared over time
    counts = gen.parameter_counts()
    assert counts["denoiser"] > 0 and counts["cond"] == 16 * 8 + 8
    spk = make_features(gen.feature_widths, 2, gen.config.seq_len, seed=3)
    lis = make_features(gen.feature_widths, 2, gen.config.seq_len, seed=4)
    opt = torch.optim.Adam(gen.set_trainable("diffusion"), lr=1e-2)
    for step in range(3):          # a few steps move the zero-initialised output layer
        loss, parts = gen.diffusion_loss(spk, lis, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert "x0_l1" in parts and gen.denoiser.input_conv.weight.grad is not None

    speaker = make_features(gen.feature_widths, None, gen.config.seq_len + 1, seed=5)
    a = gen.generate(speaker, num_samples=3, seed=7)
    assert a.emotion.shape == (3, gen.config.seq_len, 25) and a.tdmm.shape == (3, gen.config.seq_len, 58)
    assert not torch.allclose(a.emotion[0], a.emotion[1])     # samples differ
    gen.save(tmp_path / "g.pt")
    b = type(gen).load(tmp_path / "g.pt").generate(speaker, num_samples=3, seed=7)
    assert torch.allclose(a.emotion, b.emotion, atol=1e-6)


def test_training_crops_change_nothing_at_sampling(make_tiny, make_features):
    gen = make_tiny(**{**TEMPORAL, "temporal": {**TEMPORAL["temporal"], "train_frames": 16}})
    gen.update_statistics(make_features(gen.feature_widths, 4, gen.config.seq_len, seed=1))
    z = torch.randn(2, gen.config.seq_len, gen.config.mmt.feature_dim)
    seen = []
    real = gen.denoiser.forward
    gen.denoiser.forward = lambda x, t, c: seen.append(x.shape[1]) or real(x, t, c)
    gen.latent_diffusion_loss(z, z, generator=torch.Generator().manual_seed(0))
    assert seen == [16]
    seen.clear()
    gen.generate(make_features(gen.feature_widths, None, gen.config.seq_len, seed=2), num_samples=1, seed=0)
    assert set(seen) == {gen.config.seq_len}


def test_unknown_architecture_is_refused(make_tiny):
    with pytest.raises(ValueError, match="architecture"):
        make_tiny(architecture="transformer")


def test_guided_generator_trains_the_null_condition_and_saves_its_scale(make_tiny, make_features, tmp_path):
    """cond_drop trains some items without their speaker; the config's guidance is the default
    scale at sampling, travels with the checkpoint and can be overridden per call."""
    gen = make_tiny(**{**TEMPORAL, "diffusion": {"prediction": "x0", "cond_drop": 0.5, "guidance": 2.0}})
    gen.update_statistics(make_features(gen.feature_widths, 4, gen.config.seq_len, seed=1))
    z = torch.randn(8, gen.config.seq_len, gen.config.mmt.feature_dim)
    conds = []
    real = gen.denoiser.forward
    gen.denoiser.forward = lambda x, t, c: conds.append(c) or real(x, t, c)
    gen.latent_diffusion_loss(z, z, generator=torch.Generator().manual_seed(0))
    nulls = [bool((c == 0).all()) for c in conds[0]]
    assert any(nulls) and not all(nulls)                          # some items lost their speaker
    opt = torch.optim.Adam(gen.set_trainable("diffusion"), lr=1e-2)
    for step in range(3):                                         # move the zero-initialised output
        loss, _ = gen.latent_diffusion_loss(z, z, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    conds.clear()
    speaker = make_features(gen.feature_widths, None, gen.config.seq_len, seed=5)
    guided = gen.generate(speaker, num_samples=2, seed=3, steps=2)
    assert [bool((c == 0).all()) for c in conds] == [False, True] * 2   # speaker, then null, per step
    plain = gen.generate(speaker, num_samples=2, seed=3, steps=2, guidance=1.0)
    assert not torch.allclose(guided.emotion, plain.emotion)
    gen.denoiser.forward = real
    gen.save(tmp_path / "g.pt")
    loaded = type(gen).load(tmp_path / "g.pt")
    assert loaded.config.diffusion.guidance == 2.0
    torch.testing.assert_close(loaded.generate(speaker, num_samples=2, seed=3, steps=2).emotion, guided.emotion)
