"""Spatial control of the mix (sine_ops.guidance weight maps): per-pixel formula, exactness, feathering, checks."""
import pytest
import torch

from sine_ops.guidance import (check_weight_sum, feather_mask, max_weight_sum, mix_conditional,
                               mix_conditional_maps, weight_map)


@pytest.fixture
def preds():
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(2, 4, 6, 8, generator=gen) for _ in range(3)]  # cond_edit, cond_ft_1, cond_ft_2


def random_mask(seed, shape=(2, 1, 6, 8)):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed))


def test_multi_entry_maps_follow_the_formula_per_pixel(preds):
    edit, ft1, ft2 = preds
    m1, m2 = random_mask(1), random_mask(2)
    (w1_in, w1_out), (w2_in, w2_out) = (0.5, 0.1), (0.3, 0.2)
    w1, w2 = weight_map(m1, w1_in, w1_out), weight_map(m2, w2_in, w2_out)
    out = mix_conditional_maps(edit, [ft1, ft2], [w1, w2])
    for b, c, y, x in [(0, 0, 0, 0), (1, 3, 5, 7), (0, 2, 3, 1), (1, 1, 2, 6)]:
        a1 = m1[b, 0, y, x] * w1_in + (1 - m1[b, 0, y, x]) * w1_out  # w_i(x) = mask_i(x)*w_in + (1-mask_i(x))*w_out
        a2 = m2[b, 0, y, x] * w2_in + (1 - m2[b, 0, y, x]) * w2_out
        expected = (1 - a1 - a2) * edit[b, c, y, x] + a1 * ft1[b, c, y, x] + a2 * ft2[b, c, y, x]
        assert torch.allclose(out[b, c, y, x], expected, atol=1e-6)
    # a scalar entry mixed with a map entry: the scalar counts at every pixel
    mixed = mix_conditional_maps(edit, [ft1, ft2], [w1, 0.25])
    assert torch.allclose(mixed, (1 - w1 - 0.25) * edit + w1 * ft1 + 0.25 * ft2, atol=1e-6)


def test_constant_masks_give_the_scalar_mix_bit_for_bit(preds):
    edit, ft1, _ = preds
    ones, zeros = torch.ones(2, 1, 6, 8), torch.zeros(2, 1, 6, 8)
    assert weight_map(ones, 0.3, 0.1) == 0.3 and weight_map(zeros, 0.3, 0.1) == 0.1
    assert weight_map(zeros, 0.3, 0.0) == 0.0
    scalar = mix_conditional(edit, [ft1], [0.3])
    assert torch.equal(mix_conditional_maps(edit, [ft1], [weight_map(ones, 0.3, 0.1)]), scalar)
    assert mix_conditional_maps(edit, [ft1], [weight_map(zeros, 0.3, 0.0)]) is edit  # weight 0: plain CFG
    half = torch.cat([ones[..., :4], zeros[..., 4:]], dim=-1)
    out = mix_conditional_maps(edit, [ft1], [weight_map(half, 0.3, 0.0)])
    assert torch.allclose(out[..., :4], scalar[..., :4], atol=1e-6) and torch.equal(out[..., 4:], edit[..., 4:])


def test_weight_sum_is_checked_per_pixel():
    left = torch.zeros(1, 1, 4, 4)
    left[..., :2] = 1
    # complementary masks: 0.8 + 0.0 on the left, 0.0 + 0.8 on the right: fine although 0.8 + 0.8 > 1
    check_weight_sum([weight_map(left, 0.8, 0.0), weight_map(1 - left, 0.8, 0.0)])
    overlapping = [weight_map(left, 0.8, 0.0), weight_map(left, 0.5, 0.0)]
    assert max_weight_sum(overlapping) == pytest.approx(1.3)
    with pytest.raises(ValueError, match="sum to 1.300 > 1 at some latent pixels"):
        check_weight_sum(overlapping)
    with pytest.raises(ValueError, match="sum to 1.100"):
        check_weight_sum([weight_map(left, 0.2, 0.6), 0.5])  # the outside weight plus a scalar entry
    check_weight_sum([0.4, 0.6000000000000001])  # UI float slack


def test_feather_softens_the_edge_only():
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :, :8] = 1
    soft = feather_mask(mask, 2)
    assert soft.shape == mask.shape and soft.min() >= 0 and soft.max() <= 1
    assert torch.allclose(soft[..., 0], torch.ones(16)) and torch.allclose(soft[..., -1], torch.zeros(16))
    edge = soft[0, 0, 5, 6:10]
    assert (edge[:-1] > edge[1:]).all() and 0 < edge[1] < 1 and 0 < edge[2] < 1  # a ramp across the edge
    assert torch.allclose(soft.flip(-1), 1 - soft, atol=1e-6)  # symmetric about the edge
    assert torch.equal(feather_mask(mask, 0), mask)
    ones = torch.ones(2, 1, 5, 5)
    assert feather_mask(ones, 3) is ones  # a constant mask stays exactly constant
    frames = torch.stack([mask[0], 1 - mask[0]])  # batch of masks: each blurred on its own
    assert torch.allclose(feather_mask(frames, 2), torch.stack([soft[0], 1 - soft[0]]), atol=1e-6)


def test_mix_maps_rejects_mismatched_lists(preds):
    edit, ft1, _ = preds
    with pytest.raises(ValueError, match="must match"):
        mix_conditional_maps(edit, [ft1], [0.2, random_mask(3)])
