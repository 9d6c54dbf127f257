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



def content_stamp(t: torch.Tensor, inference: bool | None = None) -> tuple:
    """What changes when `t`'s values may have changed, for caches of tensors derived from it: its storage and its
    version counter (bumped by every in-place write). An inference tensor (an adapter loaded inside a ComfyUI
    node, a buffer ComfyUI moved to the GPU) has no version counter, and reading it raises; it is written in place
    only inside inference mode, which the pack does only while building it, before anything derived from it is
    cached, so its storage alone stands for it. `inference`: t.is_inference(), when the caller knows it (as
    torch.compile cannot trace is_inference, a forward passes what it read when it was set up)."""
    if inference is None:
        inference = t.is_inference()
    return t.data_ptr(), None if inference else t._version
