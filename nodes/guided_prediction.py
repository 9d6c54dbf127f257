"""The SINE prediction step shared by SINE Guider and SINE Sweep (glue: ComfyUI's sampler API around sine_ops' mix).

One batched `calc_cond_batch` per step over [edit prompt, negative, the active fine-tuned sources], the conditional
mix, then ComfyUI's own pre-CFG functions and `cfg_function`: the guider mixes one weight per entry, the sweep one
weight per batch row (sine_ops.guidance.mix_conditional_maps takes both). Also the two facts both nodes read the
same way: an entry's window in sigmas and its (mask) weight over a latent. Both guiders derive from WindowedGuider,
which takes each step's window decisions on the host without reading the step's sigma back from the device.
"""
from __future__ import annotations

import functools
import logging
from typing import Callable, Iterable, Sequence

import torch

import comfy.samplers
import comfy.utils

from ..sine_ops.guidance import ScheduledSigma, Weight, feather_mask, mix_conditional_maps, weight_map
from . import model_patching as mp

log = logging.getLogger("sine")

# ComfyUI's samplers that call the model off their schedule's steps (their own step sizes, look-ahead stages):
# tests/comfyui/test_guidance_schedule.py finds exactly these among all that ComfyUI lists. Their runs read each
# step's sigma from the start; any other sampler that does is caught after its run and sampled again.
OFF_SCHEDULE_SAMPLER_NAMES = ("dpm_fast", "dpm_adaptive", "heunpp2")

# Samplers (sampler_key) seen calling the model off their schedule's steps in this process: from then on their
# runs read every step's sigma too, instead of sampling twice again.
OFF_SCHEDULE_SAMPLERS: set[str] = set()


@functools.cache
def known_off_schedule() -> frozenset[str]:
    """sampler_key of the OFF_SCHEDULE_SAMPLER_NAMES this ComfyUI has."""
    return frozenset(sampler_key(comfy.samplers.sampler_object(name)) for name in OFF_SCHEDULE_SAMPLER_NAMES
                     if name in comfy.samplers.KSampler.SAMPLERS)


class WindowedGuider(comfy.samplers.CFGGuider):
    """A CFGGuider whose batch rows depend on the step's noise level (SINE Guider, SINE Sweep's guider).

    The level decides the batch's shape, so the host must know it; reading the device's sigma at every step is a
    host sync that drains the GPU queue. Each run instead holds the schedule on the host (sine_ops.guidance.
    ScheduledSigma), follows the sampler's steps through its progress callback, and reads no sigma: in the step
    that a window edge crosses, the device picks between the two sides' mixes (predict_windowed). A sampler that
    calls the model off its schedule is caught after the run (one read), and the run is sampled again reading
    every sigma: the result is the one a read per step gives."""

    node_name = "SINE Guider"
    schedule: ScheduledSigma | None = None  # set during a run that follows its sampler's steps

    def window_edges(self) -> Iterable[float]:
        """Every window's start and end sigma for this run."""
        raise NotImplementedError

    def predict_windowed(self, x, timestep, model_options: dict,
                         decide: Callable[[float], tuple[Sequence[int], Sequence[Weight]]]) -> torch.Tensor:
        """predict_mixed with the sources and weights that `decide(sigma)` gives at this call's noise level.

        Without a schedule (a call outside inner_sample, a sampler that calls off its schedule) the level is read
        from the device. Otherwise the schedule answers a sigma that decides alike without a read; in the one step
        per window edge that the edge crosses it answers one per side, and then the batch holds every source
        either side needs, each side's mix is made, and the device picks the one of the call's side. That step
        computes the rows of one side more than it needs, instead of draining the GPU queue."""
        if self.schedule is None:
            deciding = (float(timestep[0]),)
        else:
            deciding = self.schedule.decision_sigmas(timestep)
        decisions = [decide(sigma) for sigma in deciding]
        union = sorted({i for sources, _ in decisions for i in sources})  # entry order, as each side's own

        def mix_each_side(edit, finetuned):
            output = dict(zip(union, finetuned))
            mixes = [mix_conditional_maps(edit, [output[i] for i in sources], weights)
                     for sources, weights in decisions]
            return mixes[0] if len(mixes) == 1 else self.schedule.pick(timestep, mixes)
        return predict_mixed(self, x, timestep, model_options, union, mix_each_side)

    # CFGGuider.inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback, disable_pbar,
    # seed[, latent_shapes]): comfy/samplers.py @ a125cd84 (0.3.64) and @ 311c0140 (newest) alike up to `callback`
    def inner_sample(self, noise, latent_image, device, sampler, sigmas, denoise_mask, callback, *args, **kwargs):
        key = sampler_key(sampler)
        if key not in OFF_SCHEDULE_SAMPLERS and key not in known_off_schedule():
            conds = dict(self.conds)  # process_conds replaces these lists: sampling again starts from them
            schedule = self.schedule = ScheduledSigma(sigmas.tolist(), self.window_edges())  # one read, before
            try:
                samples = super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask,
                                               _reporting_steps(schedule, callback), *args, **kwargs)
            finally:
                self.schedule = None
            if not schedule.off_schedule():
                return samples
            OFF_SCHEDULE_SAMPLERS.add(key)
            log.info(f"{self.node_name}: sampler {key} calls the model off its schedule's steps; sampling again, "
                     "reading each step's noise level (from now on for this sampler).")
            self.conds = conds
        return super().inner_sample(noise, latent_image, device, sampler, sigmas, denoise_mask, callback,
                                    *args, **kwargs)


