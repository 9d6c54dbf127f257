"""SINE stage one: fine-tune on a single image (docs/method.md §2), model-agnostic and in plain torch.

The caller supplies the denoiser (any callable returning ComfyUI-style *denoised* predictions) and a schedule
object with ComfyUI's `model_sampling` interface; the loss is taken in the model's own output space (ε for
SD1.x, v for SD2.x-v, ...), with timesteps drawn uniformly over the schedule as in the original code.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Protocol

import torch

from .config import OptimConfig


class Schedule(Protocol):
    """The part of ComfyUI's `model_sampling` the training step needs."""
    sigmas: torch.Tensor  # (T,) noise level of each training timestep, ascending

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False) -> torch.Tensor: ...

    def calculate_denoised(self, sigma, model_output, model_input) -> torch.Tensor: ...


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""

    def __init__(self, step: int, lr: float):
        super().__init__(f"the loss became NaN/Inf at step {step}; lower the learning rate (now {lr:g}), e.g. to "
                         f"{lr / 10:g}, or train in fp32")
        self.step = step


def output_space_scale(schedule: Schedule, sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """b(σ) with denoised = a(σ, x) + b(σ)·model_output; ComfyUI's parameterisations are all affine in the output."""
    ones = torch.ones_like(like)
    return schedule.calculate_denoised(sigma, ones, torch.zeros_like(like))


def denoising_loss(schedule: Schedule, sigma: torch.Tensor, denoised: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """MSE between the model output and its training target (ε-MSE for ε models, v-MSE for v models, ...).

    Since denoised = a + b·output and the target output is the one that denoises to x0 exactly,
    output - target = (denoised - x0) / b: no model-specific formula is needed.
    """
    b = output_space_scale(schedule, sigma, x0)
    return ((denoised.float() - x0.float()) / b.float()).pow(2).mean()


def sample_timesteps(schedule: Schedule, batch: int, generator: torch.Generator) -> torch.Tensor:
    """t ~ U{0..T-1} as LatentDiffusion.p_losses, returned as the schedule's σ(t)."""
    t = torch.randint(0, len(schedule.sigmas), (batch,), generator=generator)
    return schedule.sigmas.detach().cpu()[t]


def noisy_latent(schedule: Schedule, x0: torch.Tensor, generator: torch.Generator):
    """(σ, ε, x_σ): one draw of the forward process for a training step."""
    sigma = sample_timesteps(schedule, x0.shape[0], generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    return sigma, noise, schedule.noise_scaling(sigma, noise, x0)


def normal_tensor_view(t: torch.Tensor) -> torch.Tensor:
    """A zero-copy view of `t` that autograd may save: tensors made under torch.inference_mode cannot be.

    ComfyUI loads models inside inference mode, so their weights are inference tensors; a backward pass through
    them fails ("Inference tensors cannot be saved for backward"). Sharing the storage avoids copying the model.
    """
    if not t.is_inference():
        return t
    with torch.inference_mode(False):
        view = torch.empty(0, dtype=t.dtype, device=t.device)
        view.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return view


def train(params: Iterable[torch.nn.Parameter], loss_at_step: Callable[[int], torch.Tensor], config: OptimConfig,
          on_step: Callable[[int, float], None] = lambda step, loss: None):
    """Run AdamW for `config.steps` steps; `loss_at_step(i)` builds step i's loss. Returns the loss per step.

    `on_step(i, loss)` runs after each step (progress, cancel: it may raise to stop). The optimizer's state is
    freed before returning, also when stopped.
    """
    params = [p for p in params if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    losses: list[float] = []
    try:
        for step in range(config.steps):
            loss = loss_at_step(step)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise TrainingDiverged(step + 1, config.learning_rate)
            loss.backward()
            if config.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(value)
            on_step(step + 1, value)
    finally:
        optimizer.zero_grad(set_to_none=True)
        optimizer.state.clear()
        del optimizer
    return losses
