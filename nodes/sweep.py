"""SINE Sweep: every combination of fine-tuned weights x window ends (x edit prompts) in one batched sampling run.

Each row of the batch is one setting; every row starts from the seed's single-image noise, so a row equals the
SINE Guided Sampler run with that row's settings and seed. One UNet call per step carries all rows of a chunk:
edit, negative and fine-tuned rows, the fine-tuned weight a per-row map (sine_ops.sweep) and rows outside their
window weighted 0. The step itself is guided_prediction.predict_mixed, shared with SINE Guider.
"""
from __future__ import annotations

import copy
import functools
import inspect
import logging
import math
import uuid

import torch

import comfy.k_diffusion.sampling
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..sine_ops import sweep as sw
from ..sine_ops.guidance import check_weight_sum
from . import guided_prediction as gp
from . import memory_guard
from .errors import InputError, SineNodeError, node_errors
from .model_patching import device_of

NODE = "SINE Sweep"
log = logging.getLogger("sine")
ROW_ORDER = ("Rows are prompt-major, then fine-tuned weight, then window end: row = (prompt x n_weights + weight) x "
             "n_ends + end.")


class SweepGuider(gp.WindowedGuider):
    """A SINE Guider's model, conds and entries, sampling `rows` (one sweep row per batch row): entry 0 takes
    each row's weight and window end, the other entries (SINE Add Fine-tuned Model) keep theirs."""

    def __init__(self, sine_guider, rows: list[sw.SweepRow], positive: list | None = None):
        super().__init__(sine_guider.model_patcher)
        self.original_conds = dict(sine_guider.original_conds)  # already converted (CFGGuider.inner_set_conds)
        if positive is not None:
            self.original_conds["positive"] = positive
        self.cfg = sine_guider.cfg
        self.entries, self.rows = sine_guider.entries, rows
        self.node_name = NODE
        ms = self.model_patcher.get_model_object("model_sampling")
        windows = [[(e.start_percent, r.end_percent if i == 0 else e.end_percent) for r in rows]
                   for i, e in enumerate(self.entries)]
        self.windows = [tuple(zip(*[gp.window_sigmas(ms, s, e) for s, e in rw])) for rw in windows]
        self._weights: dict = {}   # (latent shape, device) -> per entry: per-row weight (map), None = 0 everywhere
        self._flagged: dict = {}   # (entry, window flags) -> that weight with the rows outside the window at 0

    def row_weights(self, x: torch.Tensor) -> list:
        key = (tuple(x.shape), str(x.device))
        if key not in self._weights:
            first, extras = self.entries[0], self.entries[1:]
            mask = None if first.mask is None else gp.latent_mask(first.mask, first.mask_feather, tuple(x.shape))
            weights = [sw.row_weights([r.weight for r in self.rows], mask, first.outside_weight, torch.device("cpu"))]
            weights += [gp.entry_weight(e, tuple(x.shape)) for e in extras]
            try:
                check_weight_sum(weights)
            except ValueError as e:
                raise SineNodeError(f"{NODE}: input 'finetuned_weights': {e} (a row's weight plus the guider's "
                                    "extra models' weights). Lower the largest weight in the list, or the extra "
                                    "models' weights.") from None
            # checked and tested for zero on the CPU, then moved to x's device once
            self._weights[key] = [None if not isinstance(w, torch.Tensor) and w == 0
                                  else None if isinstance(w, torch.Tensor) and not bool(w.any())
                                  else w.to(x.device) if isinstance(w, torch.Tensor) else w
                                  for w in weights]
        return self._weights[key]

    def window_edges(self):
        return [edge for starts_ends in self.windows for sigmas in starts_ends for edge in sigmas]

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        row_weights = self.row_weights(x)

        def decide(sigma: float):  # the entries guiding some row at this noise level, with the others' rows at 0
            sources, weights = [], []
            for i, w in enumerate(row_weights):
                if w is None:
                    continue
                flags = sw.window_flags(sigma, *self.windows[i])
                if any(flags):
                    key = (i, flags)
                    if key not in self._flagged:
                        self._flagged[key] = sw.flagged(w, flags)
                    sources.append(i)
                    weights.append(self._flagged[key])
            return sources, weights
        return self.predict_windowed(x, timestep, model_options, decide)


# ---- the edit prompts -------------------------------------------------------------------------------------------
def encode_prompts(clip, prompts: list[str]) -> list[list]:
    """Each prompt through the CLIP as CLIP Text Encode does it."""
    if clip is None:
        raise InputError("clip", "a prompt list needs the CLIP to encode it: connect the BASE CLIP from your "
                                 "checkpoint loader (the one the guider's positive was encoded with)")
    return [clip.encode_from_tokens_scheduled(clip.tokenize(p)) for p in prompts]


