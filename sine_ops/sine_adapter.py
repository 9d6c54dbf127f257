"""A fine-tuned SINE model: adapters on its base model's layers, plus what sampling needs to use them.

Its file format is in adapter_file.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import PatchConfig


@dataclass
class SineAdapter:
    """Everything the guided sampler needs from SINE Finetune (or from a saved file)."""
    unet: dict[str, torch.nn.Module]          # "diffusion_model.<path>" -> LoRA | FullDelta
    text_encoder: dict[str, torch.nn.Module]  # "<path in CLIP's cond_stage_model>" -> LoRA | FullDelta
    family: str                               # model family it was trained on: "sd1", "sd2", "sdxl", ...
    source_prompt: str                        # the training caption (SINE feeds it to the fine-tuned model)
    patch: PatchConfig | None = None          # set for patch-based adapters: the grid goes on their rows
    grid_gate: torch.Tensor | None = None     # () learnable grid scale (PatchConfig.grid_gate), else None
    grid_enabled: bool = True                 # sampling-time switch: False = a patch adapter without its grid
    settings: dict = field(default_factory=dict)  # how it was trained, for metadata / the cache key
    # AdamW's state when training stopped, to continue it: parameter name (named_parameters) ->
    # {"step", "exp_avg", "exp_avg_sq"} fp32 CPU tensors; None = not kept (a file saved without it)
    optimizer_state: dict[str, dict[str, torch.Tensor]] | None = None
    # training loss of each step so far: not written to adapter files; disk-cache entries keep it in their metadata
    losses: list[float] = field(default_factory=list)

    def named_parameters(self):
        """(name, parameter) in a fixed order: "<unet path>.<param>", "text_encoders.<path>.<param>",
        "grid_gate" (the file's key prefixes)."""
        for group, prefix in ((self.unet, ""), (self.text_encoder, "text_encoders.")):
            for path, adapter in group.items():
                for name, p in adapter.named_parameters():
                    yield f"{prefix}{path}.{name}", p
        if self.grid_gate is not None:
            yield "grid_gate", self.grid_gate

    def parameters(self):
        for _, p in self.named_parameters():
            yield p

    def requires_grad_(self, flag: bool) -> "SineAdapter":
        for p in self.parameters():
            p.requires_grad_(flag)
        return self

    @property
    def grid_scale(self) -> torch.Tensor | float:
        return 1.0 if self.grid_gate is None else self.grid_gate
