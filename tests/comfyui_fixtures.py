"""Random-weight model files built through ComfyUI's own classes, deterministic from a seed, cached on disk.

- SD1.5 checkpoint: ComfyUI's `supported_models.SD15` UNet, `sd1_clip` CLIP-L and SD `AutoencoderKL`, written by
  ComfyUI's own `comfy.sd.save_checkpoint`, so `CheckpointLoaderSimple` detects it as SD1.5 like a real file.
- SD1.5 ControlNet: ComfyUI's `cldm.ControlNet`, written in the `control_model.*` layout its loader reads
  (ComfyUI has no ControlNet save path).
- A source image and a ControlNet hint image (PNG).

ComfyUI builds models with `disable_weight_init` ops (weights left uninitialised), so every parameter is
re-initialised here from a seeded generator. Weights are scaled so activations keep unit size through the
network: sampling gives finite, non-constant images. Files are keyed by seed and ComfyUI version.
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SD15_UNET_CONFIG = {  # the configuration comfy.model_detection reports for an SD1.5 checkpoint
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "in_channels": 4, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1,
    "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
SDXL_UNET_CONFIG = {  # likewise for SDXL base
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048, "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                   "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def default_cache_dir() -> Path:
    return Path(os.environ.get("SINE_TEST_CACHE", Path(__file__).resolve().parent.parent / ".sine_test_cache"))


@torch.no_grad()
def reinitialise(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give every parameter a finite, seeded value: fan-in scaled normals for weights, zero biases, unit norms."""
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(fan_in))
        elif leaf == "bias" or "bias" in leaf:
            p.zero_()
        else:  # norm scales and other 1-D parameters
            p.fill_(1.0)
    # position embeddings / token embeddings are 2-D and got 1/sqrt(dim) normals above, like CLIP's own init scale
    for name, b in module.named_buffers():
        if b.dtype.is_floating_point and not torch.isfinite(b).all():
            b.zero_()


def proxy_sd15_model(channels: int, seed: int):
    """An SD1.5-architecture MODEL (ModelPatcher) with `channels` model channels and seeded random weights, built
    as a checkpoint loader builds one (ComfyUI's SD15 class, weights made in inference mode)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    with torch.inference_mode():
        config = comfy.supported_models.SD15(dict(SD15_UNET_CONFIG, model_channels=channels, dtype=torch.float32))
        config.set_inference_dtype(torch.float32, None)
        base = config.get_model({}, device=mm.unet_offload_device())
        reinitialise(base, torch.Generator().manual_seed(seed))
    return comfy.model_patcher.ModelPatcher(base, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def _atomic_save(save_fn, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    save_fn(str(tmp))
    os.replace(tmp, path)


def build_checkpoint(path: Path, seed: int, family: str = "sd15") -> None:
    """A checkpoint with random weights (family "sd15" or "sdxl"), through ComfyUI's model classes and save path.

    SDXL is stored in fp16 (7 GB) and needs ~15 GB RAM to build; it is only built for the opt-in SDXL test.
    """
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models

    gen = torch.Generator().manual_seed(seed)
    cpu = torch.device("cpu")
    config_cls, unet_config = {"sd15": (comfy.supported_models.SD15, SD15_UNET_CONFIG),
                               "sdxl": (comfy.supported_models.SDXL, SDXL_UNET_CONFIG)}[family]
    config = config_cls(dict(unet_config, dtype=torch.float32))
    config.set_inference_dtype(torch.float32, None)
    base_model = config.get_model({}, device=cpu)
    reinitialise(base_model, gen)
    model = comfy.model_patcher.ModelPatcher(base_model, load_device=cpu, offload_device=cpu)
    clip = comfy.sd.CLIP(target=config.clip_target({}), model_options={"load_device": cpu, "offload_device": cpu,
                                                                        "dtype": torch.float32})
    reinitialise(clip.cond_stage_model, gen)
    vae = comfy.sd.VAE(sd={}, config={"params": {"ddconfig": SD_VAE_DDCONFIG, "embed_dim": 4}}, device=cpu,
                       dtype=torch.float32)
    reinitialise(vae.first_stage_model, gen)
    if family == "sdxl":
        for module in (base_model, clip.cond_stage_model, vae.first_stage_model):
            module.half()
    _atomic_save(lambda p: comfy.sd.save_checkpoint(p, model, clip, vae, metadata={"sine_test_fixture": str(seed)}),
                 path)
    del model, clip, vae, base_model
    comfy.model_management.soft_empty_cache()


def build_sd15_controlnet(path: Path, seed: int) -> None:
    """An SD1.5 ControlNet with random weights, in the `control_model.*` layout ComfyUI's loader reads."""
    import comfy.cldm.cldm
    import comfy.ops
    import comfy.utils

    gen = torch.Generator().manual_seed(seed)
    cfg = dict(SD15_UNET_CONFIG)
    cfg.pop("out_channels")
    net = comfy.cldm.cldm.ControlNet(hint_channels=3, operations=comfy.ops.disable_weight_init, dtype=torch.float32,
                                     device=torch.device("cpu"), **cfg)
    reinitialise(net, gen)
    sd = {f"control_model.{k}": v.contiguous() for k, v in net.state_dict().items()}
    _atomic_save(lambda p: comfy.utils.save_torch_file(sd, p, metadata={"sine_test_fixture": str(seed)}), path)