def stacked_positive(guider_positive: list, encoded: list[list], rows: list[sw.SweepRow]) -> list:
    """The guider's positive (converted conds) with its text replaced by each row's prompt: one cond entry whose
    cross-attention (and pooled output) has one row per batch row. Other keys (ControlNet, area, strength) stay the
    guider's. Prompts of different token lengths are repeated to a common length, as ComfyUI batches them
    (comfy/conds.py CONDCrossAttn.concat: repeating all tokens leaves attention unchanged)."""
    if len(guider_positive) != 1:
        raise InputError("prompts", f"the guider's positive has {len(guider_positive)} conditioning entries "
                                    "(combined or area prompts); a prompt list replaces one plain prompt. Connect "
                                    "one CLIP Text Encode (ControlNet on it is fine) to the SINE Guider.")
    for p in encoded:
        if len(p) != 1:
            raise InputError("clip", "this CLIP encodes a prompt into several conditioning entries (scheduled "
                                     "hooks); a prompt list needs a plain CLIP")
    conds = [encoded[r.prompt][0][0] for r in rows]
    length = 1
    for c in conds:
        length = math.lcm(length, c.shape[1])
    cross = torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])
    entry = dict(guider_positive[0], cross_attn=cross, uuid=uuid.uuid4())
    pooled = [encoded[r.prompt][0][1].get("pooled_output") for r in rows]
    if all(p is not None for p in pooled):
        entry["pooled_output"] = torch.cat(pooled)
    return [entry]


# ---- the sampler: the same noise for every row ------------------------------------------------------------------
def same_noise_per_row(sampler, sampler_name: str, rows: int, x_shape: tuple, sigmas: torch.Tensor, seed: int,
                       device):
    """`sampler` whose in-sampling noise is the single-image noise of the seed repeated over the rows, so each row
    gets what a 1-image run gets:
    - ancestral / SDE samplers: k-diffusion samplers build their noise sampler from x and the seed unless one is
      given (comfy/k_diffusion/sampling.py @ a125cd84, 0.3.64, and newer): default_noise_sampler, or a
      BrownianTreeNoiseSampler for the *_sde samplers (cpu=False for the *_gpu ones); built here the same way on
      one row;
    - samplers with inpaint_options "random" (ddim): the noise that re-noises the kept region of a latent noise
      mask (same_inpaint_noise).
    Other samplers are deterministic given x and returned as they are."""
    fn = getattr(sampler, "sampler_function", None)
    if rows == 1 or fn is None:
        return sampler
    out = copy.copy(sampler)
    if getattr(sampler, "inpaint_options", {}).get("random", False):
        out.sampler_function = same_inpaint_noise(fn)
    if "noise_sampler" not in inspect.signature(fn).parameters:
        return out
    kd = comfy.k_diffusion.sampling
    one = torch.zeros((1, *x_shape[1:]), dtype=torch.float32, device=device)
    if "sde" in sampler_name and sampler_name != "er_sde":
        s = sigmas.to(device)
        base = kd.BrownianTreeNoiseSampler(one, s[s > 0].min(), s.max(), seed=seed,
                                           cpu=not sampler_name.endswith("_gpu"))
    else:
        base = kd.default_noise_sampler(one, seed=seed)
    out.extra_options = {**sampler.extra_options,
                         "noise_sampler": lambda sigma, sigma_next: base(sigma, sigma_next).expand(rows, *x_shape[1:])}
    return out


def same_inpaint_noise(sampler_function):
    """KSAMPLER.sample with inpaint_options "random" (ddim) draws the noise for the kept region of a latent noise
    mask as randn(batch) from seed + 1 (comfy/samplers.py @ a125cd84, unchanged in newer releases): rows after the
    first would get other noise than a 1-image run. Each row gets the 1-image draw, made as KSAMPLER makes it."""
    @functools.wraps(sampler_function)  # keeps its signature: same_noise_per_row reads it
    def sample(model_k, *args, **kwargs):
        shape, like = model_k.noise.shape, model_k.noise
        generator = torch.manual_seed(kwargs.get("extra_args", {}).get("seed", 41) + 1)
        one = torch.randn((1, *shape[1:]), generator=generator, device="cpu").to(like.dtype).to(like.device)
        model_k.noise = one.expand(shape)
        return sampler_function(model_k, *args, **kwargs)
    return sample


