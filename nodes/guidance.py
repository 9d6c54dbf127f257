"""SINE Guider / SINE Guided Sampler: model-based classifier-free guidance (docs/method.md §4-§5).

One UNet, one batched forward per step: the guider's model is a clone of the base MODEL carrying every
fine-tuned entry's adapters (routed per batch row) and grids, so the base predictions (uncond, edit prompt)
and the fine-tuned predictions (each entry's training caption) share a forward without any weight re-patching.
Rows are assigned per forward call by model_patching.RoutingWrapper (a `model_function_wrapper`, which ComfyUI
calls with `cond_or_uncond`: the index, in the conds list given to calc_cond_batch, of every chunk of the batch),
from the cond index -> adapter id list each step puts in its transformer_options.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..sine_ops.adapters import RowRouter
from ..sine_ops.guidance import Weight, check_weight_sum, window_active
from ..sine_ops.sine_adapter import SineAdapter
from . import guided_prediction
from . import memory_guard
from . import model_patching as mp
from .errors import InputError, SineNodeError, node_errors
from .types import AdapterType, GuidanceStackType

PAPER_FINETUNED_WEIGHT = 0.3  # paper v = 0.7 on the base model, so 0.3 on the fine-tuned one
PAPER_END_PERCENT = 0.6       # paper K = 400 of 1000: guidance while t > 400, i.e. the first 60% of noise levels


@dataclass(frozen=True)
class GuidanceEntry:
    """One fine-tuned model in the mix: its adapter, its source conditioning, its weight and noise window, and
    optionally a MASK making the weight a map: `weight` inside the mask, `outside_weight` outside."""
    adapter: SineAdapter
    source_conditioning: list
    weight: float
    start_percent: float
    end_percent: float
    mask: torch.Tensor | None = None
    outside_weight: float = 0.0
    mask_feather: int = 0


def _entry(sine_adapter, source_conditioning, finetuned_weight, start_percent, end_percent, mask=None,
           outside_weight=0.0, mask_feather=0) -> GuidanceEntry:
    """The entry of one fine-tuned model, from the node inputs of _entry_inputs (names as the nodes have them)."""
    if start_percent > end_percent:
        raise InputError("start_percent", f"{start_percent} is after 'end_percent' ({end_percent}); the window "
                                          "would be empty. Paper: start 0.0, end 0.6.")
    if not 0.0 <= finetuned_weight <= 1.0:
        raise InputError("finetuned_weight", f"must be in [0, 1], got {finetuned_weight}")
    if not 0.0 <= outside_weight <= 1.0:
        raise InputError("outside_weight", f"must be in [0, 1], got {outside_weight}")
    if mask_feather < 0:
        raise InputError("mask_feather", f"must be >= 0 latent pixels, got {mask_feather}")
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3) or mask.numel() == 0):
        raise InputError("mask", f"expected a MASK (H x W or B x H x W), got "
                                 f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask is not None and not torch.isfinite(mask).all():
        raise InputError("mask", "the mask contains NaN/Inf values, which would make the whole latent NaN; check "
                                 "the node that produced it")
    return GuidanceEntry(sine_adapter, source_conditioning, finetuned_weight, start_percent, end_percent,
                         None if mask is None else mask.detach().float().clamp(0, 1), outside_weight, mask_feather)


_WEIGHT_TOOLTIP = ("Weight of the FINE-TUNED model's prediction (its source prompt) in the conditional mix during the "
                   "window; the base model (edit prompt) gets 1 minus the sum of fine-tuned weights. Paper: 0.3 "
                   "(v = 0.7 on the base). Higher keeps more of the source image, lower follows the edit more.")
_START_TOOLTIP = ("Where the guidance window starts, in ComfyUI's noise-level percent (0 = pure noise). The "
                  "window is defined by noise level, so it is the same whatever sampler, scheduler, steps or denoise.")
_END_TOOLTIP = ("Where the window ends (noise-level percent). 0.6 = the paper's K = 400 of 1000 timesteps: the "
                "fine-tuned model steers the first, high-noise 60%; later steps are plain CFG with the base model. "
                "Higher keeps more source detail; 0.5 = K 500.")
_MASK_TOOLTIP = ("Optional: WHERE this fine-tuned model steers. Inside the mask (white) its weight is "
                 "finetuned_weight, outside it is outside_weight, e.g. keep the face 0.8, free the background 0.1. "
                 "Resized to the latent like a latent noise mask. Unconnected: finetuned_weight everywhere. To "
                 "freeze a region exactly, use Set Latent Noise Mask instead (both work together).")
_OUTSIDE_TOOLTIP = ("With a mask: the fine-tuned model's weight OUTSIDE the mask (finetuned_weight applies inside). "
                    "0 = plain CFG with the edit prompt there. The weights of all models must sum to at most 1 at "
                    "every pixel. No effect without a mask.")
_FEATHER_TOOLTIP = ("With a mask: soften its edge over about this many LATENT pixels (1 latent pixel = 8 image "
                    "pixels for SD), so the kept and the edited region blend. 0 = the resized mask as it is.")


def _entry_inputs():
    return [
        AdapterType.Input("sine_adapter", tooltip="From SINE Finetune or Load SINE Adapter."),
        io.Conditioning.Input("source_conditioning",
                              tooltip="The training caption encoded by the fine-tuned CLIP (SINE Finetune's "
                                      "source_conditioning, or SINE Apply Adapter's for a loaded adapter)."),
        io.Float.Input("finetuned_weight", default=PAPER_FINETUNED_WEIGHT, min=0.0, max=1.0, step=0.01,
                       tooltip=_WEIGHT_TOOLTIP),
        io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01, tooltip=_START_TOOLTIP),
        io.Float.Input("end_percent", default=PAPER_END_PERCENT, min=0.0, max=1.0, step=0.01, tooltip=_END_TOOLTIP),
        io.Mask.Input("mask", optional=True, tooltip=_MASK_TOOLTIP),
        # optional with defaults: API prompts written before these inputs existed still validate
        io.Float.Input("outside_weight", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip=_OUTSIDE_TOOLTIP),
        io.Int.Input("mask_feather", default=0, min=0, max=64, optional=True, tooltip=_FEATHER_TOOLTIP),
    ]


class SineGuider(guided_prediction.WindowedGuider):
    """CFG with SINE's conditional mix; `entries[i]` owns the batch rows of cond index 2 + i."""

    def __init__(self, model_patcher, entries: list[GuidanceEntry], node_name: str = "SINE Guider"):
        super().__init__(model_patcher)
        self.entries = entries
        self.node_name = node_name  # errors found while sampling (per-pixel weight sums) name the node
        self._weights: dict = {}    # (latent shape, device) -> each entry's weight or weight map
        self._windows: list | None = None  # each entry's (start_sigma, end_sigma), set once per run

    def entry_weights(self, x: torch.Tensor) -> list[Weight]:
        """Every entry's weight (map) for latent x, made and checked (sum <= 1 per pixel) once per latent shape,
        on the CPU, then moved to x's device once."""
        key = (tuple(x.shape), str(x.device))
        if key not in self._weights:
            weights = [guided_prediction.entry_weight(e, tuple(x.shape)) for e in self.entries]
            try:
                check_weight_sum(weights)
            except ValueError as e:
                raise SineNodeError(f"{self.node_name}: inputs 'finetuned_weight' / 'outside_weight' / 'mask': {e}. "
                                    "Lower finetuned_weight or outside_weight on the entries, or use masks that do "
                                    "not overlap where the weights add up.") from None
            self._weights[key] = [w.to(x.device) if isinstance(w, torch.Tensor) else w for w in weights]
        return self._weights[key]

    def inner_sample(self, *args, **kwargs):
        # once per run: each entry's window in this model's sigmas (percent_to_sigma is constant for a run)
        self._windows = [window_sigmas(self.inner_model.model_sampling, e) for e in self.entries]
        return super().inner_sample(*args, **kwargs)

    def window_edges(self):
        return [edge for window in self._windows for edge in window]

    def set_conds(self, positive, negative):
        conds = {"positive": positive, "negative": negative}
        control = [d["control"] for _, d in positive if "control" in d]
        for i, entry in enumerate(self.entries):
            # ControlNets attached to the edit prompt steer the fine-tuned rows too (same structure for the whole
            # mix), and sharing the control object lets ComfyUI batch those rows with the base ones.
            conds[f"sine_source_{i}"] = [[c, dict(d, control=control[0]) if control else d]
                                         for c, d in entry.source_conditioning]
        self.inner_set_conds(conds)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        model = self.inner_model
        weights = self.entry_weights(x)
        if self._windows is None:  # called outside inner_sample (a wrapper driving the guider itself)
            self._windows = [window_sigmas(model.model_sampling, e) for e in self.entries]
        guiding = [i for i, w in enumerate(weights)
                   if not (isinstance(w, (int, float)) and w == 0)]  # a zero weight everywhere: no forward rows
        if not guiding:
            return guided_prediction.predict_mixed(self, x, timestep, model_options, [], lambda edit, _: edit)

        def decide(sigma: float):  # the entries guiding at this noise level, and their weights
            active = [i for i in guiding if window_active(sigma, *self._windows[i])]
            return active, [weights[i] for i in active]
        return self.predict_windowed(x, timestep, model_options, decide)


