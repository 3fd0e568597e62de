"""Both stages learn a tiny synthetic problem; EMA and optimiser helpers."""

from __future__ import annotations

import pytest
import torch

from reactdiff.training import EMA, TrainSettings, make_optimizer


def test_stage1_training_reduces_the_autoencoder_loss(make_features, make_tiny):
    gen = make_tiny(stage1={"lr": 3e-3})
    feats = make_features(gen.feature_widths, 8, 40, seed=10)
    g = torch.Generator().manual_seed(11)
    # Per-frame targets that depend on the person's own features (the stage-1 task).
    emotion = torch.sigmoid(feats["video_a"] @ torch.randn(12, 25, generator=g))
    tdmm = torch.cat([feats["video_b"], feats["audio_x"]], -1) @ (0.3 * torch.randn(11, 58, generator=g))
    opt = make_optimizer(gen.set_trainable("autoencoder"), gen.config.stage1)
    ema = EMA(gen, decay=0.9)
    assert set(ema.shadow) == {n for n, _ in gen.named_parameters() if n.startswith("autoencoder.")}
    losses = []
    for _ in range(150):
        loss, parts = gen.autoencoder_loss(feats, emotion, tdmm)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update(gen)
        losses.append(loss.item())
    assert set(parts) == {"emotion_l1", "tdmm_mse"}
    assert sum(losses[-10:]) / 10 < 0.5 * losses[0], (losses[0], losses[-10:])
    gen.eval()
    with torch.no_grad(), ema.average_parameters(gen):
        ema_loss = gen.autoencoder_loss(feats, emotion, tdmm)[0].item()
    assert ema_loss < 0.6 * losses[0]


def test_stage2_training_reduces_the_diffusion_loss_and_uses_the_speaker(make_features, make_tiny):
    gen = make_tiny(stage2={"lr": 2e-3})
    speaker = make_features(gen.feature_widths, 16, 40, seed=20)
    # Listener behaviour is a deterministic function of the speaker's: a conditioned problem.
    listener = {n: -x.roll(3, dims=1) for n, x in speaker.items()}
    gen.update_statistics(speaker)
    gen.update_statistics(listener)
    frozen = {n: p.detach().clone() for n, p in gen.autoencoder.named_parameters()}
    opt = make_optimizer(gen.set_trainable("diffusion"), gen.config.stage2)

    def held_out_loss(spk) -> float:
        g = torch.Generator().manual_seed(123)      # same t and ε for every evaluation
        with torch.no_grad():
            return sum(gen.diffusion_loss(spk, listener, generator=g)[0].item() for _ in range(6)) / 6

    before = held_out_loss(speaker)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        loss, parts = gen.diffusion_loss(speaker, listener, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = held_out_loss(speaker)
    # The zero-initialised UNet starts at ε̂ = 0, i.e. 10 · E|ε| ≈ 7.98.
    assert before == pytest.approx(10 * (2 / torch.pi) ** 0.5, rel=0.05)
    assert after < 0.7 * before, (before, after)
    # Pairing each listener with another clip's speaker makes the prediction worse.
    mismatched = held_out_loss({n: x.roll(1, dims=0) for n, x in speaker.items()})
    assert mismatched > 1.05 * after, (after, mismatched)
    # Stage 1 stayed frozen.
    assert all(torch.equal(p, frozen[n]) for n, p in gen.autoencoder.named_parameters())
    assert set(parts) == {"eps_l1"}


def test_latent_diffusion_loss_equals_the_feature_path(make_features, make_tiny):
    """A trainer may cache the frozen stage-1 latents; the loss must be the same."""
    gen = make_tiny()
    speaker, listener = make_features(gen.feature_widths, 3, 41, seed=1), make_features(gen.feature_widths, 3, 41, seed=2)
    gen.update_statistics(speaker)
    gen.update_statistics(listener)
    with torch.no_grad():
        z_s, z_l = gen.encode(speaker), gen.encode(listener)        # 41 frames: cropped inside
    a, _ = gen.diffusion_loss(speaker, listener, generator=torch.Generator().manual_seed(3))
    b, _ = gen.latent_diffusion_loss(z_s, z_l, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)
    b.backward()
    assert gen.cond.proj.weight.grad is not None and gen.autoencoder.encoder.map_mlp[0].weight.grad is None


def test_ema_update_copy_and_restore():
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        model.weight.fill_(1.0)
        model.bias.fill_(0.0)
    ema = EMA(model, decay=0.75)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), 1.5))   # 0.75·1 + 0.25·3
    with ema.average_parameters(model):
        assert torch.allclose(model.weight, torch.full((2, 3), 1.5))
    assert torch.allclose(model.weight, torch.full((2, 3), 3.0))           # live weights restored
    state = ema.state_dict()
    other = EMA(torch.nn.Linear(3, 2), decay=0.1)
    other.load_state_dict(state)
    assert other.decay == 0.75 and other.num_updates == 1
    assert torch.equal(other.shadow["weight"], ema.shadow["weight"])
    ema.copy_to(model)
    assert torch.allclose(model.weight, torch.full((2, 3), 1.5))
    wrapped = torch.nn.Module()
    wrapped.module = model                                                 # DDP-style wrapper
    ema.update(wrapped)
    assert ema.num_updates == 2
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


def test_make_optimizer_uses_the_settings():
    params = [torch.nn.Parameter(torch.zeros(2))]
    opt = make_optimizer(params, TrainSettings(lr=5e-5, weight_decay=5e-4, betas=(0.8, 0.99)))
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (5e-5, 5e-4, (0.8, 0.99))


def test_set_trainable_selects_one_stage(make_tiny):
    gen = make_tiny()
    params = gen.set_trainable("diffusion")
    trainable = {n for n, p in gen.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in gen.named_parameters() if n.startswith(("cond.", "denoiser."))}
    assert len(params) == len(trainable)
    gen.set_trainable("autoencoder")
    assert all(p.requires_grad == n.startswith("autoencoder.") for n, p in gen.named_parameters())
    assert gen.train_settings("diffusion") is gen.config.stage2
    with pytest.raises(ValueError):
        gen.set_trainable("everything")
