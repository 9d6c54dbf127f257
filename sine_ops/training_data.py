"""The training image: RGB, resized to the training size (or cut into patch crops), encoded to latents.

Plain torch; the caller passes its VAE as `encode(pixels (1, H, W, 3) in [0, 1]) -> latent (1, C, h, w)`, the way
the training loop takes its schedule. Crops follow SINE's patch-based fine-tuning (docs/method.md §3).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .config import FinetuneSettings, PatchConfig, family_sizes
from .positional_grid import box_to_pixels, sample_crop_box

Encode = Callable[[torch.Tensor], torch.Tensor]


def as_rgb(image: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, H, W, 3): alpha dropped (as the paper's RGB conversion), grayscale repeated."""
    return image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)


def resize_pixels(pixels: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(1, H, W, 3) -> (1, h, w, 3) bicubic (PIL bicubic in the original code), clamped to [0, 1]."""
    x = pixels.movedim(-1, 1)
    x = F.interpolate(x, size=size_hw, mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 1).movedim(1, -1)


def train_size(settings: FinetuneSettings, family: str, h: int, w: int) -> tuple[int, int]:
    """(h, w) of a plain (non-patch) fine-tune: the square of the family's size, or its pixel count at the
    source's aspect ratio in 64-px steps (resize = keep_aspect)."""
    side = settings.resolution or family_sizes(family).native
    if settings.resize == "stretch":
        return side, side
    scale = side / (h * w) ** 0.5
    return max(64, round(h * scale / 64) * 64), max(64, round(w * scale / 64) * 64)


def crop_pixels(canvas: torch.Tensor, box, patch: PatchConfig) -> torch.Tensor:
    """The crop of `canvas` (1, S, S, 3) under grid box `box`, resized to the training resolution."""
    left, top, right, bottom = box_to_pixels(box, patch.cell_px)
    return resize_pixels(canvas[:, top:bottom, left:right], (patch.train_resolution, patch.train_resolution))


def training_latents(image: torch.Tensor, encode: Encode, settings: FinetuneSettings, family: str,
                     patch: PatchConfig | None, generator: torch.Generator,
                     on_item: Callable[[int, int], None] = lambda done, total: None):
    """(latents (N, C, h, w) fp32 on the CPU, boxes (N, 4) long or None) for the training loop.

    Plain mode: N = 1, the whole image. Patch mode (`patch` resolved): a bank of `patch.crop_bank` random crops
    encoded once and sampled at every step (one VAE encode per step would add its cost to every training step).
    `on_item(done, total)` runs after each encode (progress; it may raise to cancel).
    """
    rgb = as_rgb(image).float()
    if patch is None:
        latent = encode(resize_pixels(rgb, train_size(settings, family, *rgb.shape[1:3]))).float().cpu()
        on_item(1, 1)
        return latent, None
    canvas = resize_pixels(rgb, (patch.working_size, patch.working_size))
    boxes, latents = [], []
    for i in range(patch.crop_bank):
        box = sample_crop_box(generator, patch.grid_size, patch.min_crop_frac, patch.max_crop_frac,
                              1.0 - patch.whole_image_prob)
        latents.append(encode(crop_pixels(canvas, box, patch)).float().cpu())
        boxes.append(box)
        on_item(i + 1, patch.crop_bank)
    return torch.cat(latents), torch.tensor(boxes, dtype=torch.long)
