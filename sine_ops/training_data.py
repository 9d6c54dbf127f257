"""The training image: RGB, resized to the training size (or cut into patch crops), encoded to latents.

Plain torch; the caller passes its VAE as `encode(pixels (1, H, W, 3) in [0, 1]) -> latent (1, C, h, w)`, the way
the training loop takes its schedule. Crops follow SINE's patch-based fine-tuning (docs/method.md §3).
"""
from __future__ import annotations

import hashlib
from typing import Callable

import torch
import torch.nn.functional as F

from .config import AUTO_CROP_BANK, FinetuneSettings, PatchConfig, family_sizes
from .positional_grid import box_to_pixels, sample_crop_box

Encode = Callable[[torch.Tensor], torch.Tensor]
# Crops drawn at most per item until one covers some of the mask's white area. A miss costs no VAE encode once the
# latent size is known (only a mask resize); a mask that 1000 crops in a row miss is too small for the crop sizes
# (a clear error): even a mask 90% of crops miss runs 10,000 steps without meeting it (0.9^1000 per step).
MAX_CROP_ATTEMPTS = 1000


class MaskTooSmall(ValueError):
    """The loss mask has no white area where training looks: the loss would be 0/0."""


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

    def __init__(self, latents: torch.Tensor, boxes: torch.Tensor | None, masks: torch.Tensor | None,
                 missed_crops: int = 0):
        self.latents, self.boxes, self.masks = latents, boxes, masks
        self.missed_crops = missed_crops  # crops that missed the mask and were redrawn

    def draw(self, generator: torch.Generator):
        """(latent (1, C, h, w), box (1, 4) or None, mask (1, 1, h, w) or None) for one step."""
        idx = int(torch.randint(0, self.latents.shape[0], (1,), generator=generator))
        pick = lambda t: None if t is None else t[idx:idx + 1]  # noqa: E731
        return self.latents[idx:idx + 1], pick(self.boxes), pick(self.masks)


class FreshCropSampler:
    """A new random crop, VAE-encoded, at every step: the official code's data pipeline (docs/method.md §3)."""

    def __init__(self, canvas: torch.Tensor, mask_canvas: torch.Tensor | None, patch: PatchConfig, encode: Encode):
        self.patch, self.crops = patch, _MaskedCrops(canvas, mask_canvas, patch, encode)

    @property
    def missed_crops(self) -> int:
        return self.crops.missed

    def draw(self, generator: torch.Generator):
        """The step's crop; one that misses the mask is redrawn from (the step's stream, attempt), so the step's
        noise and timestep stay what they are without a mask."""
        latent, box, mask = self.crops.draw(lambda attempt: _crop_box(attempt_generator(generator, attempt),
                                                                      self.patch))
        return latent, torch.tensor([box], dtype=torch.long), mask


