"""SINE Finetune: stage one of SINE on the user's loaded checkpoint (SINE_METHOD.md §2, §3)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..sine_ops.adapter_set import AdapterFileError, SineAdapter
from ..sine_ops.adapters import RowRouter
from ..sine_ops.config import PatchConfig
from ..sine_ops.positional_grid import box_to_pixels, sample_crop_box
from ..sine_ops.training import OptimConfig, TrainingDiverged, denoising_loss, noisy_latent, train
from . import glue
from .files import load_adapter_file, save_adapter_file
from .types import AdapterType, PatchConfigType

NODE = "SINE Finetune"
PRESETS = ("custom", "lora_default", "paper")
METHODS = ("lora", "full")
TEXT_ENCODER_MODES = ("off", "lora", "full")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
RESIZE_MODES = ("stretch", "keep_aspect")


@dataclass(frozen=True)
class FinetuneSettings:
    """Every choice that changes the trained result (it is also the disk-cache key, with the inputs)."""
    steps: int = 400                    # LoRA at 1e-4 overfits one image in a few hundred steps
    learning_rate: float = 1e-4         # LoRA scale; the paper's full fine-tune uses 1e-6
    seed: int = 0
    method: str = "lora"                # "lora" or "full" (dense deltas of every weight and bias of the layers)
    lora_rank: int = 16
    lora_alpha: float = 16.0
    layers: str = "attention"           # glue.UNET_LAYER_SETS key: which UNet layers train (both methods)
    text_encoder: str = "off"           # "off", "lora" or "full"; SINE trains it fully
    precision: str = "auto"             # compute dtype on GPU; always fp32 on CPU
    gradient_checkpointing: bool = False
    resize: str = "stretch"             # paper: stretch to the training square; keep_aspect keeps the ratio
    resolution: int = 0                 # training side in px; 0 = the family's native size


PRESET_VALUES = {
    "lora_default": dict(steps=400, learning_rate=1e-4, method="lora", lora_rank=16, lora_alpha=16.0,
                         layers="attention", text_encoder="off"),
    "paper": dict(steps=800, learning_rate=1e-6, method="full", layers="all", text_encoder="full",
                  precision="fp32", gradient_checkpointing=True),
}


def _err(input_name: str, msg: str) -> glue.SineNodeError:
    return glue.SineNodeError(f"{NODE}: input '{input_name}': {msg}")


def validate(settings: FinetuneSettings, image: torch.Tensor, source_prompt: str) -> None:
    if image.ndim != 4 or image.shape[0] == 0:
        raise _err("image", "the image batch is empty; connect a Load Image node")
    if image.shape[0] > 1:
        raise _err("image", f"got a batch of {image.shape[0]} images; SINE fine-tunes on ONE image. Pick one with "
                            "an 'ImageFromBatch' node")
    if not torch.isfinite(image).all():
        raise _err("image", "the image contains NaN/Inf values; check the node that produced it")
    h, w = image.shape[1:3]
    if min(h, w) < 64:
        raise _err("image", f"the image is {w}x{h}; it must be at least 64 px on each side")
    if max(h, w) > 8192:
        raise _err("image", f"the image is {w}x{h}; downscale it below 8192 px first")
    if not source_prompt.strip():
        raise _err("source_prompt", "empty; use the SINE convention 'photo of a sks <class>'")
    if settings.steps < 1:
        raise _err("steps", "must be at least 1")
    if not 0 < settings.learning_rate <= 1e-2:
        raise _err("learning_rate", f"{settings.learning_rate:g} is out of range (0, 0.01]; LoRA: 1e-4, full: 1e-6")
    if settings.resolution and settings.resolution % 64:
        raise _err("resolution", f"{settings.resolution} is not a multiple of 64")


def resolve_settings(preset: str, **inputs) -> FinetuneSettings:
    s = FinetuneSettings(**inputs)
    return replace(s, **PRESET_VALUES[preset]) if preset in PRESET_VALUES else s


def as_rgb(image: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) -> (B, H, W, 3): alpha dropped (as the paper's RGB conversion), grayscale repeated."""
    return image[..., :3] if image.shape[-1] >= 3 else image[..., :1].expand(*image.shape[:-1], 3)


