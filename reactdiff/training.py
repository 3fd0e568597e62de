"""Training helpers shared by both stages: typed train settings, AdamW factory, EMA.

Pure PyTorch; the distributed loop (Ray Train) lives in ``pipeline/`` and uses these. torch is
imported where it is used: job configs declare their optimisation settings as ``TrainSettings``,
and a command line that only parses them should not pay for importing torch.
Reference settings (model.md §3.6, §4.7): AdamW with betas (0.9, 0.999), no LR schedule,
EMA of the trainable parameters with decay 0.999 updated after every optimiser step, and the
EMA weights are the ones that are validated and saved.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping

from reactdiff.config import option

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import Tensor, nn


@dataclass
class TrainSettings:
    """How one stage is optimised. A preset holds the reference values of both stages; a
    training run uses them with its own overrides (:meth:`with_overrides`)."""

    lr: float = option(1e-4, "learning rate (preset: small 1e-3 / 5e-4, paper 1e-4 / 5e-5 for stage 1 / 2)")
    weight_decay: float = option(5e-4, "AdamW weight decay (preset: 5e-4)")
    betas: tuple[float, float] = option((0.9, 0.999), "AdamW betas (preset: [0.9, 0.999])")
    eps: float = option(1e-8, "AdamW eps (preset: 1e-8)")
    ema_decay: float = option(0.999, "EMA decay of the exported weights (preset: small 0.99, paper 0.999)")
    epochs: int = option(200, "epochs of the stage (preset: small 30, paper 200)")
    batch_size: int = option(16, "clips (stage 1) / directed items (stage 2) per optimiser step, all workers "
                                 "together; must divide by num_workers (preset: small 8, paper 16)")
    grad_clip: float | None = option(None, "max global grad norm; null = no clipping (reference)")

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2:
            raise ValueError("betas must have two values")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    def with_overrides(self, overrides: Mapping[str, Any]) -> "TrainSettings":
        """These (a preset's) settings with each non-None value of ``overrides`` replacing its field."""
        unknown = sorted(set(overrides) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown train setting {unknown[0]!r}")
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict[str, Any]:
        """Plain, JSON/YAML-compatible values (betas as a list)."""
        out = dataclasses.asdict(self)
        out["betas"] = list(out["betas"])
        return out


def make_optimizer(params: Iterable[nn.Parameter] | Iterable[dict], settings: TrainSettings) -> torch.optim.AdamW:
    """AdamW(lr, betas, eps, weight_decay) from a preset's train settings (no LR schedule, as the reference)."""
    import torch

    return torch.optim.AdamW(params, lr=settings.lr, betas=settings.betas, eps=settings.eps,
                             weight_decay=settings.weight_decay)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / FSDP-style wrappers (they expose ``.module``)."""
    from torch import nn

    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


class EMA:
    """Exponential moving average of the trainable parameters: θ̄ ← d·θ̄ + (1 − d)·θ.

    The tracked set is the parameters with ``requires_grad`` when the EMA is created (call
    ``generator.set_trainable(stage)`` first so a frozen stage is not copied). Shadows are
    float32 clones on the parameters' device.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            name: p.detach().clone().float() for name, p in _unwrap(model).named_parameters() if p.requires_grad
        }

    def update(self, model: nn.Module) -> None:
        """One EMA step; call after every optimiser step."""
        import torch

        params = dict(_unwrap(model).named_parameters())
        with torch.no_grad():
            for name, shadow in self.shadow.items():
                shadow.lerp_(params[name].detach().float(), 1.0 - self.decay)
        self.num_updates += 1

    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's tracked parameters with the averaged values."""
        import torch

        params = dict(_unwrap(model).named_parameters())
        with torch.no_grad():
            for name, shadow in self.shadow.items():
                params[name].copy_(shadow.to(params[name].dtype))

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily swap in the EMA weights (validation, export), restoring the live ones after.

        Avoids the reference's side effect of continuing training from the EMA weights (§7.1.5).
        """
        import torch

        params = dict(_unwrap(model).named_parameters())
        backup = {name: params[name].detach().clone() for name in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    params[name].copy_(value)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {len(missing)} tracked parameters, e.g. {sorted(missing)[:3]}")
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for name, value in state["shadow"].items():
            if name in self.shadow:
                self.shadow[name].copy_(value)
