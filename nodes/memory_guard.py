"""Refuse, before starting, work that cannot fit in memory at all: better a clear error naming the input to lower
than a process the operating system kills.

Conservative on purpose: the estimate is a LOWER bound (the model's weights plus ComfyUI's own estimate of one
forward pass's working memory, `BaseModel.memory_required`, which ComfyUI uses to plan model offloading), compared
with the device's TOTAL memory (system RAM on CPU). Anything ComfyUI's memory management could still make fit by
offloading passes; only a request larger than the whole device is refused. Training keeps every activation for the
backward pass, so it needs more than this bound; the bound is still the figure to compare.
"""
from __future__ import annotations

import comfy.model_management

from .errors import InputError
from .model_patching import device_of

GB = 1024 ** 3


def needed_bytes(model, latent_shape: tuple[int, ...], full_model: bool) -> int:
    """Lower bound of the memory one UNet pass on `latent_shape` (B, C, h, w) needs on the model's device;
    full_model: the whole model must be resident (training loads it fully)."""
    working = model.model.memory_required(list(latent_shape))
    return int(working + (model.model_size() if full_model else 0))


def check_fits(model, latent_shape: tuple[int, ...], input_name: str, what: str, full_model: bool) -> None:
    device = device_of(model)
    total = comfy.model_management.get_total_memory(device)
    need = needed_bytes(model, latent_shape, full_model)
    if need > total:
        side = "x".join(str(s * 8) for s in latent_shape[2:])
        raise InputError(input_name, f"{what} at {side} px needs at least {need / GB:.1f} GB but this "
                                     f"{device.type.upper()} has {total / GB:.1f} GB in total; lower "
                                     f"{input_name}")


def check_training(model, side_px: tuple[int, int], input_name: str) -> None:
    channels = model.model.latent_format.latent_channels
    check_fits(model, (1, channels, max(1, side_px[0] // 8), max(1, side_px[1] // 8)), input_name,
               "fine-tuning", full_model=True)


def check_sampling(model, latent_shape: tuple[int, ...], rows_per_step: int, input_name: str) -> None:
    """For a sampler: `rows_per_step` latent rows go through the UNet in one batched call."""
    b, *rest = latent_shape
    check_fits(model, (b * rows_per_step, *rest), input_name, "sampling", full_model=False)