def _resize(pixels: torch.Tensor, size_hw: tuple[int, int]) -> torch.Tensor:
    """(1, H, W, 3) -> (1, h, w, 3) bicubic (PIL bicubic in the original code), clamped to [0, 1]."""
    x = pixels.movedim(-1, 1)
    x = F.interpolate(x, size=size_hw, mode="bicubic", align_corners=False, antialias=True)
    return x.clamp(0, 1).movedim(1, -1)


def _train_size(settings: FinetuneSettings, family: str, h: int, w: int) -> tuple[int, int]:
    side = settings.resolution or {"sd2": 768, "sdxl": 1024}.get(family, 512)
    if settings.resize == "stretch":
        return side, side
    scale = side / (h * w) ** 0.5  # same pixel count as the square, the source's aspect ratio, 64-px steps
    return max(64, round(h * scale / 64) * 64), max(64, round(w * scale / 64) * 64)


def _encode(vae, pixels: torch.Tensor) -> torch.Tensor:
    return vae.encode(pixels).float().cpu()


def _training_data(vae, image, settings, patch: PatchConfig | None, family, generator):
    """(latents (N, C, h, w), boxes (N, 4) or None).

    Patch mode encodes a bank of `patch.crop_bank` random crops ONCE and samples from it at every step (a VAE
    encode per step would add its cost to every training step; see benchmarks/bench_finetune.py).
    """
    if patch is None:
        size = _train_size(settings, family, *image.shape[1:3])
        return _encode(vae, _resize(image, size)), None
    canvas = _resize(image, (patch.working_size, patch.working_size))
    boxes, latents = [], []
    for _ in range(patch.crop_bank):
        box = sample_crop_box(generator, patch.grid_size, patch.min_crop_frac, patch.max_crop_frac,
                              1.0 - patch.whole_image_prob)
        left, top, right, bottom = box_to_pixels(box, patch.cell_px)
        crop = _resize(canvas[:, top:bottom, left:right], (patch.train_resolution, patch.train_resolution))
        latents.append(_encode(vae, crop))
        boxes.append(box)
    return torch.cat(latents), torch.tensor(boxes, dtype=torch.long)


