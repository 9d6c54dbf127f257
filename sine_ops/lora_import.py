"""A stock LoRA layer (up/down factors, alpha) as this pack's LoRA adapter module.

ComfyUI applies a LoRA as W + strength * (alpha / rank) * up.flatten(1) @ down.flatten(1), reshaped to W's shape
(rank = down's first dim; no alpha = a scale of 1). The LoRA module here computes the same delta in activation
space (LoRA.forward: up(down(x)) * scale), so down is reshaped to (rank, *W.shape[1:]) and up to
(out, rank[, 1, 1]): a 2-D factor stored for a 1x1 conv and a 4-D one for a Linear both fit.
"""
import math

import torch

from .adapters import LoRA


def lora_module(weight_shape: tuple, up: torch.Tensor, down: torch.Tensor, alpha: float | None, strength: float,
                conv: dict | None) -> LoRA:
    """LoRA adapter with delta strength * (alpha / rank) * up @ down on a layer of weight shape `weight_shape`.

    ValueError when the factors do not fit the layer (a LoRA made for another model)."""
    out_ch, *rest = weight_shape
    rank = down.shape[0]
    if up.shape[0] != out_ch or up.numel() != out_ch * rank or down.numel() != rank * math.prod(rest):
        raise ValueError(f"LoRA factors up {tuple(up.shape)} / down {tuple(down.shape)} do not fit a layer of "
                         f"weight shape {tuple(weight_shape)}")
    scale_alpha = float(rank if alpha is None else alpha) * strength
    # a throwaway generator: the random init is overwritten, and the global RNG stays untouched
    adapter = LoRA(tuple(weight_shape), rank, scale_alpha, conv=conv, generator=torch.Generator())
    with torch.no_grad():
        adapter.down.copy_(down.reshape(adapter.down.shape))
        adapter.up.copy_(up.reshape(adapter.up.shape))
    adapter.requires_grad_(False)
    return adapter
