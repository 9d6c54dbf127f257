"""Zero-copy views of frozen weights that autograd may save, and that can be read in any state ComfyUI leaves them.

ComfyUI creates and loads weights under torch.inference_mode, so they are inference tensors, which a backward
pass refuses to save ("Inference tensors cannot be saved for backward"). And a weight that a GPU load or offload
copied outside inference mode is an inference Parameter holding a normal tensor, whose every view raises
"Inference tensors do not track version counter" (../shared/repro/inference_tensor_move.py). A tensor built
directly on the weight's storage is neither: it shares the memory and reads the current values.
"""
from __future__ import annotations

import torch


def normal_view(t: torch.Tensor) -> torch.Tensor:
    """A normal (non-inference) tensor over `t`'s storage, with its size, stride and offset: no copy, no autograd
    history. Works for inference tensors, normal tensors and weights in the broken state above alike."""
    with torch.inference_mode(False):
        view = torch.empty(0, dtype=t.dtype, device=t.device)
        view.set_(t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
    return view