def _compute_dtype(precision: str, device: torch.device):
    if device.type == "cpu" or precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if comfy.model_management.should_use_bf16(device) else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def _checkpointed(module):
    """forward of a UNet block recomputed in the backward pass (gradient checkpointing) instead of stored."""
    cls_forward = type(module).forward

    def forward(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(cls_forward, module, *args, use_reentrant=False, **kwargs)
    return forward


def model_kwargs(model, cond_entry, x: torch.Tensor, device) -> dict:
    """The keyword inputs ComfyUI's apply_model takes for one CONDITIONING entry (c_crossattn, SDXL's y, ...)."""
    cond, extra = cond_entry
    conds = model.model.extra_conds(cross_attn=cond, pooled_output=extra.get("pooled_output"), noise=x,
                                    device=device, width=x.shape[-1] * 8, height=x.shape[-2] * 8)
    return {k: v.process_cond(batch_size=x.shape[0], device=device, area=None).cond.to(device)
            for k, v in conds.items()}


def run_finetune(model, clip, vae, image, source_prompt: str, settings: FinetuneSettings,
                 patch: PatchConfig | None) -> tuple[SineAdapter, list[float]]:
    """Train a SINE adapter; the input MODEL/CLIP are only read (training runs on patched clones).

    ComfyUI runs nodes under torch.inference_mode, whose tensors autograd refuses: everything trainable is
    created inside inference_mode(False), and inputs made in inference mode are cloned or viewed first.
    """
    with torch.inference_mode(False):
        return _run_finetune(model, clip, vae, image, source_prompt, settings, patch)


def _run_finetune(model, clip, vae, image, source_prompt, settings, patch):
    family = glue.model_family(model)
    if patch is not None:
        if not glue.has_unet_input_conv(model):
            raise _err("patch_config", f"patch-based fine-tuning needs a UNet with an input conv (SD1.x/SD2.x/"
                                       f"SDXL); this model is {family}. Disconnect patch_config.")
        patch = patch.resolved(family)
    generator = torch.Generator().manual_seed(settings.seed)
    with torch.no_grad():
        latents, boxes = _training_data(vae, as_rgb(image).clone(), settings, patch, family, generator)
        latents = model.model.process_latent_in(latents.clone())
        fixed_cond = None
        tokens = clip.tokenize(source_prompt)
        if settings.text_encoder == "off":
            cond, extra = clip.encode_from_tokens_scheduled(tokens)[0]
            fixed_cond = (cond.clone(), {k: v.clone() if torch.is_tensor(v) else v for k, v in extra.items()})
    device = glue.device_of(model)

    def make_group(layers, method):
        return {p: glue.new_adapter(m, method, min(settings.lora_rank, glue.max_lora_rank(m)),
                                    settings.lora_alpha, generator) for p, m in layers}

    unet_layers = glue.unet_layers(model, settings.layers)
    if settings.method == "lora":
        largest = max(glue.max_lora_rank(m) for _, m in unet_layers)
        if settings.lora_rank > largest:
            raise _err("lora_rank", f"{settings.lora_rank} is larger than every chosen layer allows (at most "
                                    f"{largest} for layers '{settings.layers}'); use 4-64")
    adapter = SineAdapter(
        unet=make_group(unet_layers, settings.method),
        text_encoder={} if settings.text_encoder == "off" else
        make_group(glue.text_encoder_layers(clip, settings.text_encoder), settings.text_encoder),
        family=family, source_prompt=source_prompt, patch=patch,
        grid_gate=torch.nn.Parameter(torch.zeros(())) if patch is not None and patch.grid_gate else None,
        settings=asdict(settings))
    router = RowRouter()  # no routing: every row is the fine-tuned model while training
    train_model, injector = glue.patched_model(model, {0: adapter}, router, NODE)
    glue.attach_trainable_views(train_model, "diffusion_model.")
    if settings.gradient_checkpointing:
        unet = model.model.diffusion_model
        for prefix, blocks in (("input_blocks", unet.input_blocks), ("output_blocks", unet.output_blocks)):
            for i, block in enumerate(blocks):
                train_model.add_object_patch(f"diffusion_model.{prefix}.{i}.forward", _checkpointed(block))
    train_clip = glue.patched_clip(clip, adapter, NODE)
    if adapter.text_encoder:
        glue.attach_trainable_views(train_clip.patcher)
        glue.attach_inplace_guards(train_clip.patcher)
    ms = model.model.model_sampling
    dtype = _compute_dtype(settings.precision, device)
    optim = OptimConfig(steps=settings.steps, learning_rate=settings.learning_rate)
    pbar = comfy.utils.ProgressBar(settings.steps)

    def on_step(step, loss):
        comfy.model_management.throw_exception_if_processing_interrupted()
        pbar.update_absolute(step, settings.steps)
        if step % 50 == 0 or step == settings.steps:
            logging.info(f"{NODE}: step {step}/{settings.steps} loss {loss:.5f}")

    def loss_at_step(step):
        idx = int(torch.randint(0, latents.shape[0], (1,), generator=generator))
        x0 = latents[idx:idx + 1].to(device)
        if fixed_cond is None:
            cond_entry = train_clip.encode_from_tokens_scheduled(tokens)[0]
            # encoding loads the text encoder, which may evict the UNet on a small GPU (a no-op otherwise)
            comfy.model_management.load_models_gpu([train_model], force_full_load=True)
        else:
            cond_entry = fixed_cond
        sigma, _, x = noisy_latent(ms, x0, generator)
        injector.boxes = None if boxes is None else boxes[idx:idx + 1]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            denoised = train_model.model.apply_model(x, sigma, transformer_options=topts,
                                                     **model_kwargs(train_model, cond_entry, x, device))
        return denoising_loss(ms, sigma, denoised, x0)

    try:
        comfy.model_management.load_models_gpu([train_model], force_full_load=True)
        topts = train_model.model_options["transformer_options"]
        for p in adapter.parameters():
            p.data = p.data.to(device)
            p.requires_grad_(True)
        with torch.enable_grad():
            losses = train(adapter.parameters(), loss_at_step, optim, on_step, clip_grad_norm=1.0)
    except TrainingDiverged as e:
        raise _err("learning_rate", str(e)) from None
    finally:
        adapter.requires_grad_(False)
        injector.boxes = None
        del train_model, train_clip
        comfy.model_management.cleanup_models_gc()
        comfy.model_management.soft_empty_cache()
    for p in adapter.parameters():
        p.data = p.data.cpu()
    return adapter, losses


# ---- disk cache: unchanged inputs reuse the adapter after a ComfyUI restart ---------------------------------------
def _fingerprint_module(patcher, root: torch.nn.Module) -> str:
    """Identity of a loaded model: a sample of its weights plus the ComfyUI weight patches on it."""
    h = hashlib.sha256()
    params = list(root.named_parameters())
    for name, p in params[:: max(1, len(params) // 16)] + params[-2:]:
        t = p.detach().float().flatten()
        h.update(name.encode())
        h.update(t[:: max(1, t.numel() // 4096)].cpu().numpy().tobytes())
    for key in sorted(patcher.patches):
        h.update(key.encode())
        for patch in patcher.patches[key]:
            h.update(repr(patch[0]).encode())  # strength
    return h.hexdigest()


def cache_key(model, clip, image, source_prompt, settings: FinetuneSettings, patch: PatchConfig | None) -> str:
    h = hashlib.sha256()
    h.update(as_rgb(image).contiguous().float().cpu().numpy().tobytes())
    h.update(json.dumps({"prompt": source_prompt, "settings": asdict(settings),
                         "patch": None if patch is None else patch.to_dict()}, sort_keys=True).encode())
    h.update(_fingerprint_module(model, model.model.diffusion_model).encode())
    if settings.text_encoder != "off":
        h.update(_fingerprint_module(clip.patcher, clip.cond_stage_model).encode())
    return h.hexdigest()[:32]


def cache_dir() -> str:
    return os.path.join(folder_paths.models_dir, "sine_cache")


def load_cached(key: str) -> tuple[SineAdapter, list[float]] | None:
    path = os.path.join(cache_dir(), f"{key}.safetensors")
    if not os.path.exists(path):
        return None
    try:
        adapter, extra = load_adapter_file(path)
        return adapter, json.loads(extra.get("sine_losses", "[]"))
    except (AdapterFileError, ValueError, OSError) as e:
        logging.warning(f"{NODE}: cache entry {path} is damaged ({e}); retraining")
        os.remove(path)
        return None


# ---- outputs ---------------------------------------------------------------------------------------------------
def loss_curve_image(losses: list[float], width: int = 512, height: int = 256) -> torch.Tensor:
    """(1, H, W, 3) plot of the training loss (log scale), for a Preview Image node."""
    img = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(img)
    if losses:
        y = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-12))
        k = max(1, len(y) // 50)
        smooth = np.convolve(y, np.ones(k) / k, mode="valid") if len(y) > k else y
        lo, hi = float(smooth.min()), float(smooth.max())
        span = hi - lo or 1.0
        pts = [(10 + i * (width - 20) / max(1, len(smooth) - 1), height - 20 - (v - lo) / span * (height - 40))
               for i, v in enumerate(smooth)]
        draw.line(pts if len(pts) > 1 else pts * 2, fill=(90, 200, 255), width=2)
        draw.text((10, 4), f"loss {losses[0]:.4f} -> {losses[-1]:.4f} ({len(losses)} steps, log scale)",
                  fill=(230, 230, 230))
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)[None]


def adapter_outputs(model, clip, adapter: SineAdapter, node: str):
    """(fine-tuned MODEL, CLIP, source CONDITIONING) from an adapter, all on clones of the inputs."""
    glue.check_family(adapter, model, node)
    ft_model, _ = glue.patched_model(model, {0: adapter}, RowRouter(), node)
    ft_model.model_options["transformer_options"]["sine_finetuned"] = True  # the guider refuses it as a base
    ft_clip = glue.patched_clip(clip, adapter, node)
    cond = ft_clip.encode_from_tokens_scheduled(ft_clip.tokenize(adapter.source_prompt))
    return ft_model, ft_clip, cond


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
                                       "off - fits a consumer GPU. paper: full UNet + full text encoder, AdamW "
                                       "1e-6, 800 steps, fp32, gradient checkpointing - as the official code; "
                                       "for SD1.5 its training state alone (fp32 deltas, gradients, AdamW) is "
                                       "~14 GB. A preset overrides the inputs it names."),
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
                io.Combo.Input("layers", options=list(glue.UNET_LAYER_SETS), default=d.layers,
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
                             tooltip="Training side in px; 0 = the family's native size (SD1.x 512, SD2.x 768, "
                                     "SDXL 1024). Ignored in patch mode (Patch Resolution Config sets it)."),
                PatchConfigType.Input("patch_config", optional=True,
                                      tooltip="From SINE Patch Resolution Config: patch-based fine-tuning, so the "
                                              "edit can be rendered at other sizes and aspect ratios."),
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
            ],
        )

    @classmethod
    def execute(cls, model, clip, vae, image, source_prompt, preset, steps, learning_rate, seed, method, lora_rank,
                lora_alpha, layers, text_encoder, precision, gradient_checkpointing, resize, resolution,
                patch_config=None) -> io.NodeOutput:
        settings = resolve_settings(preset, steps=steps, learning_rate=learning_rate, seed=seed, method=method,
                                    lora_rank=lora_rank, lora_alpha=lora_alpha, layers=layers,
                                    text_encoder=text_encoder, precision=precision,
                                    gradient_checkpointing=gradient_checkpointing, resize=resize,
                                    resolution=resolution)
        validate(settings, image, source_prompt)
        key = cache_key(model, clip, image, source_prompt, settings, patch_config)
        cached = load_cached(key)
        if cached is not None:
            adapter, losses = cached
            logging.info(f"{NODE}: reusing cached fine-tune {key}")
        else:
            adapter, losses = run_finetune(model, clip, vae, image, source_prompt, settings, patch_config)
            os.makedirs(cache_dir(), exist_ok=True)
            save_adapter_file(adapter, os.path.join(cache_dir(), f"{key}.safetensors"),
                              extra_metadata={"sine_losses": json.dumps(losses)})
        ft_model, ft_clip, cond = adapter_outputs(model, clip, adapter, NODE)
        return io.NodeOutput(ft_model, ft_clip, cond, adapter, loss_curve_image(losses))


class SineApplyAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SINE_ApplyAdapter",
            display_name="SINE Apply Adapter",
            category="SINE",
            description="Turns a (loaded) SINE adapter into what SINE Finetune outputs: the fine-tuned MODEL, its "
                        "CLIP and the source conditioning for the SINE Guider. Inputs are not modified.",
            inputs=[
                io.Model.Input("model", tooltip="The base MODEL the adapter was trained on."),
                io.Clip.Input("clip", tooltip="The base CLIP of the same checkpoint."),
                AdapterType.Input("sine_adapter", tooltip="From Load SINE Adapter (or SINE Finetune)."),
                io.Boolean.Input("positional_grid", default=True,
                                 tooltip="Patch-trained adapters: add the positional grid (on = as trained). Off "
                                         "renders without it, exactly like a non-patch adapter; no effect on "
                                         "non-patch adapters."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.Conditioning.Output(display_name="source_conditioning"),
                     AdapterType.Output(display_name="sine_adapter",
                                        tooltip="The adapter with this grid setting, for the SINE Guider.")],
        )

    @classmethod
    def execute(cls, model, clip, sine_adapter, positional_grid) -> io.NodeOutput:
        adapter = replace(sine_adapter, grid_enabled=positional_grid)
        return io.NodeOutput(*adapter_outputs(model, clip, adapter, "SINE Apply Adapter"), adapter)