def window_sigmas(model_sampling, entry: GuidanceEntry) -> tuple[float, float]:
    """(start_sigma, end_sigma) of an entry's window under this model's sampling, as ComfyUI's own timestep ranges
    (ControlNet, hooks) turn percents into sigmas."""
    return guided_prediction.window_sigmas(model_sampling, entry.start_percent, entry.end_percent)


def build_guider(model, positive, negative, cfg: float, entries: list[GuidanceEntry],
                 node_name: str = "SINE Guider") -> SineGuider:
    if model.model_options.get("transformer_options", {}).get(mp.FINETUNED_FLAG):
        raise InputError("model", "this is a SINE Finetune output; connect the base MODEL from your checkpoint "
                                  "loader (the fine-tuned side comes from sine_adapter).")
    # with masks the sum is checked per latent pixel when sampling starts (SineGuider.entry_weights)
    if all(e.mask is None for e in entries):
        try:
            check_weight_sum([e.weight for e in entries])
        except ValueError as e:
            raise InputError("finetuned_weight", f"{e}; lower 'finetuned_weight' on the entries.") from None
    for e in entries:
        mp.check_family(e.adapter, model)
    patched = mp.patched_model(model, {i: e.adapter for i, e in enumerate(entries)}, RowRouter())
    guider = SineGuider(patched, entries, node_name)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def _entries(extra_models, **entry_inputs) -> list[GuidanceEntry]:
    """The node's own entry first, then those chained in through extra_models."""
    return [_entry(**entry_inputs)] + list(extra_models or ())


