"""SINE stage one: fine-tune on a single image (docs/method.md §2), model-agnostic and in plain torch.

The caller supplies the denoiser (any callable returning ComfyUI-style *denoised* predictions) and a schedule
object with ComfyUI's `model_sampling` interface; the loss is taken in the model's own output space (ε for
SD1.x, v for SD2.x-v, ...), with timesteps drawn uniformly over the schedule as in the original code.

A run can stop and continue: step k's randomness comes from `step_generator(seed, k)` (the same whatever step the
run started at), and `train` takes and reports the AdamW state, so 200 steps + 200 more = 400 steps at once.
"""
from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F

from .config import OptimConfig
from .tensor_views import content_stamp


class Schedule(Protocol):
    """The part of ComfyUI's `model_sampling` the training step needs."""
    sigmas: torch.Tensor  # (T,) noise level of each training timestep, ascending

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False) -> torch.Tensor: ...

    def calculate_denoised(self, sigma, model_output, model_input) -> torch.Tensor: ...

    def timestep(self, sigma) -> torch.Tensor: ...  # t in 0..T-1 (ComfyUI's model_sampling.timestep)


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


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """mean(values), or with `weight` (broadcastable to values, e.g. a (1, 1, h, w) mask) the weighted mean
    sum(w·v) / sum(w). Written as mean(w·v)·(N / sum w), so an all-ones weight gives mean(v) bit for bit."""
    if weight is None:
        return values.mean()
    total = weight.float().expand_as(values).sum()
    return (values * weight.float()).mean() * (values.numel() / total)


