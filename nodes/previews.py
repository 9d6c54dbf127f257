"""Pictures SINE Finetune shows the user: the training loss (log scale), for the loss_curve output and previews."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def loss_curve_pil(losses: list[float], width: int = 512, height: int = 256) -> Image.Image:
    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    if losses:
        y = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-12))
        k = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid") if len(y) > k else y
        lo, hi = float(smooth.min()), float(smooth.max())
        span = hi - lo or 1.0
        pts = [(10 + i * (width - 20) / max(1, len(smooth) - 1), height - 20 - (v - lo) / span * (height - 40))
               for i, v in enumerate(smooth)]
        draw.line(pts if len(pts) > 1 else pts * 2, fill=(90, 200, 255), width=2)
        draw.text((10, 4), f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({len(losses)} steps, log scale)",
                  fill=(230, 230, 230))
    return img


def loss_curve_image(losses: list[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """(1, H, W, 3) in [0, 1]: ComfyUI's IMAGE layout, for a Preview Image node."""
    img = loss_curve_pil(losses, width, height)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]