def chunk_callback(model, steps: int, pbar, done_steps: int, total: int):
    """Sampler callback: previews and ONE progress bar over all chunks (chunk k's step i is done_steps + i)."""
    previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

    def callback(step, x0, x, total_steps):
        preview = previewer.decode_latent_to_preview_image("JPEG", x0[:1]) if previewer else None
        pbar.update_absolute(done_steps + step + 1, total, preview)
    return callback


def chunk_rows(model, latent_shape: tuple, rows_per_step: int, n_rows: int, requested: int) -> int:
    """Rows per chunk: `requested`, else as ComfyUI's calc_cond_batch sizes a batch (memory_required * 1.5 <
    free memory; comfy/samplers.py @ a125cd84), counting the model's weights as used when it is not loaded yet."""
    free = comfy.model_management.get_free_memory(device_of(model))
    if not any(getattr(m.model, "model", None) is model.model for m in comfy.model_management.current_loaded_models):
        free -= model.model_size()
    _, *rest = latent_shape

    def fits(rows: int) -> bool:
        return model.model.memory_required([rows * rows_per_step, *rest]) * 1.5 < free
    return sw.rows_per_chunk(n_rows, fits, requested)


def grid_images(vae, model, samples: torch.Tensor) -> torch.Tensor:
    """(N, H, W, 3) pictures of the rows: decoded by the VAE, else the latent format's RGB preview."""
    if vae is not None:
        images = vae.decode(samples)
        return images.reshape(-1, *images.shape[-3:])
    fmt = model.model.latent_format
    if fmt.latent_rgb_factors is None:
        raise InputError("vae", "this model's latent format has no RGB preview; connect the VAE to draw the grid")
    return sw.latent_rgb(samples, fmt.latent_rgb_factors, getattr(fmt, "latent_rgb_factors_bias", None))


_GUIDER_TOOLTIP = ("The GUIDER of a SINE Guider: its model, prompts, cfg, mask, start_percent and extra models apply "
                   "to every row; its finetuned_weight and end_percent are replaced by each row's values.")


