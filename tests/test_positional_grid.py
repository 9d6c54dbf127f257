"""SINE positional grid (docs/method.md §3) against the formula written out independently, and crop boxes."""
import math

import pytest
import torch
import torch.nn.functional as F

from sine_ops.positional_grid import (add_grid_to_rows, box_to_pixels, grid_for_boxes, grid_window,
                                      positional_grid, resize_grid, sample_crop_box, sinusoidal_table)

G, C = 128, 320


def expected_value(c, y, x):
    """Grid[c, y, x] from the spec in float64: first 160 channels encode x+1, the rest y+1."""
    pos, i = (x + 1, c) if c < 160 else (y + 1, c - 160)
    f = lambda k: math.exp(-k * math.log(10000) / (80 - 1))
    return math.sin(pos * f(i)) if i < 80 else math.cos(pos * f(i - 80))


def test_grid_values_against_formula():
    grid = positional_grid()
    assert grid.shape == (C, G, G) and grid.dtype == torch.float32
    for c in (0, 1, 79, 80, 159, 160, 161, 239, 240, 319):
        for y in (0, 1, 63, 127):
            for x in (0, 5, 127):
                assert grid[c, y, x].item() == pytest.approx(expected_value(c, y, x), abs=2e-5), (c, y, x)
    # x-channels constant along height, y-channels constant along width
    assert torch.equal(grid[:160], grid[:160, :1].expand(-1, G, -1))
    assert torch.equal(grid[160:], grid[160:, :, :1].expand(-1, -1, G))


def test_table_padding_row_and_shape():
    table = sinusoidal_table()
    assert table.shape == (129, 160)
    assert torch.count_nonzero(table[0]) == 0
    assert table[1, 0].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert table[1, 80].item() == pytest.approx(math.cos(1.0), abs=1e-6)


BOXES = [(0, 0, 128, 128), (0, 0, 1, 1), (10, 20, 50, 127), (127, 0, 128, 128), (3, 100, 115, 128)]


@pytest.mark.parametrize("box", BOXES)
def test_crop_of_grid_equals_grid_of_crop(box):
    y0, x0, y1, x1 = box
    assert torch.equal(grid_window(box), positional_grid()[:, y0:y1, x0:x1])


def test_grid_window_rejects_bad_boxes():
    for box in [(0, 0, 0, 5), (0, 0, 129, 5), (-1, 0, 4, 4), (5, 5, 4, 8)]:
        with pytest.raises(ValueError):
            grid_window(box)


def test_full_grid_resized_to_itself_is_identity():
    grid = positional_grid()
    assert torch.allclose(resize_grid(grid, (G, G), "bilinear"), grid, atol=1e-6)
    assert torch.equal(resize_grid(grid, (G, G), "nearest"), grid)


def test_nearest_resize_of_window_at_integer_factor():
    window = grid_window((10, 20, 26, 44))  # 16 x 24 cells
    up = resize_grid(window, (64, 48), "nearest")  # x4 height, x2 width
    assert torch.equal(up, window.repeat_interleave(4, dim=1).repeat_interleave(2, dim=2))


def test_bilinear_align_corners_keeps_window_corners():
    window = grid_window((10, 20, 26, 44))
    up = resize_grid(window, (64, 64), "bilinear")
    for (i, j), (k, l) in [((0, 0), (0, 0)), ((-1, -1), (-1, -1)), ((0, -1), (0, -1))]:
        assert torch.allclose(up[:, i, j], window[:, k, l], atol=1e-6)
    with pytest.raises(ValueError):
        resize_grid(window, (8, 8), "bicubic")


def test_grid_for_boxes():
    grid = positional_grid()
    boxes = torch.tensor([[0, 0, 128, 128], [10, 20, 50, 127]])
    out = grid_for_boxes(grid, boxes, (64, 64), "bilinear")
    assert out.shape == (2, C, 64, 64)
    ref = F.interpolate(grid[None, :, 10:50, 20:127], size=(64, 64), mode="bilinear", align_corners=True)[0]
    assert torch.equal(out[1], ref)
    full = grid_for_boxes(grid, None, (96, 128), "nearest")
    assert full.shape == (1, C, 96, 128)
    assert torch.equal(full[0], F.interpolate(grid[None], size=(96, 128), mode="nearest")[0])


def test_add_grid_to_rows_only_touches_chosen_rows():
    torch.manual_seed(0)
    h = torch.randn(4, 8, 6, 6, dtype=torch.float16)
    g = torch.randn(1, 8, 6, 6)
    out = add_grid_to_rows(h, g, torch.tensor([1, 3]))
    assert out.dtype == torch.float16
    assert torch.equal(out[0], h[0]) and torch.equal(out[2], h[2])
    assert torch.equal(out[1], h[1] + g[0].half()) and torch.equal(out[3], h[3] + g[0].half())
    assert torch.equal(add_grid_to_rows(h, g, slice(None)), h + g.half())
    assert add_grid_to_rows(h, g, None) is h
    two = torch.randn(2, 8, 6, 6)
    out = add_grid_to_rows(h, two, torch.tensor([0, 2]))
    assert torch.equal(out[2], h[2] + two[1].half()) and torch.equal(out[1], h[1])
    with pytest.raises(ValueError, match="does not match"):
        add_grid_to_rows(h, torch.zeros(1, 8, 5, 5), slice(None))


def test_crop_boxes_limits_and_independence():
    gen = torch.Generator().manual_seed(23)
    boxes = [sample_crop_box(gen) for _ in range(1000)]
    lo = int(G * 0.1)
    for y0, x0, y1, x1 in boxes:
        assert all(type(v) is int for v in (y0, x0, y1, x1))
        assert lo <= y1 - y0 <= G - 1 and lo <= x1 - x0 <= G - 1
        assert 0 <= y0 and 0 <= x0 and y1 <= G and x1 <= G
    heights = [b[2] - b[0] for b in boxes]
    widths = [b[3] - b[1] for b in boxes]
    assert sum(h != w for h, w in zip(heights, widths)) > 900  # independent sides, not square crops
    assert min(heights) < 20 and max(heights) > 120  # spans the whole range
    assert min(b[0] for b in boxes) == 0 and max(b[3] for b in boxes) == G  # offsets reach both edges


def test_crop_boxes_probability_and_determinism():
    gen = torch.Generator().manual_seed(1)
    assert all(sample_crop_box(gen, crop_prob=0.0) == (0, 0, G, G) for _ in range(50))
    runs = []
    for _ in range(2):
        gen = torch.Generator().manual_seed(5)
        runs.append([sample_crop_box(gen, crop_prob=0.5) for _ in range(100)])
    assert runs[0] == runs[1]
    g3 = torch.Generator().manual_seed(9)
    full = sum(sample_crop_box(g3, crop_prob=0.5) == (0, 0, G, G) for _ in range(1000))
    assert 400 < full < 600
    small = sample_crop_box(torch.Generator().manual_seed(0), grid_size=4, min_frac=0.01, max_frac=0.02)
    assert small[2] - small[0] == 1 and small[3] - small[1] == 1  # clamped to at least one cell


def test_box_to_pixels():
    assert box_to_pixels((1, 2, 10, 20)) == (16, 8, 160, 80)
    assert box_to_pixels(torch.tensor([0, 0, 128, 128]), 8) == (0, 0, 1024, 1024)
