"""SINE Finetune: stage one of SINE on the user's loaded checkpoint (docs/method.md §2, §3)."""
from __future__ import annotations

import torch

from comfy_api.latest import io

from ..sine_ops.config import (LAYER_SETS, METHODS, PRECISIONS, PRESETS, RESIZE_MODES, TEXT_ENCODER_MODES,
                               FinetuneSettings, resolve_settings, sizes_text)
from .previews import loss_curve_image
from . import comfy_compat as compat
from . import model_patching as mp
from .adapter_glue import adapter_outputs, train_or_reuse
from .errors import InputError, node_errors
from .types import AdapterType, PatchConfigType

NODE = "SINE Finetune"


def validate(settings: FinetuneSettings, image: torch.Tensor, source_prompt: str) -> None:
    if image.ndim != 4 or image.shape[0] == 0:
        raise InputError("image", "the image batch is empty; connect a Load Image node")
    if image.shape[0] > 1:
        raise InputError("image", f"got a batch of {image.shape[0]} images; SINE fine-tunes on ONE image. Pick "
                                  "one with an 'ImageFromBatch' node")
    if not torch.isfinite(image).all():
        raise InputError("image", "the image contains NaN/Inf values; check the node that produced it")
    h, w = image.shape[1:3]
    if min(h, w) < 64:
        raise InputError("image", f"the image is {w}x{h}; it must be at least 64 px on each side")
    if max(h, w) > 8192:
        raise InputError("image", f"the image is {w}x{h}; downscale it below 8192 px first")
    if not source_prompt.strip():
        raise InputError("source_prompt", "empty; use the SINE convention 'photo of a sks <class>'")
    if settings.steps < 1:
        raise InputError("steps", "must be at least 1")
    if not 0 < settings.learning_rate <= 1e-2:
        raise InputError("learning_rate", f"{settings.learning_rate:g} is out of range (0, 0.01]; LoRA: 1e-4, "
                                          "full: 1e-6")
    if settings.resolution and settings.resolution % 64:
        raise InputError("resolution", f"{settings.resolution} is not a multiple of 64")
    if settings.clip_grad_norm < 0:
        raise InputError("clip_grad_norm", "must be 0 (off) or positive")


