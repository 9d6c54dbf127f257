"""sine_ops.sweep: the lists, the row order, per-row weights and window flags, chunking and the labelled grid."""
import pytest
import torch

from sine_ops import sweep as sw
from sine_ops.guidance import mix_conditional, mix_conditional_maps, weight_map, window_active


def test_lists_parse_with_commas_spaces_and_semicolons():
    assert sw.parse_values("0.1, 0.2 0.3;0.5", "weights") == [0.1, 0.2, 0.3, 0.5]
    assert sw.parse_values(" 0 ", "weights") == [0.0]
    assert sw.parse_prompts("a cat\n\n  a dog  \n") == ["a cat", "a dog"]
    assert sw.parse_prompts("") == []


@pytest.mark.parametrize("text,message", [
    ("", "no weights given"), (" , ", "no weights given"), ("0.2, abc", "'abc' is not a number"),
    ("0.2, 1.2", r"1.2 is outside \[0, 1\]"), ("nan", r"nan is outside"), ("0.3, 0.30", "0.30 is listed twice"),
])
def test_bad_lists_say_what_is_wrong(text, message):
    with pytest.raises(ValueError, match=message):
        sw.parse_values(text, "weights")


def test_row_order_is_prompt_then_weight_then_end():
    rows = sw.sweep_rows(2, [0.2, 0.4], [0.5, 0.6, 0.7])
    assert len(rows) == 12
    assert rows[0] == sw.SweepRow(0, 0.2, 0.5) and rows[1] == sw.SweepRow(0, 0.2, 0.6)
    assert rows[3] == sw.SweepRow(0, 0.4, 0.5) and rows[6] == sw.SweepRow(1, 0.2, 0.5)
    for p in range(2):
        for w in range(2):
            for e in range(3):
                assert rows[(p * 2 + w) * 3 + e] == sw.SweepRow(p, [0.2, 0.4][w], [0.5, 0.6, 0.7][e])
    assert sw.sweep_rows(0, [0.3], [0.6]) == [sw.SweepRow(0, 0.3, 0.6)]  # no prompt list: the guider's prompt
    with pytest.raises(ValueError, match="more than"):
        sw.check_size(sw.MAX_ROWS + 1)


def test_settings_line_names_the_sampler_inputs():
    assert sw.row_settings(sw.SweepRow(1, 0.3, 0.6), ["a", "b c"]) == \
        "finetuned_weight 0.3, end_percent 0.6 (K 400), prompt 'b c'"
    assert sw.row_settings(sw.SweepRow(0, 0.25, 0.5), []) == "finetuned_weight 0.25, end_percent 0.5 (K 500)"


def test_per_row_weights_mix_each_row_as_its_single_setting():
    """Row r of the per-row mix equals the scalar mix with that row's weight (what the single run computes)."""
    g = torch.Generator().manual_seed(0)
    edit, ft = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    weights = [0.0, 0.3, 0.75]
    mixed = mix_conditional_maps(edit, [ft], [sw.row_weights(weights)])
    for r, w in enumerate(weights):
        single = mix_conditional(edit[r:r + 1], [ft[r:r + 1]], [w])
        assert torch.allclose(mixed[r:r + 1], single, rtol=0, atol=1e-6)
    assert torch.equal(mixed[0], edit[0])  # weight 0: exactly the edit prediction


def test_rows_outside_their_window_get_exactly_the_edit_prediction():
    starts, ends = [14.6, 14.6, 14.6], [1.0, 3.0, 6.0]
    for sigma in (10.0, 5.0, 2.0, 0.5):
        flags = sw.window_flags(sigma, starts, ends)
        assert list(flags) == [window_active(sigma, s, e) for s, e in zip(starts, ends)]
    flags = sw.window_flags(2.0, starts, ends)
    assert flags == (True, False, False)
    w = sw.flagged(sw.row_weights([0.3, 0.3, 0.3]), flags)
    edit, ft = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    mixed = mix_conditional_maps(edit, [ft], [w])
    assert torch.equal(mixed[1:], edit[1:]) and not torch.equal(mixed[0], edit[0])
    assert sw.flagged(0.3, (True, True)) == 0.3
    assert sw.flagged(0.3, (True, False)).flatten().tolist() == pytest.approx([0.3, 0.0])


def test_mask_rows_follow_weight_map():
    mask = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    rows = sw.row_weights([0.2, 0.9], mask, outside=0.1)
    for r, w in enumerate([0.2, 0.9]):
        assert torch.equal(rows[r], weight_map(mask[r], w, 0.1))


def test_chunk_size_is_the_largest_that_fits():
    assert sw.rows_per_chunk(10, lambda n: n <= 4) == 4
    assert sw.rows_per_chunk(10, lambda n: True) == 10
    assert sw.rows_per_chunk(10, lambda n: False) == 1  # one row always runs
    assert sw.rows_per_chunk(10, lambda n: False, requested=3) == 3
    assert sw.rows_per_chunk(2, lambda n: True, requested=5) == 2
    assert sw.chunks(7, 3) == [range(0, 3), range(3, 6), range(6, 7)]


def test_grid_places_rows_and_labels_them():
    rows = sw.sweep_rows(2, [0.3, 0.5], [0.5, 0.6, 0.7])
    labels, columns, cells = sw.grid_layout(rows, ["a photo of a dog wearing a cape", "b"])
    assert columns == ["K 500  (end 0.5)", "K 400  (end 0.6)", "K 300  (end 0.7)"]
    assert labels == ["w 0.3  a photo of a ...", "w 0.5  a photo of a ...", "w 0.3  b", "w 0.5  b"]
    assert cells[:4] == [(0, 0), (0, 1), (0, 2), (1, 0)] and cells[-1] == (3, 2)
    images = torch.stack([torch.full((32, 48, 3), i / 12) for i in range(12)])
    grid = sw.label_grid(images, labels, columns, cells)
    assert grid.shape[0] == 1 and grid.shape[-1] == 3 and 0 <= grid.min() and grid.max() <= 1
    h, w = grid.shape[1:3]
    assert h > 4 * 32 and w > 3 * 48
    # each cell holds its row's image: the bottom-right pixel of the last cell is row 11's value
    assert grid[0, h - 3, w - 3].tolist() == pytest.approx([round(11 / 12 * 255) / 255] * 3, abs=1e-6)
    # the labels draw ink into the header and the left column
    assert grid[0, :14].std() > 0 and grid[0, 20:, :20].std() > 0


def test_latent_preview_without_vae():
    latents = torch.zeros(2, 4, 3, 5)
    rgb = sw.latent_rgb(latents, [[1, 0, 0], [0, 1, 0], [0, 0, 1], [0, 0, 0]], [0.0, 0.0, 0.0])
    assert rgb.shape == (2, 24, 40, 3) and torch.allclose(rgb, torch.full_like(rgb, 0.5))
