"""Model-based classifier-free guidance (SINE Eq. 2/3 and the multi-model sampler; docs/method.md §4-§5).

The mix is affine with weights summing to 1, so it applies unchanged to eps, x0 ("denoised") or v outputs taken at
the same x_t and sigma. With masks, each weight is a map over the latent (spatial control of the mix): the same
affine mix per pixel, so the same holds pixel by pixel.
"""
import math
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# Slack for UI float noise: 0.4 + 0.6000000000000001 must still count as B = 1.
_EPS = 1e-6


def mix_conditional(cond_edit: torch.Tensor, cond_finetuned: Sequence[torch.Tensor],
                    weights: Sequence[float]) -> torch.Tensor:
    """(1-B)*cond_edit + sum_i w_i*cond_ft_i, B = sum_i w_i (SINE DDIMMultiSampler), over the fine-tuned models
    that guide this step (the caller leaves out the ones outside their window).

    w_i weights the FINE-TUNED model i (one model: w = 1 - v, v = the paper's pretrained weight). The weights are
    checked once, where they enter (each in [0, 1]: the guider node's inputs; their sum: check_weight_sum when the
    guider is built and when sampling starts), never here at every step; that outputs and weights pair up is
    checked by mix_conditional_maps, the entry point the nodes call.
    """
    terms = [(w, c) for c, w in zip(cond_finetuned, weights) if w > 0]
    if not terms:
        return cond_edit  # exact identity: plain CFG outside the window
    out = (1 - sum(w for w, _ in terms)) * cond_edit
    for w, c in terms:
        out = out + w * c
    return out


def window_active(sigma: float, start_sigma: float, end_sigma: float) -> bool:
    """Whether noise level sigma is in the guidance window end_sigma < sigma <= start_sigma (docs/method.md §4).

    The bounds come from the model's own `percent_to_sigma`, so the window means the same noise levels under every
    model_sampling (discrete eps / v / zsnr, continuous EDM, flow). The strict lower bound is the paper's t > K;
    with ComfyUI's percent convention (t = (1 - percent) * 999 on discrete schedules) end 0.6 puts K at t = 399.6,
    so an integer step at t = 400 is guided, as in the official sampler (t >= K).
    """
    return end_sigma < sigma <= start_sigma


class ScheduledSigma:
    """The noise level of a sampler's model calls as the host needs it for the window decisions (which rows the
    batch holds), without reading the device's sigma back: each read is a host sync, which drains the GPU queue.

    The host holds the run's schedule `sigmas` (read once, before sampling) and the window `edges` (every start
    and end sigma). The sampler reports each finished step (`step_done(i)`, from its progress callback, which
    ComfyUI's samplers call right after a step's first model call), so the calls until the next report are the
    rest of step i and the first call of step i + 1: their sigmas lie within sigmas[i + 1] .. sigmas[i]. Where no
    edge lies in that span, every sigma in it decides every window alike: `decision_sigmas()` answers sigmas[i]
    alone. Where edges do (one step per edge inside the schedule), the span falls into cells, one per side of
    each edge: it answers one sigma per cell, the caller computes a result for each, and `pick()` selects on the
    device the one of the cell that holds the call's sigma. No call reads its sigma.

    A sampler that calls the model elsewhere (its own step sizes, restart segments, look-ahead stages, no reports)
    is caught without a read per step too: each call checks on the device that its sigma lies between the edges
    around its span, into one flag that `off_schedule()` reads once, after the run. The caller then samples again,
    reading every sigma, so no result depends on this shortcut.
    """

    def __init__(self, sigmas: Sequence[float], edges: Iterable[float]):
        self.sigmas = [float(s) for s in sigmas]
        self.edges = sorted({float(e) for e in edges if math.isfinite(e)})
        self.last_step = -1
        # last step -> cell(), constant per step
        self._cells: dict[int, tuple[tuple[float, ...], float, float]] = {}
        self._outside: torch.Tensor | None = None  # on the sigmas' device: True once a call left its span's edges

    def step_done(self, step: int) -> None:
        self.last_step = step

    def cell(self) -> tuple[tuple[float, ...], float, float]:
        """For the calls until the next report: (the sigmas that decide them, the edge below their span, the edge
        above it). The deciding sigmas are the span's top, which decides the calls above every edge within the
        span, then each of those edges, descending, which decides the calls at or below it (windows are
        end < sigma <= start) and above the next. The edges around the span are -inf / inf where there is none."""
        if self.last_step not in self._cells:
            n = len(self.sigmas) - 1
            top = min(max(self.last_step, 0), n)
            span = self.sigmas[top:min(top + 1, n) + 1]
            low, high = min(span), max(span)
            within = sorted((e for e in self.edges if low <= e < high), reverse=True)
            self._cells[self.last_step] = ((high, *within), max((e for e in self.edges if e < low), default=-math.inf),
                                           min((e for e in self.edges if e >= high), default=math.inf))
        return self._cells[self.last_step]

    def decision_sigmas(self, timestep: torch.Tensor) -> tuple[float, ...]:
        """The sigmas to take this call's window decisions at: one, or one per cell of a span that window edges
        cross (then the caller hands a result for each to `pick`). Queues the device check of the call's sigma
        against the edges around its span (a comparison and an in-place OR per finite edge; no read)."""
        deciding, below, above = self.cell()
        s = _device_sigma(timestep)
        if self._outside is None:
            self._outside = torch.zeros((), dtype=torch.bool, device=s.device)
        if below > -math.inf:
            self._outside.logical_or_(s <= _at_most(below, s.dtype))
        if above < math.inf:
            self._outside.logical_or_(s > _at_most(above, s.dtype))
        return deciding

    def pick(self, timestep: torch.Tensor, results: Sequence[torch.Tensor]) -> torch.Tensor:
        """Of `results`, one per sigma `decision_sigmas` answered, the one of the cell that holds the call's sigma,
        selected on the device (a comparison and a where per edge)."""
        deciding = self.cell()[0]
        if len(results) != len(deciding):
            raise ValueError(f"got {len(results)} results for {len(deciding)} cells")
        s = _device_sigma(timestep)
        out = results[0]
        for edge, result in zip(deciding[1:], results[1:]):  # descending edges: the lowest cell that holds s wins
            out = torch.where(s <= _at_most(edge, s.dtype), result, out)
        return out

    def off_schedule(self) -> bool:
        """Whether a call's sigma fell outside the edges around its span (one read; call after the run)."""
        return self._outside is not None and bool(self._outside)


