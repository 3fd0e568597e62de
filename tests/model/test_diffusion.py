"""Schedule, forward process, ε loss and DDIM sampler (model-free)."""

from __future__ import annotations

import pytest
import torch

from reactdiff.diffusion import DiffusionConfig, NoiseSchedule, ddim_sample, epsilon_loss


@pytest.fixture
def schedule() -> NoiseSchedule:
    return NoiseSchedule.from_config(DiffusionConfig())


def test_cosine_schedule_matches_reference_values(schedule):
    # model.md §4.6
    abar, beta = schedule.alphas_cumprod, schedule.betas
    assert schedule.num_timesteps == 20
    assert abar[:3].tolist() == pytest.approx([0.99201, 0.97209, 0.94074], abs=1e-5)
    assert abar[17].item() == pytest.approx(0.02409, abs=1e-5)
    assert abar[18].item() == pytest.approx(0.00606, abs=1e-5)
    assert abar[19].item() == pytest.approx(6.06e-6, rel=1e-3)
    assert beta[0].item() == pytest.approx(0.00799, abs=1e-5)
    assert beta[18].item() == pytest.approx(0.7485, abs=1e-4)
    assert beta[19].item() == 0.999                                   # the cap
    assert torch.all(beta[1:] > beta[:-1])


def test_add_noise_and_its_inverses(schedule):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, generator=g), torch.randn(4, 3, 8, generator=g)
    t = torch.tensor([0, 5, 12, 19])
    x_t = schedule.add_noise(x0, noise, t)
    abar = schedule.alphas_cumprod[t].float().view(4, 1, 1)
    torch.testing.assert_close(x_t, abar.sqrt() * x0 + (1 - abar).sqrt() * noise)
    torch.testing.assert_close(schedule.predict_x0(x_t, noise, t), x0, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(schedule.predict_eps(x_t, x0, t), noise, atol=1e-4, rtol=1e-4)
    assert schedule.q_sample(x0, noise, 3).shape == x0.shape


def test_sampling_timesteps(schedule):
    assert schedule.timesteps() == list(range(19, -1, -1))
    assert schedule.timesteps(5) == [19, 14, 10, 5, 0]
    assert schedule.timesteps(2) == [19, 0]
    assert schedule.timesteps(1) == [19]
    with pytest.raises(ValueError):
        schedule.timesteps(21)


@pytest.mark.parametrize("steps", [20, 7, 2])
def test_ddim_with_oracle_denoiser_recovers_x0(schedule, steps):
    """If ε̂ is the true noise direction of a known x₀ ∈ [−1, 1], DDIM(η=0) lands on x₀ exactly."""
    x0 = torch.rand(6, 4, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    calls = []

    def oracle(x_t, t, cond):
        calls.append(int(t[0]))
        return schedule.predict_eps(x_t, x0, t)

    out = ddim_sample(oracle, x0.shape, schedule, steps=steps, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x0, atol=1e-4, rtol=1e-4)
    assert calls == schedule.timesteps(steps)                          # one batched call per step


def test_ddim_clamps_x0_and_is_seeded(schedule):
    def wild(x_t, t, cond):          # predicts a huge ε → x̂₀ far outside [−1, 1]
        return -50 * torch.ones_like(x_t)

    a = ddim_sample(wild, (3, 2, 4), schedule, generator=torch.Generator().manual_seed(0))
    assert a.abs().max() <= 1.0
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    s1 = ddim_sample(zero, (3, 2, 4), schedule, generator=torch.Generator().manual_seed(7))
    s2 = ddim_sample(zero, (3, 2, 4), schedule, generator=torch.Generator().manual_seed(7))
    s3 = ddim_sample(zero, (3, 2, 4), schedule, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(s1, s2)
    assert not torch.allclose(s1, s3)
    # η > 0 injects fresh noise along the way.
    e1 = ddim_sample(zero, (3, 2, 4), schedule, eta=1.0, generator=torch.Generator().manual_seed(7))
    assert not torch.allclose(e1, s1)


def test_epsilon_loss_is_ten_times_l1(schedule):
    x0 = torch.randn(8, 4, 6)
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    loss, parts = epsilon_loss(zero, x0, schedule, weight=10.0, generator=g)
    # with ε̂ = 0 the L1 term is mean |ε| for the noise drawn after t from the same generator
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 20, (8,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert parts["eps_l1"].item() == pytest.approx(noise.abs().mean().item(), rel=1e-6)
    assert loss.item() == pytest.approx(10 * parts["eps_l1"].item(), rel=1e-6)

    def perfect(x_t, t, cond):      # knows x0 → recovers ε exactly
        return schedule.predict_eps(x_t, x0, t)

    loss, _ = epsilon_loss(perfect, x0, schedule, generator=torch.Generator().manual_seed(0))
    assert loss.item() < 1e-3


def test_step_walks_the_reverse_process_like_the_sampler(schedule):
    """Driving ``schedule.step`` by hand (diffusers style) equals ``ddim_sample``."""
    eps_fn = lambda x, t, c: 0.1 * x  # noqa: E731
    x_T = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(4))
    x = x_T
    for t in schedule.timesteps(5):
        ts = schedule.timesteps(5)
        t_prev = ts[ts.index(t) + 1] if t != ts[-1] else -1
        x, _ = schedule.step(eps_fn(x, t, None), t, x, t_prev)
    torch.testing.assert_close(x, ddim_sample(eps_fn, x_T.shape, schedule, steps=5, noise=x_T))


def test_condition_dropout_trains_the_null_condition(schedule):
    """cond_drop replaces whole examples' conditions by zeros, at about the asked rate."""
    x0, cond = torch.randn(400, 3, 4), torch.ones(400, 3, 5)
    seen = []

    def record(x_t, t, c):
        seen.append(c.clone())
        return torch.zeros_like(x_t)

    epsilon_loss(record, x0, schedule, cond, generator=torch.Generator().manual_seed(0))
    epsilon_loss(record, x0, schedule, cond, cond_drop=0.25, generator=torch.Generator().manual_seed(0))
    plain, dropped = seen
    assert torch.equal(plain, cond)                                 # cond_drop = 0: untouched
    per_example = dropped.flatten(1)
    assert set(per_example.amax(1).tolist()) == {0.0, 1.0}          # whole examples, never parts
    assert torch.equal(per_example.amin(1), per_example.amax(1))
    assert 0.15 < (per_example.amax(1) == 0).float().mean().item() < 0.35
    with pytest.raises(ValueError, match="cond_drop"):
        DiffusionConfig(cond_drop=1.0)


def test_guidance_extrapolates_from_the_null_condition(schedule):
    """guidance g: a call with cond and one with zeros per step, output null + g · (cond − null)."""
    calls = []

    def linear(x_t, t, c):           # ε̂ depends on the condition's mean, so cond ≠ null matters
        calls.append(x_t.shape[0])
        return 0.1 * x_t + c.mean(dim=(1, 2), keepdim=True)

    x_T = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(2))
    cond = torch.full((3, 2, 4), 0.3)
    plain = ddim_sample(linear, x_T.shape, schedule, cond, steps=4, noise=x_T, clip_x0=False)
    assert calls == [3] * 4
    calls.clear()
    guided = ddim_sample(linear, x_T.shape, schedule, cond, steps=4, noise=x_T, clip_x0=False, guidance=2.0)
    assert calls == [3] * 8
    # Guidance 2 on this denoiser is the plain sampler with the condition doubled.
    doubled = ddim_sample(linear, x_T.shape, schedule, 2 * cond, steps=4, noise=x_T, clip_x0=False)
    torch.testing.assert_close(guided, doubled)
    assert not torch.allclose(guided, plain)
    # Guidance 0 is the unconditional model.
    null = ddim_sample(linear, x_T.shape, schedule, torch.zeros_like(cond), steps=4, noise=x_T, clip_x0=False)
    torch.testing.assert_close(ddim_sample(linear, x_T.shape, schedule, cond, steps=4, noise=x_T, clip_x0=False,
                                           guidance=0.0), null)