def _extra_models_input():
    return GuidanceStackType.Input("extra_models", optional=True,
                                   tooltip="More fine-tuned models from SINE Add Fine-tuned Model.")


class SineAddFinetuned(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SINE_AddFinetunedModel",
            display_name="SINE Add Fine-tuned Model",
            category="SINE",
            description="Adds one more fine-tuned model (e.g. a style model) to a SINE Guider's mix (SINE §5: "
                        "content from one image, style from another). Chain several; connect to extra_models.",
            inputs=_entry_inputs() + [GuidanceStackType.Input("extra_models", optional=True,
                                                              tooltip="Chain from another SINE Add Fine-tuned Model.")],
            outputs=[GuidanceStackType.Output(display_name="extra_models")],
        )

    @classmethod
    def execute(cls, extra_models=None, **entry_inputs) -> io.NodeOutput:
        with node_errors("SINE Add Fine-tuned Model"):
            entry = _entry(**entry_inputs)
        return io.NodeOutput(tuple(extra_models or ()) + (entry,))


class SineGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SINE_Guider",
            display_name="SINE Guider",
            category="SINE",
            description="SINE model-based guidance as a GUIDER for SamplerCustomAdvanced (any sampler, scheduler, "
                        "sigmas). In the window the conditional prediction mixes the base model (positive = edit "
                        "prompt) with the fine-tuned model (its source prompt); elsewhere plain CFG.",
            inputs=[
                io.Model.Input("model", tooltip="The BASE model from your checkpoint loader (not the fine-tuned "
                                                "output); ControlNet/model patches on it keep working."),
                io.Conditioning.Input("positive", tooltip="The edit prompt through the base CLIP, e.g. 'a photo of "
                                                          "a dog wearing a superhero cape'."),
                io.Conditioning.Input("negative", tooltip="Negative / unconditional prompt through the base CLIP."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (paper: 7.5)."),
            ] + _entry_inputs() + [_extra_models_input()],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, extra_models=None, **entry_inputs) -> io.NodeOutput:
        with node_errors("SINE Guider"):
            entries = _entries(extra_models, **entry_inputs)
            return io.NodeOutput(build_guider(model, positive, negative, cfg, entries, "SINE Guider"))


class SineGuidedSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SINE_GuidedSampler",
            display_name="SINE Guided Sampler",
            category="SINE",
            description="KSampler with SINE model-based guidance: edits the fine-tuned image with the positive "
                        "prompt. Same seed/steps/sampler/scheduler/denoise semantics as KSampler; img2img and "
                        "latent noise masks work.",
            inputs=[
                io.Model.Input("model", tooltip="The BASE model from your checkpoint loader."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed (same noise as KSampler for the same seed)."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Sampling steps (paper: DDIM 100)."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                               tooltip="Classifier-free guidance scale (paper: 7.5)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="ddim",
                               tooltip="Sampler (paper: DDIM)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="Scheduler (paper: DDIM uniform)."),
                io.Conditioning.Input("positive", tooltip="The edit prompt through the base CLIP."),
                io.Conditioning.Input("negative", tooltip="Negative / unconditional prompt through the base CLIP."),
                io.Latent.Input("latent_image", tooltip="Empty Latent Image for SINE's text-to-image edit (any "
                                                        "size, multiple of 8), or an encoded image for img2img."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 = from pure noise (SINE); lower keeps more of latent_image."),
            ] + _entry_inputs() + [_extra_models_input()],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(cls, model, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise,
                extra_models=None, **entry_inputs) -> io.NodeOutput:
        with node_errors("SINE Guided Sampler"):
            entries = _entries(extra_models, **entry_inputs)
            guider = build_guider(model, positive, negative, cfg, entries, "SINE Guided Sampler")
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
        with node_errors("SINE Guided Sampler"):  # base rows (cond, uncond) + one per fine-tuned entry per step
            memory_guard.check_sampling(model, tuple(latent.shape), 2 + len(entries), "latent_image")
        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
        samples = guider.sample(noise, latent, comfy.samplers.sampler_object(sampler_name), sigmas,
                                denoise_mask=latent_image.get("noise_mask"),
                                callback=latent_preview.prepare_callback(guider.model_patcher, steps),
                                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
        out = dict(latent_image)
        out["samples"] = samples.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(out)
