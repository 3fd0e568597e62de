"""Stage-2 diffusion process: noise schedule, forward noising, ε-prediction loss, DDIM sampler.

Model-free on purpose (diffusers/k-diffusion style): nothing here owns a network. The
denoiser enters as a function ``denoiser_fn(x_t, t, cond) -> ε̂`` so the same sampler serves
the 1-D UNet, a test double, or a wrapped DDP module.

Reference behaviour (model.md §4.6): cosine schedule (Nichol & Dhariwal 2021, s = 0.008)
discretised to 20 steps with β capped at 0.999; the network predicts ε; the loss is
10 · mean |ε̂ − ε|; sampling is DDIM (Song et al. 2021) with η = 0 over all 20 steps, x̂₀
clamped to [−1, 1] and ε re-derived from the clamped x̂₀.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

DenoiserFn = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]
# "epsilon": the network predicts the added noise (DDPM, the reference). "x0": it predicts the
# clean sample; on small data and few steps this gives smoother, better-conditioned latents
# (docs/model.md has the measurements), and the sampler re-derives ε from it.
PREDICTIONS = ("epsilon", "x0")


@dataclass
class DiffusionConfig:
    num_timesteps: int = 20        # training steps T (reference: 20)
    schedule: str = "cosine"       # only the reference's cosine schedule is implemented
    cosine_s: float = 0.008        # offset s of the cosine schedule
    max_beta: float = 0.999        # β cap; makes the last step (almost) pure noise
    loss: str = "l1"               # "l1" (reference) or "l2" on ε
    loss_weight: float = 10.0      # reference multiplier: loss = 10 · mean |ε̂ − ε|
    clip_x0: bool = True           # clamp x̂₀ to [−1, 1] while sampling (latents are min-max normalised)
    eta: float = 0.0               # DDIM stochasticity; 0 = deterministic given x_T (reference)
    prediction: str = "epsilon"    # what the network predicts: "epsilon" (reference) or "x0"
    # Classifier-free guidance (Ho & Salimans 2022; not in the reference): while training, each
    # example's speaker condition is replaced by the null condition (zeros) with probability
    # ``cond_drop``, so one network learns p(listener | speaker) and p(listener); sampling then
    # extrapolates output_null + guidance · (output_speaker − output_null). guidance = 1 is the plain
    # conditional model (one denoiser call per step); > 1 costs two and strengthens the speaker's pull.
    cond_drop: float = 0.0
    guidance: float = 1.0

    def __post_init__(self) -> None:
        if self.schedule != "cosine":
            raise ValueError(f"diffusion.schedule={self.schedule!r}: only 'cosine' is implemented")
        if self.loss not in ("l1", "l2"):
            raise ValueError(f"diffusion.loss={self.loss!r}: expected 'l1' or 'l2'")
        if self.num_timesteps < 1:
            raise ValueError("diffusion.num_timesteps must be ≥ 1")
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"diffusion.prediction={self.prediction!r}: expected one of {PREDICTIONS}")
        if not 0.0 <= self.cond_drop < 1.0:
            raise ValueError(f"diffusion.cond_drop={self.cond_drop}: expected a probability in [0, 1)")
        if self.guidance < 0:
            raise ValueError(f"diffusion.guidance={self.guidance}: expected ≥ 0 (1 = no guidance)")


# ----------------------------------------------------------------------------------------------
# Schedule
# ----------------------------------------------------------------------------------------------

def cosine_betas(num_timesteps: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """β_t = min(1 − ᾱ(t+1)/ᾱ(t), max_beta) with ᾱ(t) = cos²(((t/T) + s)/(1 + s) · π/2).

    Improved DDPM (Nichol & Dhariwal 2021, eq. 17), discretised as OpenAI's
    ``betas_for_alpha_bar``. Computed in float64 on the CPU with plain math so it also works
    while a ``torch.device("meta")`` context is active.
    """
    def alpha_bar(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float64, device="cpu")


class NoiseSchedule:
    """A discrete variance-preserving schedule: q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I).

    Tensors are float64 on the CPU; the methods gather the needed entries and cast them to the
    device/dtype of the data, so one schedule serves every device.
    """

    def __init__(self, betas: Tensor):
        self.betas = betas.to(device="cpu", dtype=torch.float64)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        # ᾱ_{-1} := 1, so the last DDIM step (t = 0 → "t = −1") returns x̂₀ itself.
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64, device="cpu"),
                                              self.alphas_cumprod[:-1]])

    @classmethod
    def from_config(cls, config: DiffusionConfig) -> "NoiseSchedule":
        return cls(cosine_betas(config.num_timesteps, config.cosine_s, config.max_beta))

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    def _gather(self, values: Tensor, t: Tensor | int, like: Tensor) -> Tensor:
        """values[t] shaped to broadcast against ``like`` ([N] → [N, 1, 1, ...])."""
        if isinstance(t, int):
            return torch.tensor(float(values[t]), dtype=like.dtype, device=like.device)
        out = values[t.detach().to("cpu", torch.long)].to(device=like.device, dtype=like.dtype)
        return out.reshape(out.shape + (1,) * (like.dim() - out.dim()))

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor | int) -> Tensor:
        """Forward process sample x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε (DDPM eq. 4)."""
        abar = self._gather(self.alphas_cumprod, t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    q_sample = add_noise  # the name used by the OpenAI/DiT code base

    def predict_x0(self, x_t: Tensor, eps: Tensor, t: Tensor | int) -> Tensor:
        """x̂_0 = √(1/ᾱ_t) · x_t − √(1/ᾱ_t − 1) · ε̂ (inverse of ``add_noise``)."""
        abar = self._gather(self.alphas_cumprod, t, x_t)
        return (1 / abar).sqrt() * x_t - (1 / abar - 1).sqrt() * eps

    def predict_eps(self, x_t: Tensor, x0: Tensor, t: Tensor | int) -> Tensor:
        """ε = (√(1/ᾱ_t) · x_t − x̂_0) / √(1/ᾱ_t − 1)."""
        abar = self._gather(self.alphas_cumprod, t, x_t)
        return ((1 / abar).sqrt() * x_t - x0) / (1 / abar - 1).sqrt()

    def step(self, eps: Tensor, t: int, x_t: Tensor, t_prev: int | None = None, *, eta: float = 0.0,
             clip_x0: bool = True, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """diffusers-style alias of ``ddim_step``: x_t → (x_{t_prev}, x̂₀); t_prev defaults to t − 1."""
        return ddim_step(self, eps, t, t - 1 if t_prev is None else t_prev, x_t, eta=eta, clip_x0=clip_x0, noise=noise)

    def timesteps(self, steps: int | None = None) -> list[int]:
        """Descending timesteps for sampling: all T (reference) or an evenly spaced subset.

        The subset always contains T − 1 (start from pure noise) and 0 (end on x̂₀), e.g.
        T = 20, steps = 5 → [19, 14, 10, 5, 0].
        """
        T = self.num_timesteps
        steps = T if steps is None else int(steps)
        if not 1 <= steps <= T:
            raise ValueError(f"steps must be in 1..{T} (the training timesteps), got {steps}")
        if steps == 1:
            return [T - 1]
        grid = [round(i * (T - 1) / (steps - 1)) for i in range(steps)]
        return sorted(set(grid), reverse=True)


# ----------------------------------------------------------------------------------------------
# Training loss
# ----------------------------------------------------------------------------------------------

def epsilon_loss(denoiser_fn: DenoiserFn, x0: Tensor, schedule: NoiseSchedule, cond: Tensor | None = None,
                 *, loss: str = "l1", weight: float = 10.0, prediction: str = "epsilon",
                 cond_drop: float = 0.0, generator: torch.Generator | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Denoising loss, t ~ U{0..T−1} and ε ~ N(0, I) per example (DDPM "L_simple").

    Returns ``weight · mean |ε̂ − ε|`` (or squared for ``loss="l2"``) and the unweighted term;
    with ``prediction="x0"`` the network's output is compared with x₀ instead of ε.
    ``cond_drop``: probability that an example trains with the null condition (zeros), for
    classifier-free guidance. Random numbers come from ``generator`` (on its device) when given.
    """
    n = x0.shape[0]
    gen_device = generator.device if generator is not None else x0.device
    t = torch.randint(0, schedule.num_timesteps, (n,), generator=generator, device=gen_device).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=x0.dtype).to(x0.device)
    if cond is not None and cond_drop > 0:     # drawn after t and ε: cond_drop = 0 keeps old streams
        keep = torch.rand((n,), generator=generator, device=gen_device) >= cond_drop
        cond = cond * keep.to(cond.device, cond.dtype).reshape((n,) + (1,) * (cond.dim() - 1))
    x_t = schedule.add_noise(x0, noise, t)
    out = denoiser_fn(x_t, t, cond)
    target, name = (noise, "eps") if prediction == "epsilon" else (x0, "x0")
    term = F.l1_loss(out, target) if loss == "l1" else F.mse_loss(out, target)
    return weight * term, {f"{name}_{loss}": term.detach()}


