"""Model-based classifier-free guidance (SINE Eq. 2/3 and the multi-model sampler; docs/method.md §4-§5).

The mix is affine with weights summing to 1, so it applies unchanged to eps, x0 ("denoised") or v outputs taken at
the same x_t and sigma.
"""
from typing import Sequence

import torch

# Slack for UI float noise: 0.4 + 0.6000000000000001 must still count as B = 1.
_EPS = 1e-6


def mix_conditional(cond_edit: torch.Tensor, cond_finetuned: Sequence[torch.Tensor | None],
                    weights: Sequence[float], active: Sequence[bool]) -> torch.Tensor:
    """(1-B)*cond_edit + sum_{i active} w_i*cond_ft_i, B = sum_{i active} w_i (SINE DDIMMultiSampler).

    w_i weights the FINE-TUNED model i (one model: w = 1 - v, v = the paper's pretrained weight). Entries of
    cond_finetuned may be None where the model is inactive or its weight is 0 (no need to run it).
    """
    if not len(cond_finetuned) == len(weights) == len(active):
        raise ValueError(f"got {len(cond_finetuned)} fine-tuned outputs, {len(weights)} weights and "
                         f"{len(active)} active flags; they must match")
    for w in weights:
        if not 0 <= w <= 1:
            raise ValueError(f"fine-tuned model weights must be in [0, 1], got {w}")
    terms = [(w, c) for c, w, a in zip(cond_finetuned, weights, active) if a and w > 0]
    total = sum(w for w, _ in terms)
    if total > 1 + _EPS:
        raise ValueError(f"active fine-tuned weights sum to {total:g} > 1, which would give the pretrained "
                         "conditional a negative weight")
    if not terms:
        return cond_edit  # exact identity: plain CFG outside the window
    out = (1 - total) * cond_edit
    for w, c in terms:
        if c is None:
            raise ValueError("an active fine-tuned model with a non-zero weight has no output")
        out = out + w * c
    return out


def window_active(timestep: float, start_percent: float, end_percent: float) -> bool:
    """Whether DDPM timestep t is in the window (1-end)*1000 < t <= (1-start)*1000 (ComfyUI percents, 0 = noisiest).

    The strict lower bound is the paper's t > K (end 0.6 <=> K = 400); end >= 1 reaches down to t = 0.
    """
    if start_percent >= end_percent:
        return False
    # Rounding removes float noise such as (1 - 0.7) * 1000 = 300.00000000000006.
    if timestep > round((1.0 - start_percent) * 1000.0, 6):
        return False
    return end_percent >= 1.0 or timestep > round((1.0 - end_percent) * 1000.0, 6)
