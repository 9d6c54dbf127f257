"""SINE Sweep: many guidance settings sampled as the rows of one batch, and the labelled grid of the results.

A sweep is every combination of (edit prompt, fine-tuned weight, window end). Rows are in one stated order,
prompt-major: row = (prompt * n_weights + weight) * n_ends + end (`sweep_rows`). Each row starts from the same
noise and gets its own weight and window: per-row weights are a (R, 1, 1, 1) weight map (or (R, 1, h, w) with a
mask), and at each step a row outside its window gets weight 0, which leaves its conditional exactly the edit
prediction (sine_ops.guidance.mix_conditional_maps). Plain torch and PIL: no ComfyUI here.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

MAX_ROWS = 256  # a sweep larger than this is almost surely a typo (e.g. a list pasted twice)


@dataclass(frozen=True)
class SweepRow:
    """One row of the sweep: which prompt (index into the prompt list; 0 when there is no list), the fine-tuned
    weight and the window end (end_percent) it samples with."""
    prompt: int
    weight: float
    end_percent: float


def parse_values(text: str, what: str, low: float = 0.0, high: float = 1.0) -> list[float]:
    """"0.1, 0.2 0.3" -> [0.1, 0.2, 0.3] (commas, semicolons or spaces). ValueError saying what is wrong for an empty
    list, a token that is not a number, a value outside [low, high] or a repeated value."""
    tokens = [t for t in re.split(r"[,;\s]+", text or "") if t]
    if not tokens:
        raise ValueError(f"no {what} given; write a list such as '0.2, 0.3, 0.5'")
    values = []
    for t in tokens:
        try:
            v = float(t)
        except ValueError:
            raise ValueError(f"'{t}' is not a number; write the {what} as numbers separated by commas, "
                             "e.g. '0.2, 0.3, 0.5'") from None
        if not math.isfinite(v) or not low <= v <= high:
            raise ValueError(f"{t} is outside [{low:g}, {high:g}]; every {what[:-1] if what.endswith('s') else what} "
                             f"must be in that range")
        if v in values:
            raise ValueError(f"{t} is listed twice; each value gives one row or column, list it once")
        values.append(v)
    return values


def parse_prompts(text: str) -> list[str]:
    """One prompt per non-empty line (surrounding spaces removed)."""
    return [line.strip() for line in (text or "").splitlines() if line.strip()]


def sweep_rows(n_prompts: int, weights: Sequence[float], ends: Sequence[float]) -> list[SweepRow]:
    """Every combination, prompt-major, then weight, then window end (the LATENT batch and the grid use it)."""
    return [SweepRow(p, w, e) for p in range(max(1, n_prompts)) for w in weights for e in ends]


def check_size(n_rows: int) -> None:
    if n_rows > MAX_ROWS:
        raise ValueError(f"the lists make {n_rows} rows (prompts x weights x window ends), more than {MAX_ROWS}; "
                         "shorten a list or split the sweep")


def k_label(end_percent: float) -> int:
    """The paper's K (timestep where guidance stops, of 1000) for a window end: 0.6 -> 400."""
    return round((1.0 - end_percent) * 1000)


def row_settings(row: SweepRow, prompts: Sequence[str]) -> str:
    """The row's settings as the SINE Guided Sampler inputs that reproduce it."""
    text = f"finetuned_weight {row.weight:g}, end_percent {row.end_percent:g} (K {k_label(row.end_percent)})"
    return text + (f", prompt '{prompts[row.prompt]}'" if prompts else "")


# ---- per-row weights ---------------------------------------------------------------------------------------------
def row_weights(weights: Sequence[float], mask_map: torch.Tensor | None = None, outside: float = 0.0,
                device=None) -> torch.Tensor:
    """The per-row weight map of the swept model: (R, 1, 1, 1) with one weight per row, or with a mask map
    (R, 1, h, w) `mask * w_r + (1 - mask) * outside` (the same arithmetic as sine_ops.guidance.weight_map)."""
    w = torch.tensor([float(v) for v in weights], dtype=torch.float32, device=device).view(-1, 1, 1, 1)
    if mask_map is None:
        return w
    return mask_map * w.to(mask_map) + (1 - mask_map) * outside


def window_flags(sigma: float, start_sigmas: Sequence[float], end_sigmas: Sequence[float]) -> tuple[bool, ...]:
    """Per row: whether sigma is in that row's window end_sigma < sigma <= start_sigma (sine_ops.guidance's rule)."""
    return tuple(end < sigma <= start for start, end in zip(start_sigmas, end_sigmas))


