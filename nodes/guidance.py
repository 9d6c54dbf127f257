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
from ..sine_ops.guidance import mix_conditional, window_active
from ..sine_ops.sine_adapter import SineAdapter
from . import model_patching as mp
from .errors import InputError, node_errors
from .types import AdapterType, GuidanceStackType

PAPER_FINETUNED_WEIGHT = 0.3  # paper v = 0.7 on the base model, so 0.3 on the fine-tuned one
PAPER_END_PERCENT = 0.6       # paper K = 400 of 1000: guidance while t > 400, i.e. the first 60% of noise levels


@dataclass(frozen=True)
class GuidanceEntry:
    """One fine-tuned model in the mix: its adapter, its source conditioning, its weight and noise window."""
    adapter: SineAdapter
    source_conditioning: list
    weight: float
    start_percent: float
    end_percent: float


def _entry(adapter, source_conditioning, weight, start_percent, end_percent) -> GuidanceEntry:
    if start_percent > end_percent:
        raise InputError("start_percent", f"{start_percent} is after 'end_percent' ({end_percent}); the window "
                                          "would be empty. Paper: start 0.0, end 0.6.")
    if not 0.0 <= weight <= 1.0:
        raise InputError("finetuned_weight", f"must be in [0, 1], got {weight}")
    return GuidanceEntry(adapter, source_conditioning, weight, start_percent, end_percent)


_WEIGHT_TOOLTIP = ("Weight of the FINE-TUNED model's prediction (its source prompt) in the conditional mix during the "
                   "window; the base model (edit prompt) gets 1 minus the sum of fine-tuned weights. Paper: 0.3 "
                   "(v = 0.7 on the base). Higher keeps more of the source image, lower follows the edit more.")
_START_TOOLTIP = ("Where the guidance window starts, in ComfyUI's noise-level percent (0 = pure noise). The "
                  "window is defined by noise level, so it is the same whatever sampler, scheduler, steps or denoise.")
_END_TOOLTIP = ("Where the window ends (noise-level percent). 0.6 = the paper's K = 400 of 1000 timesteps: the "
                "fine-tuned model steers the first, high-noise 60%; later steps are plain CFG with the base model. "
                "Higher keeps more source detail; 0.5 = K 500.")


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
    ]


class SineGuider(comfy.samplers.CFGGuider):
    """CFG with SINE's conditional mix; `entries[i]` owns the batch rows of cond index 2 + i."""

    def __init__(self, model_patcher, entries: list[GuidanceEntry]):
        super().__init__(model_patcher)
        self.entries = entries

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
        t = float(model.model_sampling.timestep(timestep[:1]).item())
        active = [i for i, e in enumerate(self.entries)
                  if e.weight > 0 and window_active(t, e.start_percent, e.end_percent)]
        cfg1 = abs(self.cfg - 1.0) < 1e-9 and not model_options.get("disable_cfg1_optimization", False)
        positive, negative = self.conds.get("positive"), self.conds.get("negative")
        uncond = None if cfg1 else negative
        conds = [positive, uncond] + [self.conds[f"sine_source_{i}"] for i in active]
        model_options = _with_cond_owner(model_options, [-1, -1] + active)
        if "sampler_calc_cond_batch_function" in model_options:
            out = model_options["sampler_calc_cond_batch_function"](
                {"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options})
        else:
            out = comfy.samplers.calc_cond_batch(model, conds, x, timestep, model_options)
        cond_pred = mix_conditional(out[0], [out[2 + k] for k in range(len(active))],
                                    [self.entries[i].weight for i in active], [True] * len(active))
        out = [cond_pred, out[1]]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": [positive, uncond], "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                      "input": x, "sigma": timestep, "model": model, "model_options": model_options})
        return comfy.samplers.cfg_function(model, out[0], out[1], self.cfg, x, timestep, model_options=model_options,
                                           cond=positive, uncond=uncond)


def _with_cond_owner(model_options: dict, owner: list[int]) -> dict:
    """model_options for this step only, whose transformer_options say which adapter owns each cond index."""
    return {**model_options, "transformer_options": {**model_options.get("transformer_options", {}),
                                                     mp.COND_OWNER_KEY: owner}}


def build_guider(model, positive, negative, cfg: float, entries: list[GuidanceEntry]) -> SineGuider:
    if model.model_options.get("transformer_options", {}).get(mp.FINETUNED_FLAG):
        raise InputError("model", "this is a SINE Finetune output; connect the base MODEL from your checkpoint "
                                  "loader (the fine-tuned side comes from sine_adapter).")
    total = sum(e.weight for e in entries)
    if total > 1.0 + 1e-6:
        raise InputError("finetuned_weight", f"the fine-tuned weights sum to {total:.3f} > 1, which would give the "
                                             "base model a negative weight; lower 'finetuned_weight' on the entries.")
    for e in entries:
        mp.check_family(e.adapter, model)
    patched = mp.patched_model(model, {i: e.adapter for i, e in enumerate(entries)}, RowRouter())
    guider = SineGuider(patched, entries)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def _entries(sine_adapter, source_conditioning, finetuned_weight, start_percent, end_percent,
             extra_models) -> list[GuidanceEntry]:
    """The node's own entry first, then those chained in through extra_models."""
    return [_entry(sine_adapter, source_conditioning, finetuned_weight, start_percent, end_percent)] + \
        list(extra_models or ())


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
    def execute(cls, sine_adapter, source_conditioning, finetuned_weight, start_percent, end_percent,
                extra_models=None) -> io.NodeOutput:
        with node_errors("SINE Add Fine-tuned Model"):
            entry = _entry(sine_adapter, source_conditioning, finetuned_weight, start_percent, end_percent)
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
    def execute(cls, model, positive, negative, cfg, sine_adapter, source_conditioning, finetuned_weight,
                start_percent, end_percent, extra_models=None) -> io.NodeOutput:
        with node_errors("SINE Guider"):
            entries = _entries(sine_adapter, source_conditioning, finetuned_weight, start_percent, end_percent,
                               extra_models)
            return io.NodeOutput(build_guider(model, positive, negative, cfg, entries))


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
                sine_adapter, source_conditioning, finetuned_weight, start_percent, end_percent,
                extra_models=None) -> io.NodeOutput:
        with node_errors("SINE Guided Sampler"):
            entries = _entries(sine_adapter, source_conditioning, finetuned_weight, start_percent, end_percent,
                               extra_models)
            guider = build_guider(model, positive, negative, cfg, entries)
        latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
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
