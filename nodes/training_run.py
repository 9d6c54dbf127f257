"""One SINE fine-tuning run on ComfyUI objects (docs/method.md §2, §3): the training image goes into sine_ops as
latents, the adapters train on patched clones, the input MODEL and CLIP are only read.

ComfyUI runs nodes under torch.inference_mode, whose tensors autograd refuses: everything trainable is created
inside inference_mode(False), and inputs made in inference mode are cloned or viewed first.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch

import comfy.model_management
import comfy.utils

from ..sine_ops.adapters import RowRouter
from ..sine_ops.config import FinetuneSettings, OptimConfig, PatchConfig
from ..sine_ops.sine_adapter import SineAdapter
from ..sine_ops.training import TrainingDiverged, denoising_loss, noisy_latent, train
from ..sine_ops.training_data import training_latents
from . import model_patching as mp
from .errors import InputError

log = logging.getLogger("sine")
LOG_EVERY = 50  # steps between loss lines in the console


@dataclass
class TrainingSetup:
    """What the loop needs, prepared once: data, the adapter being trained and the patched clones it runs on."""
    latents: torch.Tensor            # (N, C, h, w) training latents (N = crop bank size in patch mode)
    boxes: torch.Tensor | None       # (N, 4) grid boxes of the crops, None for a plain fine-tune
    adapter: SineAdapter
    model: object                    # training clone of the MODEL (ModelPatcher)
    clip: object                     # the CLIP that encodes the prompt (a training clone if the encoder trains)
    tokens: object
    fixed_cond: tuple | None         # the prompt's conditioning when the text encoder is frozen
    device: torch.device
    dtype: torch.dtype | None        # autocast dtype, None = fp32


def run_finetune(model, clip, vae, image, source_prompt: str, settings: FinetuneSettings,
                 patch: PatchConfig | None) -> tuple[SineAdapter, list[float]]:
    """Train a SINE adapter on `image`; returns it (on the CPU) and the loss of every step."""
    with torch.inference_mode(False):
        generator = torch.Generator().manual_seed(settings.seed)
        setup = _prepare(model, clip, vae, image, source_prompt, settings, patch, generator)
        try:
            losses = _train_loop(setup, settings, generator)
        finally:
            setup.adapter.requires_grad_(False)
            setup.model = setup.clip = None
            comfy.model_management.cleanup_models_gc()
            comfy.model_management.soft_empty_cache()
        for p in setup.adapter.parameters():
            p.data = p.data.cpu()
        return setup.adapter, losses


def _prepare(model, clip, vae, image, source_prompt, settings, patch, generator) -> TrainingSetup:
    family = mp.model_family(model)
    if patch is not None:
        if not mp.has_unet_input_conv(model):
            raise InputError("patch_config", f"patch-based fine-tuning needs a UNet with an input conv (SD1.x/"
                                             f"SD2.x/SDXL); this model is {family}. Disconnect patch_config.")
        try:
            patch = patch.resolved(family)
        except ValueError as e:
            raise InputError("patch_config", f"{e} (set in SINE Patch Resolution Config)") from None
    with torch.no_grad():
        latents, boxes = training_latents(image.clone(), lambda px: vae.encode(px), settings, family, patch,
                                          generator, on_item=_interruptible)
        latents = model.model.process_latent_in(latents.clone())
        tokens = clip.tokenize(source_prompt)
        fixed_cond = None if settings.text_encoder != "off" else _frozen_cond(clip, tokens)
    adapter = _new_adapter(model, clip, family, source_prompt, settings, patch, generator)
    router = RowRouter()  # no routing: every row is the fine-tuned model while training
    train_model = mp.patched_model(model, {0: adapter}, router)
    mp.attach_trainable_views(train_model, "diffusion_model.")
    if settings.gradient_checkpointing:
        mp.attach_gradient_checkpointing(train_model)
    train_clip = mp.patched_clip(clip, adapter)
    if adapter.text_encoder:
        mp.attach_trainable_views(train_clip.patcher)
        mp.attach_inplace_guards(train_clip.patcher)
    device = mp.device_of(model)
    return TrainingSetup(latents, boxes, adapter, train_model, train_clip, tokens, fixed_cond, device,
                         _compute_dtype(settings.precision, device))


def _interruptible(done: int, total: int) -> None:
    comfy.model_management.throw_exception_if_processing_interrupted()


def _frozen_cond(clip, tokens) -> tuple:
    cond, extra = clip.encode_from_tokens_scheduled(tokens)[0]
    return cond.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in extra.items()}


def _new_adapter(model, clip, family, source_prompt, settings: FinetuneSettings, patch, generator) -> SineAdapter:
    """Fresh adapters for the chosen layers (LoRA up = 0 / zero deltas: the fine-tuned model starts at the base)."""
    unet_layers = mp.unet_layers(model, settings.layers)
    if settings.method == "lora":
        largest = max(mp.max_lora_rank(m) for _, m in unet_layers)
        if settings.lora_rank > largest:
            raise InputError("lora_rank", f"{settings.lora_rank} is larger than every chosen layer allows (at most "
                                          f"{largest} for layers '{settings.layers}'); use 4-64")

    def group(layers, method):
        return {p: mp.new_adapter(m, method, settings.lora_rank, settings.lora_alpha, generator) for p, m in layers}

    unet = group(unet_layers, settings.method)
    text_encoder = {} if settings.text_encoder == "off" else \
        group(mp.text_encoder_layers(clip, settings.text_encoder), settings.text_encoder)
    return SineAdapter(unet=unet, text_encoder=text_encoder, family=family, source_prompt=source_prompt,
                       patch=patch, settings=asdict(settings),
                       grid_gate=torch.nn.Parameter(torch.zeros(())) if patch is not None and patch.grid_gate else None)


def _compute_dtype(precision: str, device: torch.device):
    if device.type == "cpu" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _train_loop(s: TrainingSetup, settings: FinetuneSettings, generator: torch.Generator) -> list[float]:
    ms = s.model.model.model_sampling
    pbar = comfy.utils.ProgressBar(settings.steps)
    comfy.model_management.load_models_gpu([s.model], force_full_load=True)
    transformer_options = s.model.model_options["transformer_options"]

    def loss_at_step(step: int) -> torch.Tensor:
        idx = int(torch.randint(0, s.latents.shape[0], (1,), generator=generator))
        x0 = s.latents[idx:idx + 1].to(s.device)
        cond_entry = s.fixed_cond or _encode_trained_prompt(s)
        sigma, _, x = noisy_latent(ms, x0, generator)
        options = transformer_options if s.boxes is None else \
            {**transformer_options, mp.CROP_BOXES_KEY: s.boxes[idx:idx + 1]}
        with torch.autocast(s.device.type, dtype=s.dtype, enabled=s.dtype is not None):
            denoised = s.model.model.apply_model(x, sigma, transformer_options=options,
                                                 **mp.model_kwargs(s.model, cond_entry, x, s.device))
        return denoising_loss(ms, sigma, denoised, x0)

    def on_step(step: int, loss: float) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(step, settings.steps)
        if step % LOG_EVERY == 0 or step == settings.steps:
            log.info(f"SINE Finetune: step {step}/{settings.steps} loss {loss:.5f}")

    for p in s.adapter.parameters():
        p.data = p.data.to(s.device)
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            return train(s.adapter.parameters(), loss_at_step,
                         OptimConfig(steps=settings.steps, learning_rate=settings.learning_rate), on_step)
    except TrainingDiverged as e:
        raise InputError("learning_rate", str(e)) from None


def _encode_trained_prompt(s: TrainingSetup) -> tuple:
    cond_entry = s.clip.encode_from_tokens_scheduled(s.tokens)[0]
    # encoding loads the text encoder, which may evict the UNet on a small GPU (a no-op otherwise)
    comfy.model_management.load_models_gpu([s.model], force_full_load=True)
    return cond_entry