def flagged(weights: torch.Tensor | float, flags: Sequence[bool]) -> torch.Tensor | float:
    """A per-row weight (map) with the rows whose flag is off set to exactly 0 (all on: the weights unchanged)."""
    if all(flags):
        return weights
    if not isinstance(weights, torch.Tensor):
        weights = torch.full((len(flags), 1, 1, 1), float(weights))
    on = torch.tensor(flags, dtype=weights.dtype).view(-1, *([1] * (weights.ndim - 1)))
    return weights * on.to(weights.device)


# ---- chunks ------------------------------------------------------------------------------------------------------
def rows_per_chunk(n_rows: int, fits: Callable[[int], bool], requested: int = 0) -> int:
    """Rows sampled together: `requested` if > 0, else the most rows (at most n_rows) for which fits(rows) holds,
    at least 1 (one row always runs; ComfyUI's own batching may still split its forward)."""
    if requested > 0:
        return min(requested, n_rows)
    lo, hi = 1, n_rows
    if fits(hi):
        return hi
    while lo < hi:  # largest rows with fits(rows); fits is monotone in the row count
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def chunks(n_rows: int, size: int) -> list[range]:
    return [range(i, min(i + size, n_rows)) for i in range(0, n_rows, size)]


# ---- the grid ----------------------------------------------------------------------------------------------------
def _font(px: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=px)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        return ImageFont.load_default()


def first_words(text: str, n: int = 4) -> str:
    words = text.split()
    return " ".join(words[:n]) + (" ..." if len(words) > n else "")


def grid_layout(rows: Sequence[SweepRow], prompts: Sequence[str]) -> tuple[list[str], list[str], list[tuple]]:
    """(row labels, column labels, cell (grid row, grid column) of each sweep row). Columns are the window ends,
    grid rows the (prompt, weight) pairs, both in sweep order."""
    ends = list(dict.fromkeys(r.end_percent for r in rows))
    lines = list(dict.fromkeys((r.prompt, r.weight) for r in rows))
    row_labels = [f"w {w:g}" + (f"  {first_words(prompts[p])}" if prompts else "") for p, w in lines]
    col_labels = [f"K {k_label(e)}  (end {e:g})" for e in ends]
    cells = [(lines.index((r.prompt, r.weight)), ends.index(r.end_percent)) for r in rows]
    return row_labels, col_labels, cells


def label_grid(images: torch.Tensor, row_labels: Sequence[str], col_labels: Sequence[str],
               cells: Sequence[tuple[int, int]]) -> torch.Tensor:
    """images (N, H, W, 3) in [0, 1] placed at `cells` of a grid with a header row (column labels) and a left
    column (row labels); returns (1, H', W', 3). The label font scales with the image, so the labels stay readable
    when the grid is shown as a thumbnail."""
    from PIL import Image, ImageDraw
    import numpy as np
    n, h, w, _ = images.shape
    font_px = max(14, min(h, w) // 9)
    font = _font(font_px)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = int(max(probe.textlength(t, font=font) for t in row_labels)) + font_px
    top = int(font_px * 1.8)
    gap = max(2, font_px // 6)
    n_rows, n_cols = len(row_labels), len(col_labels)
    canvas = Image.new("RGB", (left + n_cols * (w + gap), top + n_rows * (h + gap)), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    pixels = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i, (r, c) in enumerate(cells):
        canvas.paste(Image.fromarray(pixels[i]), (left + c * (w + gap), top + r * (h + gap)))
    for c, text in enumerate(col_labels):
        draw.text((left + c * (w + gap) + font_px // 3, font_px // 3), text, fill=(240, 240, 240), font=font)
    for r, text in enumerate(row_labels):
        draw.text((font_px // 3, top + r * (h + gap) + font_px // 3), text, fill=(240, 240, 240), font=font)
    return torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255.0)[None]


def latent_rgb(latents: torch.Tensor, factors: Sequence[Sequence[float]], bias: Sequence[float] | None = None,
               scale: int = 8) -> torch.Tensor:
    """A cheap colour preview of latents (B, C, h, w) -> (B, h * scale, w * scale, 3) in [0, 1] through a latent
    format's linear RGB factors (ComfyUI's Latent2RGB previews use the same): the grid without a VAE."""
    f = torch.tensor(factors, dtype=torch.float32)  # (C, 3)
    rgb = torch.einsum("bchw,cr->bhwr", latents.float().cpu(), f)
    if bias is not None:
        rgb = rgb + torch.tensor(bias, dtype=torch.float32)
    rgb = ((rgb + 1) / 2).clamp(0, 1)
    return rgb.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