def build_sd15_lora(path: Path, checkpoint: Path, seed: int, rank: int = 4, alpha: float = 2.0) -> None:
    """A stock-format LoRA for the SD1.5 fixture, in kohya naming (what most LoRA files out there use):
    `lora_unet_<diffusers name>` on every attention projection, a 3x3 resnet conv (LoCon) and a 1x1 proj_in
    stored with 2-D factors, and `lora_te_...` on the text encoder's attention. Shapes are read from the checkpoint;
    random factors scaled so the LoRA visibly changes the output without blowing it up."""
    import comfy.utils
    import safetensors

    gen = torch.Generator().manual_seed(seed)
    unet_names = {f"model.diffusion_model.{comfy_key}": diffusers_key[:-len(".weight")]
                  for diffusers_key, comfy_key in comfy.utils.unet_to_diffusers(SD15_UNET_CONFIG).items()
                  if diffusers_key.endswith(".weight")}
    te_prefix = "cond_stage_model.transformer.text_model.encoder.layers."
    sd = {}
    with safetensors.safe_open(str(checkpoint), framework="pt") as f:
        for key in f.keys():
            name = unet_names.get(key)
            if name is not None and (".to_" in name or name.endswith(("down_blocks.0.resnets.0.conv1",
                                                                        "down_blocks.0.attentions.0.proj_in"))):
                lora_key, flat = "lora_unet_" + name.replace(".", "_"), name.endswith("proj_in")
            elif key.startswith(te_prefix) and key.endswith(("self_attn.q_proj.weight", "self_attn.v_proj.weight")):
                lora_key, flat = "lora_te_text_model_encoder_layers_" + \
                    key[len(te_prefix):-len(".weight")].replace(".", "_"), False
            else:
                continue
            out_ch, *rest = f.get_slice(key).get_shape()
            fan_in = math.prod(rest)
            down = torch.randn(rank, *([fan_in] if flat else rest), generator=gen) / math.sqrt(fan_in)
            up = torch.randn(out_ch, rank, *([1, 1] if len(rest) == 3 and not flat else []), generator=gen) * 0.5
            sd.update({f"{lora_key}.lora_down.weight": down.contiguous(), f"{lora_key}.lora_up.weight": up.contiguous(),
                       f"{lora_key}.alpha": torch.tensor(alpha)})
    _atomic_save(lambda p: comfy.utils.save_torch_file(sd, p, metadata={"sine_test_fixture": str(seed)}), path)


def build_images(source: Path, hint: Path, seed: int, size: tuple[int, int] = (256, 256)) -> None:
    """A colourful source picture (smooth shapes + texture) and an edge-like ControlNet hint, from a seed."""
    rng = np.random.default_rng(seed)
    h, w = size[1], size[0]
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = np.stack([0.5 + 0.5 * np.sin(6 * xx + rng.uniform(0, 6)),
                    0.5 + 0.5 * np.cos(5 * yy + rng.uniform(0, 6)),
                    0.5 + 0.5 * np.sin(4 * (xx + yy) + rng.uniform(0, 6))], axis=-1)
    cy, cx, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.15, 0.3)
    disc = ((yy - cy) ** 2 + (xx - cx) ** 2) < r * r
    img[disc] = [0.9, 0.2, 0.1]
    img = np.clip(img + rng.normal(0, 0.03, img.shape), 0, 1)
    Image.fromarray((img * 255).astype(np.uint8)).save(source)
    edge = np.abs(np.diff(disc.astype(np.float32), axis=0, prepend=0)) + np.abs(np.diff(disc.astype(np.float32), axis=1, prepend=0))
    Image.fromarray((np.clip(edge, 0, 1) * 255).astype(np.uint8)).convert("RGB").save(hint)