class SineSweep(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SINE_Sweep",
            display_name="SINE Sweep",
            category="SINE",
            description="Samples every combination of fine-tuned weights x window ends (x edit prompts) of a SINE "
                        "Guider in ONE batched run and returns the latents and a labelled grid. Each row equals "
                        "SINE Guided Sampler with that row's finetuned_weight / end_percent and the same seed. "
                        + ROW_ORDER,
            inputs=[
                io.Guider.Input("guider", tooltip=_GUIDER_TOOLTIP),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Noise seed: every row starts from this seed's single-image noise (the "
                                     "noise SINE Guided Sampler and KSampler use for it)."),
                io.Int.Input("steps", default=50, min=1, max=10000, tooltip="Sampling steps (paper: DDIM 100)."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="ddim",
                               tooltip="Sampler (paper: DDIM). Ancestral and SDE samplers get the same noise on "
                                       "every row."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="ddim_uniform",
                               tooltip="Scheduler (paper: DDIM uniform)."),
                io.Latent.Input("latent_image", tooltip="One latent (batch 1): Empty Latent Image, or an encoded "
                                                        "image for img2img."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="1.0 = from pure noise (SINE); lower keeps more of latent_image."),
                io.String.Input("finetuned_weights", default="0.2, 0.3, 0.4, 0.5",
                                tooltip="Fine-tuned weights to try, comma-separated, each in [0, 1] (paper: 0.3). "
                                        "Higher keeps more of the source image."),
                io.String.Input("end_percents", default="0.5, 0.6, 0.7",
                                tooltip="Window ends to try, comma-separated (noise-level percent; 0.6 = the "
                                        "paper's K 400, 0.5 = K 500). Later ends keep more source structure."),
                io.String.Input("prompts", default="", multiline=True, optional=True,
                                tooltip="Optional: edit prompts, one per line, encoded with `clip`; they replace "
                                        "the guider's positive prompt (its ControlNet stays). Empty: the guider's "
                                        "prompt."),
                io.Clip.Input("clip", optional=True, tooltip="The BASE CLIP, to encode the prompts list."),
                io.Vae.Input("vae", optional=True,
                             tooltip="Decodes the rows for the grid. Unconnected: the grid shows ComfyUI's rough "
                                     "latent colour preview."),
                io.Int.Input("rows_per_chunk", default=0, min=0, max=sw.MAX_ROWS, optional=True,
                             tooltip="Rows sampled together. 0 = as many as free memory allows (as ComfyUI sizes "
                                     "its batches); lower it if the GPU runs out of memory."),
            ],
            outputs=[
                io.Latent.Output(display_name="latents", tooltip="One latent per row. " + ROW_ORDER),
                io.Image.Output(display_name="grid", tooltip="The rows as a labelled grid: columns = window ends "
                                                             "(K), rows = weights (and prompts)."),
                io.String.Output(display_name="settings", tooltip="One line per row: the SINE Guided Sampler "
                                                                  "inputs that reproduce it."),
            ],
        )

    @classmethod
    def execute(cls, guider, seed, steps, sampler_name, scheduler, latent_image, denoise, finetuned_weights,
                end_percents, prompts="", clip=None, vae=None, rows_per_chunk=0) -> io.NodeOutput:
        with node_errors(NODE):
            entries = getattr(guider, "entries", None)
            if not isinstance(entries, list) or not entries or not hasattr(guider, "original_conds"):
                raise InputError("guider", f"expected the GUIDER of a SINE Guider node, got a "
                                           f"{type(guider).__name__}; connect SINE Guider's output")
            weights = _parsed("finetuned_weights", finetuned_weights, "weights")
            ends = _parsed("end_percents", end_percents, "window ends")
            start = entries[0].start_percent
            if min(ends) < start:
                raise InputError("end_percents", f"{min(ends):g} is before the guider's start_percent {start:g}; "
                                                 "that window would be empty")
            texts = sw.parse_prompts(prompts)
            rows = sw.sweep_rows(len(texts), weights, ends)
            try:
                sw.check_size(len(rows))
            except ValueError as e:
                raise InputError("finetuned_weights", str(e)) from None
            encoded = encode_prompts(clip, texts) if texts else None
            model = guider.model_patcher
            latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
            if latent.shape[0] != 1:
                raise InputError("latent_image", f"has a batch of {latent.shape[0]}; a sweep makes its own batch "
                                                 "(one row per setting) from ONE latent. Use batch_size 1.")
            rows_per_step = 2 + len(entries)  # edit, negative, one per fine-tuned model
            memory_guard.check_sampling(model, tuple(latent.shape), rows_per_step, "latent_image")
            size = chunk_rows(model, tuple(latent.shape), rows_per_step, len(rows), rows_per_chunk)
            positive = guider.original_conds.get("positive")
            if encoded is not None:
                stacked_positive(positive, encoded, rows[:1])  # refuses unusable prompts before sampling

        noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
        sigmas = comfy.samplers.KSampler(model, steps=steps, device=model.load_device, sampler=sampler_name,
                                         scheduler=scheduler, denoise=denoise, model_options=model.model_options).sigmas
        plan = sw.chunks(len(rows), size)
        n_steps = len(sigmas) - 1
        pbar = comfy.utils.ProgressBar(max(1, n_steps * len(plan)))
        out = []
        for k, chunk in enumerate(plan):
            comfy.model_management.throw_exception_if_processing_interrupted()
            if len(plan) > 1:
                log.info(f"{NODE}: chunk {k + 1}/{len(plan)}: rows {chunk.start + 1}-{chunk.stop} of {len(rows)}")
            part = [rows[i] for i in chunk]
            chunk_positive = None if encoded is None else stacked_positive(positive, encoded, part)
            sampler = same_noise_per_row(comfy.samplers.sampler_object(sampler_name), sampler_name, len(part),
                                         tuple(latent.shape), sigmas, seed, model.load_device)
            samples = SweepGuider(guider, part, chunk_positive).sample(
                noise.repeat(len(part), *[1] * (noise.ndim - 1)), latent.repeat(len(part), *[1] * (latent.ndim - 1)),
                sampler, sigmas, denoise_mask=latent_image.get("noise_mask"),
                callback=chunk_callback(model, n_steps, pbar, k * n_steps, n_steps * len(plan)),
                disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
            out.append(samples.to(comfy.model_management.intermediate_device()))
        samples = torch.cat(out)
        result = {k: v for k, v in latent_image.items() if k != "batch_index"}
        result["samples"] = samples
        with node_errors(NODE):
            images = grid_images(vae, model, samples)
        row_labels, col_labels, cells = sw.grid_layout(rows, texts)
        grid = sw.label_grid(images, row_labels, col_labels, cells)
        settings = "\n".join(f"row {i}: {sw.row_settings(r, texts)}" for i, r in enumerate(rows))
        return io.NodeOutput(result, grid, settings)


def _parsed(input_name: str, text: str, what: str) -> list[float]:
    try:
        return sw.parse_values(text, what)
    except ValueError as e:
        raise InputError(input_name, str(e)) from None