# ----------------------------------------------------------------------------------------------
# DDIM sampling
# ----------------------------------------------------------------------------------------------

def ddim_step(schedule: NoiseSchedule, eps: Tensor, t: int, t_prev: int, x_t: Tensor, *, eta: float = 0.0,
              clip_x0: bool = True, noise: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """One DDIM update x_t → x_{t_prev} (Song et al. 2021, eq. 12); ``t_prev = -1`` means "to x_0".

    x̂₀ = √(1/ᾱ_t) x_t − √(1/ᾱ_t − 1) ε̂, clamped to [−1, 1] when ``clip_x0``, and ε is then
    re-derived from the clamped x̂₀ (as the reference/OpenAI code does);
    σ = η √((1 − ᾱ_prev)/(1 − ᾱ_t)) √(1 − ᾱ_t/ᾱ_prev);
    x_prev = √ᾱ_prev x̂₀ + √(1 − ᾱ_prev − σ²) ε + σ z.
    Returns (x_prev, x̂₀).
    """
    x0 = schedule.predict_x0(x_t, eps, t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = schedule.predict_eps(x_t, x0, t)
    if t_prev < 0:
        return x0, x0
    abar = float(schedule.alphas_cumprod[t])
    abar_prev = float(schedule.alphas_cumprod[t_prev])
    sigma = eta * math.sqrt((1 - abar_prev) / (1 - abar)) * math.sqrt(1 - abar / abar_prev)
    x_prev = math.sqrt(abar_prev) * x0 + math.sqrt(max(1 - abar_prev - sigma ** 2, 0.0)) * eps
    if sigma > 0:
        if noise is None:
            raise ValueError("ddim_step with eta > 0 needs a noise tensor")
        x_prev = x_prev + sigma * noise
    return x_prev, x0


def randn(shape: tuple[int, ...], generator: torch.Generator | Sequence[torch.Generator] | None,
          device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """N(0, I) drawn on the generator's device (CPU by default) in float32, then moved/cast.

    With a sequence of n generators the leading dimension is split into n equal blocks, block
    i drawn from generator i: each block's noise is then independent of the other blocks.
    """
    gens = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    if shape[0] % len(gens):
        raise ValueError(f"{len(gens)} generators cannot split a leading dimension of {shape[0]}")
    block = (shape[0] // len(gens), *shape[1:])
    parts = [torch.randn(block, generator=g, device=g.device if g is not None else "cpu", dtype=torch.float32)
             for g in gens]
    return torch.cat(parts).to(device, dtype) if len(parts) > 1 else parts[0].to(device, dtype)


@torch.no_grad()
def ddim_sample(denoiser_fn: DenoiserFn, shape: tuple[int, ...], schedule: NoiseSchedule,
                cond: Tensor | None = None, steps: int | None = None, eta: float = 0.0,
                generator: torch.Generator | Sequence[torch.Generator] | None = None, *, clip_x0: bool = True,
                device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
                noise: Tensor | None = None, prediction: str = "epsilon", guidance: float = 1.0) -> Tensor:
    """DDIM sampling (Song et al. 2021, Algorithm of §4.1) from x_T ~ N(0, I) to x̂₀.

    One call of ``denoiser_fn`` per step on the whole batch. Noise is drawn from
    ``generator`` on the generator's own device (CPU by default) and then moved, so a seed
    gives the same x_T on every device; a sequence of generators gives each equal block of the
    batch its own stream (see ``randn``). ``noise`` overrides the initial x_T.
    ``prediction="x0"``: the denoiser returns x̂₀, from which ε̂ is derived for the update.
    ``guidance`` ≠ 1 (classifier-free guidance): each step denoises the batch with ``cond`` and
    with the null condition (zeros) and uses null + guidance · (cond − null); the
    output is affine in x̂₀ and ε̂ alike, so guiding either prediction is the same update.
    """
    device = torch.device(device) if device is not None else (cond.device if cond is not None else torch.device("cpu"))
    x = noise.to(device, dtype) if noise is not None else randn(shape, generator, device, dtype)
    ts = schedule.timesteps(steps)
    for i, t in enumerate(ts):
        t_prev = ts[i + 1] if i + 1 < len(ts) else -1
        t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
        eps = _guided(denoiser_fn, x, t_batch, cond, guidance)
        if prediction == "x0":
            eps = schedule.predict_eps(x, eps, t)
        step_noise = randn(shape, generator, device, dtype) if (eta > 0 and t_prev >= 0) else None
        x, _ = ddim_step(schedule, eps, t, t_prev, x, eta=eta, clip_x0=clip_x0, noise=step_noise)
    return x


def _guided(denoiser_fn: DenoiserFn, x: Tensor, t: Tensor, cond: Tensor | None, guidance: float) -> Tensor:
    """The denoiser's output, classifier-free guided when ``guidance`` ≠ 1 (see ``ddim_sample``)."""
    if cond is None or guidance == 1.0:
        return denoiser_fn(x, t, cond)
    # Two calls rather than one on [cond; null]: a doubled batch left the CPU caches and cost
    # 0.55 s per call of 2 × 10 clips against 0.35 s for the two halves (small-temporal, 2 threads).
    speaker, null = denoiser_fn(x, t, cond), denoiser_fn(x, t, torch.zeros_like(cond))
    return null + guidance * (speaker - null)
