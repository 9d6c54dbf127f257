"""SINE's fixed 2-D sinusoidal positional grid and the patch-training crop boxes (docs/method.md §3).

Boxes are (y0, x0, y1, x1), row-first, end-exclusive, in cells of the grid_size x grid_size latent canvas.
"""
import math

import torch
import torch.nn.functional as F

from .config import INTERPOLATIONS


def sinusoidal_table(num_positions: int = 128, dim: int = 160) -> torch.Tensor:
    """(num_positions+1, dim) fp32: row p = [sin(p*f_i), cos(p*f_i)], f_i = 10000^(-i/(h-1)); row 0 = padding, zeros.

    SINE positional_encoding.py (fairseq SinusoidalPositionalEmbedding.get_embedding, padding_idx 0).
    """
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))  # (h,)
    angles = torch.arange(num_positions + 1, dtype=torch.float32)[:, None] * freqs[None]  # (P+1, h)
    table = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        table = F.pad(table, (0, 1))
    table[0] = 0
    return table


def grid_window(box, grid_size: int = 128, channels: int = 320) -> torch.Tensor:
    """(C, y1-y0, x1-x0) fp32 grid inside box: channels [0, C/2) encode x+1, [C/2, C) encode y+1 (SINE §3)."""
    y0, x0, y1, x1 = (int(v) for v in box)
    if not (0 <= y0 < y1 <= grid_size and 0 <= x0 < x1 <= grid_size):
        raise ValueError(f"box {(y0, x0, y1, x1)} is empty or outside the {grid_size}x{grid_size} grid")
    half = channels // 2
    table = sinusoidal_table(grid_size, half)
    ex = table[x0 + 1:x1 + 1].T  # (C/2, w): positions start at 1, row 0 is padding
    ey = table[y0 + 1:y1 + 1].T  # (C/2, h)
    h, w = y1 - y0, x1 - x0
    return torch.cat([ex[:, None, :].expand(half, h, w), ey[:, :, None].expand(half, h, w)]).contiguous()


def positional_grid(grid_size: int = 128, channels: int = 320) -> torch.Tensor:
    """(C, G, G) fp32 fixed grid for the whole canvas (SINE UNetModelPatch, not learned)."""
    return grid_window((0, 0, grid_size, grid_size), grid_size, channels)


def resize_grid(grid: torch.Tensor, out_hw, mode: str = "bilinear") -> torch.Tensor:
    """(C, h, w) -> (C, H, W): bilinear align_corners=True (picture configs) or legacy nearest (painting configs)."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation mode must be one of {INTERPOLATIONS}, got {mode!r}")
    kwargs = dict(align_corners=True) if mode == "bilinear" else {}
    return F.interpolate(grid[None], size=tuple(out_hw), mode=mode, **kwargs)[0]


def grid_for_boxes(grid: torch.Tensor, boxes: torch.Tensor | None, out_hw, mode: str = "bilinear") -> torch.Tensor:
    """(B, C, H, W): each box's window of grid (C, G, G) resized to out_hw; boxes None -> (1, C, H, W) full grid.

    The full grid at inference makes the whole canvas stand for the whole source image at any size (SINE §3).
    """
    if boxes is None:
        return resize_grid(grid, out_hw, mode)[None]
    return torch.stack([resize_grid(grid[:, y0:y1, x0:x1], out_hw, mode) for y0, x0, y1, x1 in boxes.tolist()])


def add_grid_to_rows(h: torch.Tensor, grid_rows: torch.Tensor, rows: slice | torch.Tensor | None) -> torch.Tensor:
    """h (B, C, H, W) + grid on the chosen rows only, out-of-place; grid_rows is (1 or R, C, H, W), R = chosen rows."""
    if rows is None:
        return h
    if grid_rows.shape[1:] != h.shape[1:]:
        raise ValueError(f"grid {tuple(grid_rows.shape[1:])} does not match feature map {tuple(h.shape[1:])}")
    g = grid_rows.to(device=h.device, dtype=h.dtype)
    if isinstance(rows, slice) and rows == slice(None):
        return h + g
    rows = torch.arange(h.shape[0], device=h.device)[rows] if isinstance(rows, slice) else rows.to(h.device)
    # index_add instead of an in-place row update keeps autograd intact and the other rows bit-identical
    return h.index_add(0, rows, g.expand(rows.numel(), -1, -1, -1))


def sample_crop_box(generator: torch.Generator, grid_size: int = 128, min_frac: float = 0.1, max_frac: float = 1.0,
                    crop_prob: float = 1.0) -> tuple[int, int, int, int]:
    """Random training box (y0, x0, y1, x1) in grid cells (SINE SinImageHighResDataset._random_crop).

    With probability crop_prob (LDM semantics: the probability of cropping) each side is int(G*U[min, max)),
    drawn independently per axis, and the offset is uniform over all valid positions; otherwise the whole canvas.
    """
    if not 0 < min_frac <= max_frac <= 1:
        raise ValueError(f"need 0 < min_frac <= max_frac <= 1, got {min_frac}, {max_frac}")
    if not 0 <= crop_prob <= 1:
        raise ValueError(f"crop_prob must be in [0, 1], got {crop_prob}")

    def uniform() -> float:
        return torch.rand((), generator=generator, dtype=torch.float64).item()

    def side() -> int:
        return min(grid_size, max(1, int(grid_size * (min_frac + (max_frac - min_frac) * uniform()))))

    if not uniform() < crop_prob:
        return 0, 0, grid_size, grid_size
    ph, pw = side(), side()  # independent: patches are generally not square
    y0 = int(torch.randint(0, grid_size - ph + 1, (), generator=generator))
    x0 = int(torch.randint(0, grid_size - pw + 1, (), generator=generator))
    return y0, x0, y0 + ph, x0 + pw


def box_to_pixels(box, cell_px: int = 8) -> tuple[int, int, int, int]:
    """PIL-style pixel crop (left, top, right, bottom) of a grid box, one cell = cell_px pixels (the VAE factor)."""
    y0, x0, y1, x1 = (int(v) for v in box)
    return x0 * cell_px, y0 * cell_px, x1 * cell_px, y1 * cell_px