def attempt_generator(generator: torch.Generator, attempt: int) -> torch.Generator:
    """Attempt 0: `generator` itself; attempt k: a stream of (generator's seed, k) only."""
    if attempt == 0:
        return generator
    digest = hashlib.sha256(f"sine-crop:{generator.initial_seed()}:{attempt}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class _MaskedCrops:
    """Encoded crops that cover some of the mask's white area at latent size (every crop without a mask)."""

    def __init__(self, canvas, mask_canvas, patch: PatchConfig, encode: Encode):
        self.canvas, self.mask_canvas, self.patch, self.encode = canvas, mask_canvas, patch, encode
        self.latent_hw: tuple[int, int] | None = None  # known after the first encode
        self.missed = 0

    def draw(self, box_of_attempt: Callable[[int], tuple]):
        """(latent, box, mask or None) of the first attempt whose crop covers the mask."""
        for attempt in range(MAX_CROP_ATTEMPTS):
            box = box_of_attempt(attempt)
            if self.latent_hw is not None and not self._covers(box, self.latent_hw):
                self.missed += 1
                continue  # known to miss before any encode
            with torch.no_grad():
                latent = self.encode(crop_pixels(self.canvas, box, self.patch)).float().cpu()
            self.latent_hw = tuple(latent.shape[-2:])
            mask = _crop_mask(self.mask_canvas, box, self.patch, latent)
            if mask is None or mask.sum() > 0:
                return latent, box, mask
            self.missed += 1
        raise MaskTooSmall(f"{MAX_CROP_ATTEMPTS} random crops in a row missed the mask's white area: it is too "
                           "small for these crops. Enlarge the white area, or raise min_crop_frac in SINE Patch "
                           "Resolution Config")

    def _covers(self, box, latent_hw) -> bool:
        return self.mask_canvas is None or bool(_crop_mask(self.mask_canvas, box, self.patch,
                                                           torch.empty(1, 1, *latent_hw)).sum() > 0)


def _crop_box(generator: torch.Generator, patch: PatchConfig):
    return sample_crop_box(generator, patch.grid_size, patch.min_crop_frac, patch.max_crop_frac,
                           1.0 - patch.whole_image_prob)


def _crop_mask(mask_canvas, box, patch: PatchConfig, latent: torch.Tensor):
    if mask_canvas is None:
        return None
    left, top, right, bottom = box_to_pixels(box, patch.cell_px)
    return latent_mask(mask_canvas[..., top:bottom, left:right], tuple(latent.shape[-2:]))


def _checked_mask(mask: torch.Tensor, size_hw: tuple[int, int], where: str) -> torch.Tensor:
    """`mask` at `size_hw`, or MaskTooSmall when its white area vanishes there."""
    m = latent_mask(mask, size_hw)
    if not m.sum() > 0:
        raise MaskTooSmall(f"its white area vanishes at the {where} ({size_hw[1]}x{size_hw[0]}): the mask is too "
                           "small to train on. Enlarge the white area (grow it, e.g. with GrowMask)")
    return m


def training_sampler(image: torch.Tensor, encode: Encode, settings: FinetuneSettings, family: str,
                     patch: PatchConfig | None, generator: torch.Generator, mask: torch.Tensor | None = None,
                     on_item: Callable[[int, int], None] = lambda done, total: None):
    """Where each training step's latent comes from (latents fp32 on the CPU, in the space `encode` returns).

    Plain mode: the whole image, encoded once. Patch mode (`patch` resolved, crop_bank made concrete by
    PatchConfig.for_device): `patch.crop_bank` = 0 draws and
    encodes a fresh crop at every step (as the official code); N > 0 encodes a bank of N random crops once and
    draws from it (saves the per-step VAE encode). `mask` ((1, H, W) in [0, 1], optional) becomes a per-pixel
    loss weight, cut and resized with the image; a crop that misses its white area is drawn again (counted in the
    sampler's `missed_crops`), and a mask too small to train on raises MaskTooSmall. `on_item(done, total)` runs
    after each set-up encode (progress; it may raise to cancel).
    """
    rgb = as_rgb(image).float()
    if patch is None:
        latent = encode(resize_pixels(rgb, train_size(settings, family, *rgb.shape[1:3]))).float().cpu()
        on_item(1, 1)
        return BankSampler(latent, None, None if mask is None else
                           _checked_mask(mask, tuple(latent.shape[-2:]), "training latent size"))
    if patch.crop_bank == AUTO_CROP_BANK:
        raise ValueError("crop_bank -1 (auto) reached the training sampler: resolve it with PatchConfig.for_device")
    canvas = resize_pixels(rgb, (patch.working_size, patch.working_size))
    mask_canvas = None if mask is None else \
        _checked_mask(mask, (patch.working_size, patch.working_size), "patch canvas size")
    if patch.crop_bank == 0:
        on_item(1, 1)
        return FreshCropSampler(canvas, mask_canvas, patch, encode)
    crops = _MaskedCrops(canvas, mask_canvas, patch, encode)
    boxes, latents, masks = [], [], []
    for i in range(patch.crop_bank):
        latent, box, crop_mask = crops.draw(lambda attempt: _crop_box(generator, patch))
        latents.append(latent)
        masks.append(crop_mask)
        boxes.append(box)
        on_item(i + 1, patch.crop_bank)
    return BankSampler(torch.cat(latents), torch.tensor(boxes, dtype=torch.long),
                       None if mask is None else torch.cat(masks), missed_crops=crops.missed)
