"""Model-based CFG (docs/method.md §4-§5) against the paper's formulas written out literally."""
import pytest
import torch

from reference_forms import paper_window, sine_guidance
from sine_ops.guidance import (ScheduledSigma, check_weight_sum, mix_conditional, mix_conditional_maps,
                                window_active)


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


# ---- ScheduledSigma: the step's sigma on the host without a read per step ----------------------------------------
SCHEDULE = [14.6, 7.0, 3.0, 1.5, 0.8, 0.3, 0.0]
EDGES = [1.2, 999999999.9]  # the paper window: start 0 (a huge sigma) and end 0.6


def euler_calls(schedule: ScheduledSigma, sigmas, calls_per_step=1):
    """Drive `schedule` as a k-diffusion sampler does (a step's first call, its report, its later calls) and
    return, per call, (the sigma that decides it, how many sigmas `decision_sigmas` answered, the call's sigma).
    The deciding sigma is the one `pick` selects on the "device" when several were answered."""
    out = []
    for i, s in enumerate(sigmas[:-1]):
        for k in range(calls_per_step):  # heun-like: the later calls of step i lie within sigmas[i + 1] .. sigmas[i]
            sigma = s + (sigmas[i + 1] - s) * k / max(1, calls_per_step - 1)
            timestep = torch.tensor([sigma], dtype=torch.float32)
            deciding = schedule.decision_sigmas(timestep)
            picked = schedule.pick(timestep, [torch.tensor(d, dtype=torch.float64) for d in deciding])
            out.append((float(picked), len(deciding), sigma))
            if k == 0:
                schedule.step_done(i)
    return out


@pytest.mark.parametrize("calls_per_step", [1, 2])
def test_scheduled_sigma_decides_as_a_read_and_splits_only_at_an_edge(calls_per_step):
    schedule = ScheduledSigma(SCHEDULE, EDGES)
    calls = euler_calls(schedule, SCHEDULE, calls_per_step)
    start, end = EDGES[1], EDGES[0]
    for decided, _, true_sigma in calls:
        assert window_active(decided, start, end) == window_active(float(torch.tensor(true_sigma)), start, end)
    split = [true_sigma for _, answered, true_sigma in calls if answered > 1]
    # only the calls after the report of the step the edge 1.2 crosses (1.5 -> 0.8) are decided on both sides:
    # the next step's first call and, heun-like, the step's later call (both at 0.8)
    assert split == [0.8] * calls_per_step
    assert not schedule.off_schedule()


def test_scheduled_sigma_picks_each_side_of_every_edge_in_a_span():
    """Two edges inside one step: three cells, each call picks the result of its own, the edges themselves
    belonging to the cell below them (windows are end < sigma <= start)."""
    schedule = ScheduledSigma([4.0, 1.0, 0.0], [3.0, 2.0])
    deciding = schedule.decision_sigmas(torch.tensor([4.0]))
    assert deciding == (4.0, 3.0, 2.0)
    results = [torch.tensor(float(k)) for k in range(3)]
    for sigma, cell in [(4.0, 0), (3.5, 0), (3.0, 1), (2.5, 1), (2.0, 2), (1.0, 2)]:
        assert float(schedule.pick(torch.tensor([sigma]), results)) == cell, sigma
    with pytest.raises(ValueError):
        schedule.pick(torch.tensor([4.0]), results[:2])


def test_scheduled_sigma_catches_a_call_off_its_step():
    """A call whose sigma is across an edge from the span it was attributed to is flagged (an adaptive sampler,
    a sampler that reports no steps); one inside the same cell is not."""
    schedule = ScheduledSigma(SCHEDULE, EDGES)
    schedule.step_done(0)
    assert schedule.decision_sigmas(torch.tensor([2.0])) == (14.6,) and not schedule.off_schedule()  # above 1.2
    schedule.decision_sigmas(torch.tensor([1.0]))
    assert schedule.off_schedule()
    never_reported = ScheduledSigma(SCHEDULE, EDGES)
    for s in SCHEDULE[:-1]:
        never_reported.decision_sigmas(torch.tensor([s]))
    assert never_reported.off_schedule()


def test_scheduled_sigma_edge_checks_are_exact_in_float32():
    """An edge that float32 cannot hold: a float32 sigma just above it is outside the cell below it. Compared as a
    Python float, the edge would be rounded to float32 (up, here), the call would pass unflagged, and `pick` would
    give it the cell below."""
    import numpy as np
    edge = float(np.float32(1.2)) - 1e-9  # between two float32 numbers, rounds up to float32(1.2)
    sigma = torch.tensor([1.2], dtype=torch.float32)
    assert float(sigma) > edge and float(torch.tensor(edge, dtype=torch.float32)) == float(sigma)
    schedule = ScheduledSigma([1.0, 0.5, 0.0], [edge])  # the whole schedule lies below the edge
    assert schedule.cell() == ((1.0,), -float("inf"), edge)
    schedule.decision_sigmas(sigma)
    assert schedule.off_schedule()
    across = ScheduledSigma([2.0, 1.0, 0.0], [edge])  # the first step crosses it
    assert across.decision_sigmas(sigma) == (2.0, edge)
    assert float(across.pick(sigma, [torch.tensor(0.0), torch.tensor(1.0)])) == 0.0  # above the edge


@pytest.mark.parametrize("step", [0, 3], ids=["plain step", "step across an edge"])
def test_scheduled_sigma_adds_no_host_read(step):
    from op_counter import OpCounter
    schedule = ScheduledSigma(SCHEDULE, EDGES)
    schedule.decision_sigmas(torch.tensor([14.6]))  # the first call makes the flag
    schedule.step_done(step)
    timestep = torch.tensor([SCHEDULE[step + 1]])
    results = [torch.zeros(1, 4, 8, 8), torch.ones(1, 4, 8, 8)]
    with OpCounter() as c:
        deciding = schedule.decision_sigmas(timestep)
        if len(deciding) > 1:
            schedule.pick(timestep, results)
    assert len(deciding) == (2 if step == 3 else 1)
    assert not sum(c.syncs.values()) and c.ops <= 6, (dict(c.syncs), c.ops)