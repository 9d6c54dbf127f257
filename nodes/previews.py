"""Pictures SINE Finetune shows the user: the training loss (log scale), for the loss_curve output, and the live
preview on the node while it trains (the loss so far beside what the model currently predicts)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

import latent_preview

PREVIEW_HEIGHT = 256  # px of the live preview (loss curve and prediction side by side)


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


def latent_decoder(model):
    """latent (B, C, h, w) in the model's space -> PIL image through the preview decoder ComfyUI's own samplers use
    for the user's preview setting (latent_preview.get_previewer: TAESD, latent2rgb...), or None when ComfyUI shows
    no previews (--preview-method none, its default, or no decoder for this model): then SINE Finetune sends no
    preview frames either, as the stock KSampler."""
    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)
    if previewer is None:
        return None
    return lambda latent: previewer.decode_latent_to_preview(latent[:1].float())


def training_preview(losses: list[float], prediction: Image.Image | None):
    """ComfyUI's progress-bar preview ("JPEG", PIL image, max side): the loss curve so far, and beside it the
    model's current prediction of the training image (or crop)."""
    curve = loss_curve_pil(losses, width=2 * PREVIEW_HEIGHT, height=PREVIEW_HEIGHT)
    if prediction is None:
        return "JPEG", curve, latent_preview.MAX_PREVIEW_RESOLUTION
    w = max(1, round(prediction.width * PREVIEW_HEIGHT / max(1, prediction.height)))
    canvas = Image.new("RGB", (curve.width + w, PREVIEW_HEIGHT))
    canvas.paste(curve, (0, 0))
    canvas.paste(prediction.convert("RGB").resize((w, PREVIEW_HEIGHT), Image.NEAREST), (curve.width, 0))
    return "JPEG", canvas, latent_preview.MAX_PREVIEW_RESOLUTION
