"""Reference forms used only by the tests and benchmarks: the paper's formulas written out, a merged-weight LoRA,
and SD's DDPM schedule with ComfyUI's model_sampling interface (inside ComfyUI the model's own is used)."""
from __future__ import annotations

from typing import Sequence

import torch

from sine_ops.adapters import FullDelta, LoRA
from sine_ops.guidance import mix_conditional


def sine_guidance(uncond: torch.Tensor, cond_edit: torch.Tensor, cond_finetuned: Sequence[torch.Tensor | None],
                  cfg: float, weights: Sequence[float], active: Sequence[bool]) -> torch.Tensor:
    """uncond + cfg*(mix - uncond), the uncond always from the pretrained model (SINE Eq. 2/3, §5); only the
    models whose window holds this step (`active`) take part in the mix (their cond_finetuned may be None)."""
    on = [(c, w) for c, w, a in zip(cond_finetuned, weights, active) if a]
    return uncond + cfg * (mix_conditional(cond_edit, [c for c, _ in on], [w for _, w in on]) - uncond)


def paper_window(K: int) -> tuple[float, float]:
    """(start_percent, end_percent) for the paper's guidance on t > K (SINE §4: K = 400 -> (0.0, 0.6))."""
    if not 0 <= K <= 1000:
        raise ValueError(f"K must be in [0, 1000], got {K}")
    return 0.0, 1.0 - K / 1000


@torch.no_grad()
def merged_weight(weight: torch.Tensor, adapter: LoRA | FullDelta) -> torch.Tensor:
    """New tensor weight + delta, summed in fp32 so low-precision base weights lose no more than one rounding."""
    return (weight.float() + adapter.delta_weight().to(weight.device)).to(weight.dtype)


@torch.no_grad()
def merged_bias(bias: torch.Tensor | None, adapter: LoRA | FullDelta) -> torch.Tensor | None:
    """New tensor bias + bias delta; the input itself when the adapter has no bias delta (LoRA)."""
    delta = adapter.delta_bias()
    if delta is None:
        return bias
    if bias is None:
        raise ValueError("adapter has a bias delta but the layer has no bias")
    return (bias.float() + delta.to(bias.device)).to(bias.dtype)


class LinearDDPMSchedule(torch.nn.Module):
    """SD's ε-prediction schedule (linear-in-sqrt betas 0.00085..0.012, T=1000) with ComfyUI's σ interface.

    Used by the pure-torch tests and benchmarks; inside ComfyUI the model's own `model_sampling` is used.
    """

    def __init__(self, timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012):
        super().__init__()
        betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.register_buffer("sigmas", (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).float())

    def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
        return latent_image + noise * sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1))

    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input - model_output * sigma.view(sigma.shape[:1] + (1,) * (model_output.ndim - 1))

    def calculate_input(self, sigma, noise):
        return noise / (sigma.view(sigma.shape[:1] + (1,) * (noise.ndim - 1)) ** 2 + 1.0) ** 0.5