def ensure_fixtures(models_dir: Path, input_dir: Path, seed: int, comfy_version: str, cache_dir: Path | None = None) -> dict:
    """Build (or reuse from the cache) every fixture and link it into ComfyUI's model/input folders.

    Returns the names ComfyUI's loaders see: {"checkpoint", "controlnet", "source_image", "hint_image", "lora"}.
    """
    cache = (cache_dir or default_cache_dir()) / f"comfyui-{comfy_version}-seed{seed}"
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = cache / f"sine_test_sd15_seed{seed}.safetensors"
    cnet = cache / f"sine_test_controlnet_sd15_seed{seed}.safetensors"
    src, hint = cache / f"sine_test_source_seed{seed}.png", cache / f"sine_test_hint_seed{seed}.png"
    if not ckpt.exists():
        build_checkpoint(ckpt, seed)
    if not cnet.exists():
        build_sd15_controlnet(cnet, seed + 1)
    if not (src.exists() and hint.exists()):
        build_images(src, hint, seed)
    lora = cache / f"sine_test_lora_sd15_seed{seed}.safetensors"
    if not lora.exists():
        build_sd15_lora(lora, ckpt, seed + 2)
    places = {ckpt: models_dir / "checkpoints", cnet: models_dir / "controlnet", src: input_dir, hint: input_dir,
              lora: models_dir / "loras"}
    for f, folder in places.items():
        folder.mkdir(parents=True, exist_ok=True)
        link = folder / f.name
        if folder == input_dir:  # copied: newer ComfyUI refuses input files that resolve outside the input folder
            if link.is_symlink() or not link.exists():  # (folder_paths.is_within_directory, 0.33.0 @ 783545f6)
                link.unlink(missing_ok=True)  # a link left in a reused work folder by an earlier version
                shutil.copyfile(f, link)
        elif not link.exists():
            link.symlink_to(f)
    return {"checkpoint": ckpt.name, "controlnet": cnet.name, "source_image": src.name, "hint_image": hint.name,
            "lora": lora.name}


def ensure_sdxl_checkpoint(models_dir: Path, seed: int, comfy_version: str, cache_dir: Path | None = None) -> str:
    """The opt-in random-weight SDXL checkpoint (7 GB), built once and linked into the checkpoints folder."""
    cache = (cache_dir or default_cache_dir()) / f"comfyui-{comfy_version}-seed{seed}"
    cache.mkdir(parents=True, exist_ok=True)
    ckpt = cache / f"sine_test_sdxl_seed{seed}.safetensors"
    if not ckpt.exists():
        build_checkpoint(ckpt, seed, "sdxl")
    link = models_dir / "checkpoints" / ckpt.name
    if not link.exists():
        link.symlink_to(ckpt)
    return ckpt.name


def ensure_dit_model(folder_paths, models_dir: Path, seed: int, comfy_version: str, cache_dir: Path | None = None) -> str:
    """A DiT-style diffusion model without a UNet input conv: ComfyUI's PixArt-Sigma with ONE transformer block
    (38 M parameters: the family, detection and loading path are real; the depth is cut to keep it small).
    Linked into a diffusion_models folder for UNETLoader; returns its name there."""
    import comfy.supported_models
    import comfy.utils

    cache = (cache_dir or default_cache_dir()) / f"comfyui-{comfy_version}-seed{seed}"
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / f"sine_test_pixart_sigma_1block_seed{seed}.safetensors"
    if not path.exists():
        config = comfy.supported_models.PixArtSigma({
            "num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4, "depth": 1,
            "model_max_length": 300, "input_size": 128, "pe_interpolation": 2, "image_model": "pixart_sigma",
            "micro_condition": False})
        model = config.get_model({}, device=torch.device("cpu"))
        reinitialise(model.diffusion_model, torch.Generator().manual_seed(seed))
        sd = {k: v.contiguous() for k, v in model.diffusion_model.state_dict().items()}
        _atomic_save(lambda p: comfy.utils.save_torch_file(sd, p), path)
    folder = models_dir / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    folder_paths.add_model_folder_path("diffusion_models", str(folder), is_default=True)
    link = folder / path.name
    if not link.exists():
        link.symlink_to(path)
    return path.name
