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


def latent_mask(mask: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(…, H, W) mask -> (1, 1, h, w) loss weight at latent size, resized as ComfyUI resizes a mask to a latent
    (comfy.sampler_helpers.prepare_mask: bilinear, align_corners False)."""
    m = mask.float().reshape(-1, 1, *mask.shape[-2:])[:1]
    return F.interpolate(m, size=size_hw, mode="bilinear")


class BankSampler:
    """Fixed training items encoded once (the whole image, or a bank of crops); each step draws one."""

    def __init__(self, latents: torch.Tensor, boxes: torch.Tensor | None, masks: torch.Tensor | None):
        self.latents, self.boxes, self.masks = latents, boxes, masks

    def draw(self, generator: torch.Generator):
        """(latent (1, C, h, w), box (1, 4) or None, mask (1, 1, h, w) or None) for one step."""
        idx = int(torch.randint(0, self.latents.shape[0], (1,), generator=generator))
        pick = lambda t: None if t is None else t[idx:idx + 1]  # noqa: E731
        return self.latents[idx:idx + 1], pick(self.boxes), pick(self.masks)


class FreshCropSampler:
    """A new random crop, VAE-encoded, at every step: the official code's data pipeline (docs/method.md §3)."""

    def __init__(self, canvas: torch.Tensor, mask_canvas: torch.Tensor | None, patch: PatchConfig, encode: Encode):
        self.canvas, self.mask_canvas, self.patch, self.encode = canvas, mask_canvas, patch, encode

    def draw(self, generator: torch.Generator):
        box = _crop_box(generator, self.patch)
        with torch.no_grad():
            latent = self.encode(crop_pixels(self.canvas, box, self.patch)).float().cpu()
        return latent, torch.tensor([box], dtype=torch.long), _crop_mask(self.mask_canvas, box, self.patch, latent)


def _crop_box(generator: torch.Generator, patch: PatchConfig):
    return sample_crop_box(generator, patch.grid_size, patch.min_crop_frac, patch.max_crop_frac,
                           1.0 - patch.whole_image_prob)


def _crop_mask(mask_canvas, box, patch: PatchConfig, latent: torch.Tensor):
    if mask_canvas is None:
        return None
    left, top, right, bottom = box_to_pixels(box, patch.cell_px)
    return latent_mask(mask_canvas[..., top:bottom, left:right], tuple(latent.shape[-2:]))


def training_sampler(image: torch.Tensor, encode: Encode, settings: FinetuneSettings, family: str,
                     patch: PatchConfig | None, generator: torch.Generator, mask: torch.Tensor | None = None,
                     on_item: Callable[[int, int], None] = lambda done, total: None):
    """Where each training step's latent comes from (latents fp32 on the CPU, in the space `encode` returns).

    Plain mode: the whole image, encoded once. Patch mode (`patch` resolved): `patch.crop_bank` = 0 draws and
    encodes a fresh crop at every step (as the official code); N > 0 encodes a bank of N random crops once and
    draws from it (saves the per-step VAE encode). `mask` ((1, H, W) in [0, 1], optional) becomes a per-pixel
    loss weight, cut and resized with the image. `on_item(done, total)` runs after each set-up encode
    (progress; it may raise to cancel).
    """
    rgb = as_rgb(image).float()
    if patch is None:
        latent = encode(resize_pixels(rgb, train_size(settings, family, *rgb.shape[1:3]))).float().cpu()
        on_item(1, 1)
        return BankSampler(latent, None, None if mask is None else latent_mask(mask, tuple(latent.shape[-2:])))
    canvas = resize_pixels(rgb, (patch.working_size, patch.working_size))
    mask_canvas = None if mask is None else latent_mask(mask, (patch.working_size, patch.working_size))
    if patch.crop_bank == 0:
        on_item(1, 1)
        return FreshCropSampler(canvas, mask_canvas, patch, encode)
    boxes, latents, masks = [], [], []
    for i in range(patch.crop_bank):
        box = _crop_box(generator, patch)
        latents.append(encode(crop_pixels(canvas, box, patch)).float().cpu())
        masks.append(_crop_mask(mask_canvas, box, patch, latents[-1]))
        boxes.append(box)
        on_item(i + 1, patch.crop_bank)
    return BankSampler(torch.cat(latents), torch.tensor(boxes, dtype=torch.long),
                       None if mask is None else torch.cat(masks))
