"""Reference forms used only by the tests and benchmarks: the paper's formulas written out, the adapters' deltas in
weight space and the merged weights they give, and SD's DDPM schedule with ComfyUI's model_sampling interface
(inside ComfyUI the model's own is used)."""
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


def lora_delta_weight(lora: LoRA) -> torch.Tensor:
    """(out, in[, kh, kw]) fp32: a 1x1 up conv after the down conv equals one conv with kernel up @ down."""
    return (lora.up.float().flatten(1) @ lora.down.float().flatten(1)).reshape(lora.weight_shape) * lora.scale


def delta_weight(adapter: LoRA | FullDelta) -> torch.Tensor:
    """The weight-space delta the adapter adds to its layer's weight, fp32 (a FullDelta's is its weight)."""
    if isinstance(adapter, LoRA):
        return lora_delta_weight(adapter)
    if isinstance(adapter, FullDelta):
        return adapter.weight.float()
    raise TypeError(f"not an adapter: {type(adapter).__name__}")


def delta_bias(adapter: LoRA | FullDelta) -> torch.Tensor | None:
    """The bias delta, fp32; None for a LoRA and for a FullDelta of a layer without bias."""
    if isinstance(adapter, LoRA):
        return None
    if isinstance(adapter, FullDelta):
        return None if adapter.bias is None else adapter.bias.float()
    raise TypeError(f"not an adapter: {type(adapter).__name__}")


@torch.no_grad()
def merged_weight(weight: torch.Tensor, adapter: LoRA | FullDelta) -> torch.Tensor:
    """New tensor weight + delta, summed in fp32 so low-precision base weights lose no more than one rounding."""
    return (weight.float() + delta_weight(adapter).to(weight.device)).to(weight.dtype)


@torch.no_grad()
def merged_bias(bias: torch.Tensor | None, adapter: LoRA | FullDelta) -> torch.Tensor | None:
    """New tensor bias + bias delta; the input itself when the adapter has no bias delta (LoRA)."""
    delta = delta_bias(adapter)
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