def validated_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(1, H, W) fp32 in [0, 1], or None."""
    if mask is None:
        return None
    m = mask.reshape(-1, *mask.shape[-2:]) if mask.ndim >= 2 else mask
    if m.ndim != 3 or m.shape[0] != 1:
        raise InputError("mask", f"expected one mask (H, W), got shape {tuple(mask.shape)}; pick one with a "
                                 "mask batch node")
    if not torch.isfinite(m).all():
        raise InputError("mask", "the mask contains NaN/Inf values; check the node that produced it")
    m = m.float().clamp(0, 1)
    if not m.any():
        raise InputError("mask", "the mask is empty (all 0): nothing would be trained. White (1) marks what to "
                                 "learn; invert it (InvertMask) if it marks the background")
    return m


class SineFinetune(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        d = FinetuneSettings()
        return io.Schema(
            node_id="SINE_Finetune",
            display_name="SINE Finetune",
            category="SINE",
            description="Stage one of SINE: fine-tunes (overfits) your loaded checkpoint on one image so the SINE "
                        "Guider can edit it with words while keeping its identity. Your MODEL and CLIP are not "
                        "modified; results are cached in memory and on disk (models/sine_cache).",
            inputs=[
                io.Model.Input("model", tooltip="MODEL from your checkpoint loader (SD1.x, SD2.x or SDXL)."),
                io.Clip.Input("clip", tooltip="CLIP from the same checkpoint loader: it encodes the source prompt "
                                              "(and is fine-tuned when text_encoder is not 'off')."),
                io.Vae.Input("vae", tooltip="VAE from the same checkpoint loader, to encode the training image."),
                io.Image.Input("image", tooltip="The ONE image to edit (alpha is ignored; at least 64 px)."),
                io.String.Input("source_prompt", default="photo of a sks dog", multiline=False,
                                tooltip="Training caption, SINE's convention 'photo of a sks <class>': 'sks' is a "
                                        "rare identifier the model binds to THIS image, the class word (dog, "
                                        "woman, castle...) says what it is. Paintings: 'painting of a sks <class>'."),
                io.Combo.Input("preset", options=list(PRESETS), default="custom",
                               tooltip="custom: use the inputs below (their defaults are lora_default). "
                                       "lora_default: LoRA rank 16 on attention, lr 1e-4, 400 steps, text encoder "
                                       "off (3.2 M trainable parameters on SD1.5). paper: full UNet + full text "
                                       "encoder, AdamW 1e-6, 800 steps (10,000 in patch mode), fp32, gradient "
                                       "checkpointing, no gradient clipping - as the official code; for SD1.5 its "
                                       "training state alone (fp32 deltas, gradients, AdamW) is estimated at ~15 GB "
                                       "from the parameter counts (not measured). A preset overrides the inputs it "
                                       "names."),
                io.Int.Input("steps", default=d.steps, min=1, max=20000,
                             tooltip="Optimisation steps. The paper overfits: 800 (full, lr 1e-6); LoRA at 1e-4 "
                                     "gets there in 300-500. Patch-based training wants more (paper: 10,000)."),
                io.Float.Input("learning_rate", default=d.learning_rate, min=1e-8, max=1e-2, step=1e-6,
                               tooltip="AdamW learning rate (constant). LoRA: 1e-4; full fine-tune: 1e-6 (paper). "
                                       "Too high: the loss explodes and the node stops with an error."),
                io.Int.Input("seed", default=d.seed, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed for noise, timesteps, crops and adapter init: same seed, same result."),
                io.Combo.Input("method", options=list(METHODS), default=d.method,
                               tooltip="lora: small low-rank adapters (fast, small files). full: dense deltas "
                                       "for every weight and bias of the chosen layers (paper with layers=all; "
                                       "a second copy of those layers in memory)."),
                io.Int.Input("lora_rank", default=d.lora_rank, min=1, max=512,
                             tooltip="LoRA rank: higher captures more detail, costs more memory (4-64). Layers "
                                     "smaller than the rank (e.g. the 4-channel output conv) get their full rank."),
                io.Float.Input("lora_alpha", default=d.lora_alpha, min=0.01, max=1024.0, step=0.5,
                               tooltip="LoRA alpha; the update is scaled by alpha/rank. alpha = rank is neutral."),
                io.Combo.Input("layers", options=list(LAYER_SETS), default=d.layers,
                               tooltip="UNet layers that are trained, with either method: attention (q/k/v/out "
                                       "of self and cross attention), attention+ff (also feed-forward and "
                                       "projections), all (every Linear/Conv2d: the paper's full fine-tune)."),
                io.Combo.Input("text_encoder", options=list(TEXT_ENCODER_MODES), default=d.text_encoder,
                               tooltip="Also fine-tune the text encoder: off, lora (attention + MLP), full "
                                       "(paper). The CLIP output and source conditioning then use it."),
                io.Combo.Input("precision", options=list(PRECISIONS), default=d.precision,
                               tooltip="Compute precision on GPU (auto: bf16 where supported, else fp16). CPU "
                                       "always trains in fp32. Adapter weights are kept in fp32."),
                io.Boolean.Input("gradient_checkpointing", default=d.gradient_checkpointing,
                                 tooltip="Recompute UNet block activations in the backward pass: much less memory, "
                                         "about 30% slower."),
                io.Combo.Input("resize", options=list(RESIZE_MODES), default=d.resize,
                               tooltip="stretch: resize to the training square as the paper (aspect not kept). "
                                       "keep_aspect: same pixel count, the image's own aspect ratio."),
                io.Int.Input("resolution", default=d.resolution, min=0, max=2048, step=64,
                             tooltip=f"Training side in px; 0 = the family's native size ({sizes_text('native')}). "
                                     "Ignored in patch mode (Patch Resolution Config sets it)."),
                PatchConfigType.Input("patch_config", optional=True,
                                      tooltip="From SINE Patch Resolution Config: patch-based fine-tuning, so the "
                                              "edit can be rendered at other sizes and aspect ratios."),
                io.Boolean.Input("disk_cache", default=True, optional=True,
                                 tooltip="Keep trained adapters in models/sine_cache so unchanged inputs reuse "
                                         "them after a restart (size limit: README, Troubleshooting). Off: "
                                         "neither read nor written (unfinished runs are kept in memory for this "
                                         "session)."),
                AdapterType.Input("continue_from", optional=True,
                                  tooltip="A SINE adapter to continue training (from SINE Finetune or Load SINE "
                                          "Adapter), with its optimizer state: steps counts in total, so an "
                                          "adapter of 200 steps with steps=400 trains 200 more, and gives what "
                                          "400 steps at once give with the same settings and seed. Set the "
                                          "inputs that decide what its weights mean (method, lora_rank, "
                                          "lora_alpha, layers, text_encoder, patch layout) as it was trained: "
                                          "other values are refused, naming them. Not needed to resume your own runs: with unchanged "
                                          "inputs SINE Finetune finds a cached or cancelled run by itself."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional loss weight: white (1) = learn this area, black (0) = ignore it "
                                      "(train on the subject, not the background). Resized to the latent like "
                                      "ComfyUI resizes masks (bilinear), cut with the crops in patch mode. An "
                                      "all-white mask trains exactly as no mask. A Load Image mask is 1 where the "
                                      "image is transparent: invert it if the subject is opaque."),
                io.Int.Input("save_every", default=0, min=0, max=20000, optional=True,
                             tooltip="Keep the training state every N steps (0 = off), so a crash loses at most "
                                     "N steps; a run with the same inputs continues from it. Each run keeps ONE "
                                     "resume state in the disk cache, replaced at every save (disk_cache off: in "
                                     "memory, for this session). A cancelled or failed run always keeps its last "
                                     "completed step the same way (the console says where)."),
                io.Float.Input("clip_grad_norm", default=d.clip_grad_norm, min=0.0, max=100.0, step=0.1,
                               optional=True,
                               tooltip="Clip the gradient norm to this value each step; 0 = off (the official "
                                       "code has no clipping; the paper preset turns it off). 1.0 keeps a bad "
                                       "first step of a high learning-rate LoRA from wrecking the model."),
                io.Boolean.Input("compile", default=False, optional=True,
                                 tooltip="Compile the UNet's training step with torch.compile: on a GPU the "
                                         "step launches far fewer kernels, once the first step has compiled it "
                                         "(a minute or more; cancel waits for it). Needs torch.compile to work "
                                         "here (Triton on an NVIDIA/AMD GPU, a C++ compiler on the CPU); if it "
                                         "cannot, the node stops and says so. The result equals an uncompiled "
                                         "run's within float rounding, so the cache treats them as one."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The fine-tuned model (a clone; usable in KSampler)."),
                io.Clip.Output(display_name="clip", tooltip="Fine-tuned CLIP when the text encoder was trained, "
                                                            "else the input CLIP."),
                io.Conditioning.Output(display_name="source_conditioning",
                                       tooltip="The training caption through that CLIP: SINE Guider's "
                                               "source_conditioning."),
                AdapterType.Output(display_name="sine_adapter"),
                io.Image.Output(display_name="loss_curve"),
                io.LossMap.Output(display_name="loss",
                                  tooltip="The loss of every training step as ComfyUI's own training nodes give "
                                          "it ({'loss': [...]}): connect to the core Loss Graph node. That node "
                                          "needs at least two different values: a 1-step run's single point makes "
                                          "it fail (ZeroDivisionError in core); loss_curve draws any run."),
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, source_prompt, preset, steps, learning_rate, seed, method, lora_rank,
                lora_alpha, layers, text_encoder, precision, gradient_checkpointing, resize, resolution,
                patch_config=None, disk_cache=True, continue_from=None, mask=None, save_every=0,
                clip_grad_norm=FinetuneSettings.clip_grad_norm, compile=False) -> io.NodeOutput:
        with node_errors(NODE):
            settings = resolve_settings(preset, patch_mode=patch_config is not None, steps=steps,
                                        learning_rate=learning_rate, seed=seed, method=method, lora_rank=lora_rank,
                                        lora_alpha=lora_alpha, layers=layers, text_encoder=text_encoder,
                                        precision=precision, gradient_checkpointing=gradient_checkpointing,
                                        resize=resize, resolution=resolution, clip_grad_norm=clip_grad_norm)
            validate(settings, image, source_prompt)
            mask = validated_mask(mask)
            refuse_quantized(model, clip, settings)
            adapter = train_or_reuse(model, clip, vae, image, source_prompt, settings, patch_config, mask,
                                     continue_from, save_every, use_disk=disk_cache, compile=compile)
            ft_model, ft_clip, cond = adapter_outputs(model, clip, adapter)
        return io.NodeOutput(ft_model, ft_clip, cond, adapter, loss_curve_image(adapter.losses),
                             {"loss": list(adapter.losses)})


def refuse_quantized(model, clip, settings: FinetuneSettings) -> None:
    """Before anything reads the weights (the cache key digests them): training backpropagates through the base
    model, which quantized (QuantizedTensor) weights do not support in this pack."""
    compat.refuse_quantized_training(mp.unet_layers(model, "all"), "model")
    if settings.text_encoder != "off":
        compat.refuse_quantized_training(mp.text_encoder_layers(clip, "full"), "clip")
