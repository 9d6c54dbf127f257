"""Model-based CFG (docs/method.md §4-§5) against the paper's formulas written out literally."""
import pytest
import torch

from reference_forms import paper_window, sine_guidance
from sine_ops.guidance import check_weight_sum, mix_conditional, mix_conditional_maps, window_active


@pytest.fixture
def preds():
    gen = torch.Generator().manual_seed(0)
    e_u, e_c, e_ft1, e_ft2 = (torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64) for _ in range(4))
    return e_u, e_c, e_ft1, e_ft2


def test_one_model_matches_paper_eq3(preds):
    e_u, e_c, e_ft, _ = preds
    w, v = 7.5, 0.7
    paper = w * (v * e_c + (1 - v) * e_ft) + (1 - w) * e_u  # SINE Eq. 3
    code = e_u + w * (v * e_c + (1 - v) * e_ft - e_u)  # guidance_ddim.py
    out = sine_guidance(e_u, e_c, [e_ft], w, [1 - v], [True])
    assert torch.allclose(out, paper, atol=1e-12) and torch.allclose(out, code, atol=1e-12)


def test_two_models_match_multi_formula(preds):
    e_u, e_c, e_ft1, e_ft2 = preds
    w, b1, b2 = 10.0, 0.4, 0.5
    expected = e_u + w * ((1 - b1 - b2) * e_c + b1 * e_ft1 + b2 * e_ft2 - e_u)
    assert torch.allclose(sine_guidance(e_u, e_c, [e_ft1, e_ft2], w, [b1, b2], [True, True]), expected, atol=1e-12)
    # only the model whose window contains t counts, and B shrinks with it
    only2 = e_u + w * ((1 - b2) * e_c + b2 * e_ft2 - e_u)
    assert torch.allclose(sine_guidance(e_u, e_c, [None, e_ft2], w, [b1, b2], [False, True]), only2, atol=1e-12)


def test_window_off_or_zero_weight_is_plain_cfg(preds):
    e_u, e_c, e_ft, _ = preds
    cfg = e_u + 7.5 * (e_c - e_u)
    assert torch.equal(sine_guidance(e_u, e_c, [e_ft], 7.5, [0.3], [False]), cfg)
    assert torch.equal(sine_guidance(e_u, e_c, [e_ft], 7.5, [0.0], [True]), cfg)
    assert torch.equal(sine_guidance(e_u, e_c, [e_ft, None], 7.5, [0.0, 0.4], [True, False]), cfg)
    assert mix_conditional(e_c, [e_ft], [0.0]) is e_c and mix_conditional(e_c, [], []) is e_c


def test_invalid_weights(preds):
    # the mix runs at every step: its entry point (mix_conditional_maps) checks only that outputs and weights pair
    # up. The range of each weight is checked where it enters (the guider node's inputs), the sum once per run
    # (check_weight_sum).
    e_u, e_c, e_ft1, e_ft2 = preds
    with pytest.raises(ValueError, match="must match"):
        mix_conditional_maps(e_c, [e_ft1], [0.3, 0.3])
    with pytest.raises(ValueError, match="sum to 1.200 > 1, which"):
        check_weight_sum([0.6, 0.6])
    # float slack: UI step rounding can give 0.4 + 0.6000000000000001 = 1.0000000000000002
    check_weight_sum([0.4, 0.6000000000000001])
    mix_conditional(e_c, [e_ft1, e_ft2], [0.4, 0.6000000000000001])


def test_window_active_in_sigmas():
    """end_sigma < sigma <= start_sigma: strict at the low-noise end (the paper's t > K), inclusive at the top."""
    assert window_active(5.0, 10.0, 1.0) and window_active(10.0, 10.0, 1.0)
    assert not window_active(1.0, 10.0, 1.0) and not window_active(10.01, 10.0, 1.0)
    assert window_active(1e-3, 999999999.9, 0.0)       # start 0 / end 1 in ComfyUI's percent_to_sigma
    assert not window_active(3.0, 3.0, 3.0)            # start == end: empty
    assert not window_active(3.0, 2.0, 4.0)            # start after end: empty
    assert paper_window(400) == (0.0, 0.6) and paper_window(500) == (0.0, 0.5)
    with pytest.raises(ValueError):
        paper_window(1001)