def denoising_loss(schedule: Schedule, sigma: torch.Tensor, denoised: torch.Tensor, x0: torch.Tensor,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """MSE between the model output and its training target (ε-MSE for ε models, v-MSE for v models, ...).

    Since denoised = a + b·output and the target output is the one that denoises to x0 exactly,
    output - target = (denoised - x0) / b: no model-specific formula is needed. `weight`: a per-pixel loss
    weight (the user's mask on the latent), None = uniform.
    """
    b = output_space_scale(schedule, sigma, x0)
    return weighted_mean(((denoised.float() - x0.float()) / b.float()).pow(2), weight)


RECON_POOL = 64  # the official L_rec compares 64x64 average-pooled latents (the SD1.x training latent: identity)


def reconstruction_loss(schedule: Schedule, sigma: torch.Tensor, denoised: torch.Tensor, x0: torch.Tensor,
                        weight: torch.Tensor | None = None) -> torch.Tensor:
    """The official patch configs' L_rec (docs/method.md §2): mean over the batch of
    (t/T)² · mean|pool(x̂0) - pool(x0)|, with x̂0 the model's denoised prediction (in ComfyUI's σ-space the
    official (z_t - sqrt(1-ᾱ)ε̂)/sqrt(ᾱ) is exactly `denoised`) and pool = adaptive average pooling to 64x64;
    a latent side of 64 or less is left as is (pooling to a larger size would only repeat pixels)."""
    size = (min(RECON_POOL, x0.shape[-2]), min(RECON_POOL, x0.shape[-1]))
    diff = (F.adaptive_avg_pool2d(denoised.float(), size) - F.adaptive_avg_pool2d(x0.float(), size)).abs()
    if weight is not None:
        weight = F.adaptive_avg_pool2d(weight.float(), size).expand(diff.shape[0], -1, -1, -1)
    t = schedule.timestep(sigma).float().reshape(-1).to(diff.device) / len(schedule.sigmas)
    per_item = torch.stack([weighted_mean(diff[i:i + 1], None if weight is None else weight[i:i + 1])
                            for i in range(diff.shape[0])])
    return (t ** 2 * per_item).mean()


def step_generator(seed: int, step: int) -> torch.Generator:
    """The random stream of training step `step` (0-based) of a run with `seed`: a function of (seed, step)
    only, so a continued run draws for step k what a run from zero draws for it."""
    digest = hashlib.sha256(f"sine-step:{seed}:{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


_HOST_SIGMAS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # schedule sigmas -> their CPU copy


def _host_sigmas(schedule: Schedule) -> torch.Tensor:
    """The schedule's sigmas on the CPU, copied from the device once (not at every step)."""
    sigmas = schedule.sigmas
    if sigmas.device.type == "cpu":
        return sigmas.detach()
    host = _HOST_SIGMAS.get(sigmas)
    if host is None or host[0] != content_stamp(sigmas):  # a GPU copy of the buffer is an inference tensor
        host = _HOST_SIGMAS[sigmas] = (content_stamp(sigmas), sigmas.detach().cpu())
    return host[1]


def sample_timesteps(schedule: Schedule, batch: int, generator: torch.Generator) -> torch.Tensor:
    """t ~ U{0..T-1} as LatentDiffusion.p_losses, returned as the schedule's σ(t) (on the CPU)."""
    t = torch.randint(0, len(schedule.sigmas), (batch,), generator=generator)
    return _host_sigmas(schedule)[t]


def noisy_latent(schedule: Schedule, x0: torch.Tensor, generator: torch.Generator):
    """(σ, ε, x_σ): one draw of the forward process for a training step."""
    sigma = sample_timesteps(schedule, x0.shape[0], generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
    return sigma, noise, schedule.noise_scaling(sigma, noise, x0)


OptimizerState = list  # per trainable parameter, in order: {"step", "exp_avg", "exp_avg_sq"} CPU tensors, or {}


@dataclass
class TrainProgress:
    """Where a run stands, kept up to date by `train` (also when it stops early), so a stopped run can be saved
    and continued: the parameters are at `step` and `optimizer_state` is AdamW's state at that step.

    The losses of the latest steps wait on the device (`pending`) until something reads `losses` (a log line, a
    preview, the end of the run): one read for all of them instead of a host sync at every step. A non-finite
    loss found then raises TrainingDiverged naming its step."""
    step: int = 0                                        # steps completed in total, earlier runs included
    optimizer_state: OptimizerState | None = None        # filled when train returns or stops
    read: list[float] = field(default_factory=list)      # the loss of each step run by this call, read so far
    pending: list[torch.Tensor] = field(default_factory=list)  # later steps' losses, not read yet (0-d tensors)
    first_step: int = 0                                  # the step (1-based) of read[0]
    learning_rate: float = 0.0                           # named in TrainingDiverged's hint

    @property
    def losses(self) -> list[float]:
        return self.read_losses()

    def read_losses(self, strict: bool = True) -> list[float]:
        """The losses so far (the finite ones before a divergence); strict: raise TrainingDiverged on finding one."""
        if self.pending:
            values = torch.stack(self.pending).tolist()  # one host read for every pending step
            self.pending.clear()
            for value in values:
                if not math.isfinite(value):
                    # the run stands at its last finite step: the fused step skipped this one and, as a diverged
                    # run goes on diverging, the ones after it
                    self.step = self.first_step + len(self.read) - 1
                    if strict:
                        raise TrainingDiverged(self.step + 1, self.learning_rate)
                    break
                self.read.append(value)
        return self.read


def optimizer_snapshot(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter]) -> OptimizerState:
    return [{k: v.detach().cpu().clone() for k, v in optimizer.state.get(p, {}).items()} for p in params]


def _load_optimizer_state(optimizer: torch.optim.Optimizer, state: OptimizerState, n_params: int) -> None:
    if len(state) != n_params:
        raise ValueError(f"the optimizer state is for {len(state)} parameters, this run trains {n_params}")
    sd = optimizer.state_dict()
    # clones: tensors loaded under ComfyUI's inference mode cannot be updated in place outside it
    optimizer.load_state_dict({"state": {i: {k: v.clone() for k, v in s.items()} for i, s in enumerate(state) if s},
                               "param_groups": sd["param_groups"]})


def adamw(params: list[torch.nn.Parameter], config: OptimConfig) -> torch.optim.AdamW:
    """AdamW as one fused kernel where the parameters' device has it (CUDA; the CPU in recent torch), else the
    multi-tensor (foreach) form: a few launches per step instead of ~10 per parameter."""
    kind = {"fused": True} if _fused_supported(params) else {"foreach": True}
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay, **kind)


def _fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch has the fused AdamW kernel for every parameter's device and dtype (torch checks this only at
    the first step, so it is asked here; one device for all, as the fused step needs)."""
    try:
        from torch.optim.optimizer import _device_dtype_check_for_fused  # torch >= 2.4
        for p in params:
            _device_dtype_check_for_fused(p)
    except (ImportError, RuntimeError):
        return False
    return len({p.device for p in params}) <= 1


def _is_fused(optimizer: torch.optim.Optimizer) -> bool:
    return bool(optimizer.param_groups[0].get("fused"))


def train(params: Iterable[torch.nn.Parameter], loss_at_step: Callable[[int], torch.Tensor], config: OptimConfig,
          on_step: Callable[[int, torch.Tensor], None] = lambda step, loss: None, *, start_step: int = 0,
          optimizer_state: OptimizerState | None = None, progress: TrainProgress | None = None,
          on_checkpoint: Callable[[TrainProgress], None] = lambda progress: None):
    """Run AdamW from step `start_step` to `config.steps` (a total); `loss_at_step(i)` builds step i's loss.
    Returns the loss of each step run here.

    `optimizer_state` (from an earlier run's TrainProgress) continues that run's AdamW moments. `on_step(i, loss)`
    runs after each step with the loss as a 0-d tensor (progress, cancel: it may raise to stop; reading
    `progress.losses` reads the losses back); `on_checkpoint(progress)` every `config.checkpoint_every` steps, with
    the optimizer state filled in. `progress` is kept up to date. The optimizer's state is freed before
    returning, also when stopped.

    No host sync per step: with the fused AdamW a step whose loss is not finite is skipped on the device (its
    update and its step count, as torch's GradScaler skips a step), and TrainingDiverged is raised when the losses
    are read (at the latest when the run ends). Without it the loss is read before each backward, as before.
    """
    params = [p for p in params if p.requires_grad]
    progress = progress if progress is not None else TrainProgress()
    progress.step, progress.first_step, progress.learning_rate = start_step, start_step + 1, config.learning_rate
    optimizer = adamw(params, config)
    fused = _is_fused(optimizer)
    if optimizer_state is not None:
        _load_optimizer_state(optimizer, optimizer_state, len(params))
    try:
        for step in range(start_step, config.steps):
            loss = loss_at_step(step)
            value = loss.detach().float()
            if fused:
                optimizer.found_inf = (~torch.isfinite(value)).float()  # the fused kernel skips the update if 1
            elif not math.isfinite(float(value)):
                raise TrainingDiverged(step + 1, config.learning_rate)
            loss.backward()
            if config.clip_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            progress.pending.append(value)
            progress.step = step + 1
            if config.checkpoint_every and progress.step % config.checkpoint_every == 0 and progress.step < config.steps:
                progress.losses  # noqa: B018 - a checkpoint is only kept for a finite run: raises if it diverged
                progress.optimizer_state = optimizer_snapshot(optimizer, params)
                on_checkpoint(progress)
            on_step(step + 1, value)
        return progress.losses
    finally:
        optimizer.zero_grad(set_to_none=True)
        # the parameters are at progress.step (an interrupted step never reached optimizer.step)
        progress.optimizer_state = optimizer_snapshot(optimizer, params)
        optimizer.state.clear()
        del optimizer