def sampler_key(sampler) -> str:
    """A name for a ComfyUI sampler object: its sampler function's (KSAMPLER), else its class's."""
    what = getattr(sampler, "sampler_function", None) or type(sampler)
    return f"{getattr(what, '__module__', '?')}.{getattr(what, '__qualname__', repr(what))}"


def _reporting_steps(schedule: ScheduledSigma, callback):
    """The sampler callback, also telling `schedule` which step just finished."""
    def report(step, denoised, x, total_steps):
        schedule.step_done(step)
        if callback is not None:
            return callback(step, denoised, x, total_steps)
    return report


def window_sigmas(model_sampling, start_percent: float, end_percent: float) -> tuple[float, float]:
    """(start_sigma, end_sigma) of a window under this model's sampling, as ComfyUI's own timestep ranges
    (ControlNet, hooks) turn percents into sigmas."""
    return float(model_sampling.percent_to_sigma(start_percent)), float(model_sampling.percent_to_sigma(end_percent))


def latent_mask(mask: torch.Tensor, feather: int, shape: tuple) -> torch.Tensor:
    """A MASK over a latent of `shape`: resized as ComfyUI resizes a latent noise mask (comfy.utils.reshape_mask:
    bilinear to the latent size, batch repeated to the latent's), then feathered by `feather` latent pixels.
    (B, 1, h, w), made on the CPU (where the mask is), so checking it reads nothing back from a GPU."""
    resized = comfy.utils.reshape_mask(mask.cpu(), (shape[0], 1, *shape[2:])).clamp(0, 1)
    return feather_mask(resized, feather)


def entry_weight(entry, shape: tuple) -> Weight:
    """A guidance entry's weight for a latent of `shape`: its scalar weight, or with a mask a (B, 1, ...) map over
    the latent (`weight` inside, `outside_weight` outside), on the CPU."""
    if entry.mask is None:
        return entry.weight
    return weight_map(latent_mask(entry.mask, entry.mask_feather, shape), entry.weight, entry.outside_weight)


def with_cond_owner(model_options: dict, owner: list[int]) -> dict:
    """model_options for this step only, whose transformer_options say which adapter owns each cond index."""
    return {**model_options, "transformer_options": {**model_options.get("transformer_options", {}),
                                                     mp.COND_OWNER_KEY: owner}}


def predict_mixed(guider, x, timestep, model_options: dict, sources: Sequence[int],
                  mix: Callable[[torch.Tensor, list[torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    """CFG prediction of a CFGGuider whose conds hold "positive", "negative" and "sine_source_<i>": one batched
    forward over the edit prompt, the negative (skipped at cfg 1 as ComfyUI does) and the sources `sources` (entry
    ids, in the order `mix` receives their outputs), then cond = mix(edit output, source outputs) and ComfyUI's
    pre-CFG functions and cfg_function as its own sampling_function applies them."""
    model = guider.inner_model
    cfg1 = abs(guider.cfg - 1.0) < 1e-9 and not model_options.get("disable_cfg1_optimization", False)
    positive, negative = guider.conds.get("positive"), guider.conds.get("negative")
    uncond = None if cfg1 else negative
    conds = [positive, uncond] + [guider.conds[f"sine_source_{i}"] for i in sources]
    model_options = with_cond_owner(model_options, [-1, -1] + list(sources))
    if "sampler_calc_cond_batch_function" in model_options:
        out = model_options["sampler_calc_cond_batch_function"](
            {"conds": conds, "input": x, "sigma": timestep, "model": model, "model_options": model_options})
    else:
        out = comfy.samplers.calc_cond_batch(model, conds, x, timestep, model_options)
    out = [mix(out[0], [out[2 + k] for k in range(len(sources))]), out[1]]
    for fn in model_options.get("sampler_pre_cfg_function", []):
        out = fn({"conds": [positive, uncond], "conds_out": out, "cond_scale": guider.cfg, "timestep": timestep,
                  "input": x, "sigma": timestep, "model": model, "model_options": model_options})
    return comfy.samplers.cfg_function(model, out[0], out[1], guider.cfg, x, timestep, model_options=model_options,
                                       cond=positive, uncond=uncond)