def _device_sigma(timestep: torch.Tensor) -> torch.Tensor:
    """A model call's sigma as a 0-dim tensor on its device, float32 or float64 (no read)."""
    s = timestep[0]
    return s if s.dtype in (torch.float32, torch.float64) else s.float()


def _at_most(value: float, dtype: torch.dtype) -> float:
    """The largest number of `dtype` (float32 or float64) <= value. A float32 tensor compares with a Python float
    rounded to float32, which can round up; against this bound `s <= value` and `s > value` stay exact."""
    if dtype == torch.float64:
        return value
    f = np.float32(value)
    if float(f) > value:
        f = np.nextafter(f, np.float32(-np.inf))
    return float(f)


# ---- spatial control: weight maps ---------------------------------------------------------------------------------
Weight = float | torch.Tensor  # a scalar weight, or a (B, 1, H, W) map broadcast over the latent's channels


def _constant_value(t: torch.Tensor) -> float | None:
    """The value of a tensor whose elements are all equal, else None."""
    first = t.reshape(-1)[0]
    return float(first) if bool((t == first).all()) else None


def feather_mask(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Soft mask edge about `radius` pixels wide: a Gaussian blur over the last two dims (sigma = radius / 2,
    kernel 2 * radius + 1, edges replicated so a mask touching the border stays 1 there). Values stay in [0, 1].
    A constant mask is returned as it is: its blur is itself, and this keeps it exact."""
    if radius <= 0 or _constant_value(mask) is not None:
        return mask
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=mask.device)
    kernel = torch.exp(-0.5 * (x / (radius / 2)) ** 2)
    kernel = kernel / kernel.sum()
    m = mask.reshape(-1, 1, *mask.shape[-2:]).float()
    m = F.conv2d(F.pad(m, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    m = F.conv2d(F.pad(m, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return m.reshape(mask.shape).clamp(0, 1).to(mask.dtype)


def weight_map(mask: torch.Tensor, inside: float, outside: float) -> Weight:
    """w(x) = mask(x) * inside + (1 - mask(x)) * outside, mask in [0, 1].

    A constant mask gives a python float (c * inside + (1 - c) * outside, so exactly `inside` for an all-ones mask
    and `outside` for an all-zeros one): the mix then is the scalar one, bit for bit. inside and outside are in
    [0, 1], checked where they enter (the guider node's inputs)."""
    c = _constant_value(mask)
    if c is not None:
        return c * inside + (1 - c) * outside
    return mask * inside + (1 - mask) * outside


def max_weight_sum(weights: Sequence[Weight]) -> float:
    """The largest per-pixel sum of the weights (scalars count everywhere)."""
    total = sum(weights, 0.0)
    return float(total.max()) if isinstance(total, torch.Tensor) else float(total)


def check_weight_sum(weights: Sequence[Weight]) -> None:
    """ValueError when the weights sum to more than 1 at any pixel (the base model's weight would be negative)."""
    worst = max_weight_sum(weights)
    if worst > 1 + _EPS:
        where = " at some latent pixels" if any(isinstance(w, torch.Tensor) for w in weights) else ""
        raise ValueError(f"the fine-tuned weights sum to {worst:.3f} > 1{where}, which would give the pretrained "
                         f"conditional a negative weight{' there' if where else ''}")


def mix_conditional_maps(cond_edit: torch.Tensor, cond_finetuned: Sequence[torch.Tensor],
                         weights: Sequence[Weight]) -> torch.Tensor:
    """Per pixel: (1 - sum_i w_i(x)) * cond_edit + sum_i w_i(x) * cond_ft_i, for the ACTIVE models only.

    Scalar weights only: exactly mix_conditional. Maps are (B, 1, H, W) (broadcast over channels); their sum is
    checked once, where they are made (check_weight_sum), not at every step."""
    if len(cond_finetuned) != len(weights):
        raise ValueError(f"got {len(cond_finetuned)} fine-tuned outputs and {len(weights)} weights; they must match")
    if not any(isinstance(w, torch.Tensor) for w in weights):
        return mix_conditional(cond_edit, cond_finetuned, weights)
    maps = [w.to(cond_edit) if isinstance(w, torch.Tensor) else w for w in weights]
    out = (1 - sum(maps, 0.0)) * cond_edit
    for w, c in zip(maps, cond_finetuned):
        out = out + w * c
    return out
