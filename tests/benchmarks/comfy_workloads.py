"""ComfyUI-side pieces shared by tests/benchmarks/*.py and tests/gpu/gpu_check.py (benchmarks, never tests).

Only stable interfaces: ComfyUI started by tests/comfyui_harness.py with this pack loaded, the random-weight
fixtures of tests/comfyui_fixtures.py, nodes looked up by node id in ComfyUI's NODE_CLASS_MAPPINGS (this pack's
SINE_* nodes and ComfyUI's own), ComfyUI's model management, and ComfyUI's model API (apply_model). Of the pack's
internals only the way SINE Finetune makes the UNet trainable (and, when asked, gradient-checkpointed) is used
(BareUNet: one way for the pack and its benchmarks); the others are free to change.
"""
from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
if str(TESTS.parent) not in sys.path:
    sys.path.append(str(TESTS.parent))  # appended: ComfyUI's own top-level `nodes` must win over the pack's nodes/

FIXTURE_SEED = 1234
SDXL_FIXTURE_SEED = 4321  # the seed tests/comfyui/test_sdxl.py builds with: both share one 7 GB build in the cache
FAMILIES = ("sd15", "sdxl")
PROMPT = "photo of a sks dog"
EDIT = "photo of a dog wearing a superhero cape"


def start(work: Path, vram_flag: str | None = None, family: str = "sd15"):
    """(ComfySession, fixture names). vram_flag: a ComfyUI VRAM argument ("lowvram", "novram", ...) set as if
    given on ComfyUI's command line; it must be set before ComfyUI imports comfy.model_management, i.e. here,
    once per process. family: which fixture checkpoint fx["checkpoint"] names (load_checkpoint loads it):
    "sd15" (the SD1.5-architecture fixture, ~4 GB) or "sdxl" (the opt-in random-weight SDXL fixture of
    tests/comfyui_fixtures.py, ensure_sdxl_checkpoint: 7 GB fp16, ~15 GB RAM to build on first use). The other
    fixtures (source image, ...) are the SD1.5 set in both cases."""
    from comfyui_harness import ComfySession, find_comfyui
    from comfyui_fixtures import ensure_fixtures, ensure_sdxl_checkpoint
    if family not in FAMILIES:
        raise ValueError(f"family {family!r}: choose from {', '.join(FAMILIES)}")
    root = find_comfyui()
    if root is None:
        sys.exit("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout (e.g. /work/shared/comfyui)")
    if vram_flag:
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
        from comfy.cli_args import args
        if "comfy.model_management" in sys.modules:
            sys.exit("internal: the VRAM flag must be set before ComfyUI's model management is imported")
        if not hasattr(args, vram_flag):
            sys.exit(f"this ComfyUI has no --{vram_flag} argument")
        setattr(args, vram_flag, True)
    s = ComfySession(root, Path(work))
    if not s.pack_load_ok:
        sys.exit("ComfyUI did not load the SINE pack (see the log above)")
    version = importlib.import_module("comfyui_version").__version__
    fx = ensure_fixtures(s.work / "models", s.work / "input", FIXTURE_SEED, version)
    if family == "sdxl":
        fx = dict(fx, checkpoint=ensure_sdxl_checkpoint(s.work / "models", SDXL_FIXTURE_SEED, version))
    return s, fx


def node_class(node_id: str):
    import nodes
    try:
        return nodes.NODE_CLASS_MAPPINGS[node_id]
    except KeyError:
        raise SystemExit(f"no node '{node_id}' in ComfyUI's NODE_CLASS_MAPPINGS") from None


def call_node(node_id: str, **inputs) -> tuple:
    """Run one node as ComfyUI's executor does (its FUNCTION, under torch.inference_mode) and return its outputs.

    Required widget inputs that are not given get their declared default, as the frontend fills a new node;
    every other input must be given."""
    import torch
    cls = node_class(node_id)
    for name, spec in (cls.INPUT_TYPES().get("required") or {}).items():
        if name in inputs:
            continue
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if "default" in opts:
            inputs[name] = opts["default"]
        else:
            raise TypeError(f"{node_id}: required input '{name}' not given and it has no default")
    with torch.inference_mode():
        fn = getattr(cls(), cls.FUNCTION)
        out = fn(**inputs)
        if inspect.isawaitable(out):
            out = asyncio.run(out)
    if hasattr(out, "result"):  # V3 NodeOutput
        return tuple(out.result or ())
    if isinstance(out, dict):   # V1 {"ui": ..., "result": ...}
        return tuple(out.get("result") or ())
    return tuple(out)


def named_output(node_id: str, outputs: tuple, name: str, default=None):
    """The output called `name` (the node's RETURN_NAMES, as the UI shows them) of a call_node result, else
    `default` (an older/newer version of the node without that output)."""
    cls = node_class(node_id)
    names = list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)
    return outputs[names.index(name)] if name in names and names.index(name) < len(outputs) else default


def free_models() -> None:
    """Unload every model ComfyUI holds on the GPU and empty the cache, so a phase starts from the same state."""
    import comfy.model_management as mm
    mm.unload_all_models()
    mm.cleanup_models_gc()
    mm.soft_empty_cache(True)


def device():
    import comfy.model_management as mm
    return mm.get_torch_device()


def clear_sine_cache() -> None:
    """SINE Finetune keeps trained adapters in models/sine_cache; benchmarks time training, not that cache (they
    also pass a new seed to every run, which is part of the cache key)."""
    import shutil
    import folder_paths
    shutil.rmtree(os.path.join(folder_paths.models_dir, "sine_cache"), ignore_errors=True)


def load_checkpoint(fx: dict):
    """(MODEL, CLIP, VAE) of the fixture checkpoint (start's family) through ComfyUI's CheckpointLoaderSimple."""
    return call_node("CheckpointLoaderSimple", ckpt_name=fx["checkpoint"])[:3]


def source_image(fx: dict):
    return call_node("LoadImage", image=fx["source_image"])[0]


def encode_text(clip, text: str):
    return call_node("CLIPTextEncode", clip=clip, text=text)[0]


def sine_finetune(model, clip, vae, image, *, steps: int, resolution: int, seed: int, precision: str = "auto",
                  rank: int = 16, layers: str = "attention", lr: float = 1e-4, patch_config=None,
                  gradient_checkpointing: bool = False, compile: bool = False) -> tuple:
    """SINE_Finetune (LoRA) -> its outputs: 0 model, 1 clip, 2 source_conditioning, 3 sine_adapter, then more
    (loss_curve, ...). Index them (workflows link outputs by index; new outputs are appended), never unpack.
    gradient_checkpointing: the node's input of that name (UNet input/output blocks recomputed in the backward).
    compile: the node's input of that name (the UNet's training step under torch.compile)."""
    extra = {} if patch_config is None else {"patch_config": patch_config}
    return call_node("SINE_Finetune", model=model, clip=clip, vae=vae, image=image, source_prompt=PROMPT,
                     preset="custom", steps=steps, learning_rate=lr, seed=seed, method="lora", lora_rank=rank,
                     lora_alpha=float(rank), layers=layers, text_encoder="off", precision=precision,
                     gradient_checkpointing=gradient_checkpointing, resize="stretch", resolution=resolution,
                     compile=compile, **extra)


def edit_setup(work: Path) -> dict:
    """What the sampling benchmarks share: ComfyUI started in `work`, the fixture checkpoint, the edit and empty
    prompts, and a 3-step fine-tune at 64 px (its source conditioning and adapter)."""
    s, fx = start(work)
    model, clip, vae = load_checkpoint(fx)
    ft = sine_finetune(model, clip, vae, source_image(fx), steps=3, resolution=64, seed=0, lr=1e-3)
    return dict(session=s, model=model, clip=clip, vae=vae, positive=encode_text(clip, EDIT),
                negative=encode_text(clip, ""), source_conditioning=ft[2], adapter=ft[3])


def sample(kind: str, model, *, positive, negative, size: int, steps: int, seed: int, sampler: str,
           scheduler: str, cfg: float = 7.5, adapter=None, source_conditioning=None) -> dict:
    """One 1-image sampling run: kind "ksampler" (ComfyUI's KSampler) or "sine" (SINE_GuidedSampler with the
    paper's settings: fine-tuned weight 0.3, window 0.0-0.6). Returns the LATENT."""
    latent = call_node("EmptyLatentImage", width=size, height=size, batch_size=1)[0]
    common = dict(model=model, seed=seed, steps=steps, cfg=cfg, sampler_name=sampler, scheduler=scheduler,
                  positive=positive, negative=negative, latent_image=latent, denoise=1.0)
    if kind == "ksampler":
        return call_node("KSampler", **common)[0]
    return call_node("SINE_GuidedSampler", **common, sine_adapter=adapter, source_conditioning=source_conditioning,
                     finetuned_weight=0.3, start_percent=0.0, end_percent=0.6)[0]


# Sweeps of N settings (fine-tuned weights x window ends): the lists SINE_Sweep gets for N rows
SWEEP_SETTINGS = {1: ("0.3", "0.6"), 2: ("0.3, 0.5", "0.6"), 4: ("0.2, 0.3", "0.5, 0.7"),
                  8: ("0.2, 0.3, 0.4, 0.5", "0.5, 0.7"), 12: ("0.2, 0.3, 0.4, 0.5", "0.5, 0.6, 0.7"),
                  16: ("0.2, 0.3, 0.4, 0.5", "0.4, 0.5, 0.6, 0.7")}


def sweep(model, *, settings: int, positive, negative, size: int, steps: int, seed: int, sampler: str,
          scheduler: str, adapter, source_conditioning, cfg: float = 7.5) -> dict:
    """SINE_Guider (paper window start 0.0) -> SINE_Sweep of `settings` rows (SWEEP_SETTINGS), no VAE (the grid is
    the latent colour preview). Returns the LATENT of all rows."""
    weights, ends = SWEEP_SETTINGS[settings]
    latent = call_node("EmptyLatentImage", width=size, height=size, batch_size=1)[0]
    guider = call_node("SINE_Guider", model=model, positive=positive, negative=negative, cfg=cfg,
                       sine_adapter=adapter, source_conditioning=source_conditioning, finetuned_weight=0.3,
                       start_percent=0.0, end_percent=0.6)[0]
    out = call_node("SINE_Sweep", guider=guider, seed=seed, steps=steps, sampler_name=sampler, scheduler=scheduler,
                    latent_image=latent, denoise=1.0, finetuned_weights=weights, end_percents=ends)[0]
    if out["samples"].shape[0] != settings:
        raise RuntimeError(f"SINE_Sweep returned {out['samples'].shape[0]} rows for {settings} settings")
    return out


class BareUNet:
    """The UNet's forward + backward (to its input) through ComfyUI's apply_model, no adapters: the floor of any
    training step on this model. It runs the way SINE Finetune runs the UNet (the pack's own
    nodes.model_patching.attach_trainable_weights on a clone, loaded in inference mode by
    nodes.training_run.comfy_call), so the two differ only by what SINE adds; the MODEL itself is not modified.
    autocast: e.g. torch.bfloat16 on CUDA, None = off.

    The UNet's inputs (c_crossattn, and SDXL's size/pooled `y`) are made once by nodes.model_patching.model_kwargs,
    the function SINE Finetune makes them with. gradient_checkpointing: the
    pack's own nodes.model_patching.attach_gradient_checkpointing on the clone, as SINE_Finetune with
    gradient_checkpointing on (every UNet input and output block recomputed in the backward pass; the middle
    block is not)."""

    def __init__(self, session, model, cond, size: int, autocast=None, gradient_checkpointing: bool = False):
        import torch
        import comfy.model_management as mm
        patching, training_run = session.pack_module("nodes.model_patching"), session.pack_module("nodes.training_run")
        self.torch, self.autocast = torch, autocast
        self.latent = size // 8
        with torch.inference_mode(False):
            self.model = model.clone()
            patching.attach_trainable_weights(self.model, patching.WeightViews(), "diffusion_model.")
            if gradient_checkpointing:
                patching.attach_gradient_checkpointing(self.model)
            training_run.comfy_call(mm.load_models_gpu, [self.model], force_full_load=True)
            self.device = mm.get_torch_device()
            # the UNet's inputs from the CONDITIONING ([[tensor, extras], ...]) made once, by the function SINE
            # Finetune makes them with (c_crossattn; SDXL's y), as normal tensors
            shape = torch.empty(1, 4, self.latent, self.latent, device=self.device)
            self.inputs = {k: v.clone() for k, v in patching.model_kwargs(self.model, cond[0], shape,
                                                                           self.device).items()}

    def step(self) -> None:
        torch = self.torch
        with torch.inference_mode(False):
            x = torch.randn(1, 4, self.latent, self.latent, device=self.device, requires_grad=True)
            sigma = torch.tensor([5.0], device=self.device)
            with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
                out = self.model.model.apply_model(x, sigma, **self.inputs)
            out.float().pow(2).mean().backward()

    def close(self) -> None:
        self.model = self.inputs = None


def vae_decode(vae, latent: dict):
    """IMAGE of a LATENT through ComfyUI's VAEDecode node (what follows every sampler in a user's graph)."""
    return call_node("VAEDecode", samples=latent, vae=vae)[0]


def vae_encode_crop(vae, size: int, seed: int = 0):
    """One VAE encode of a size x size crop (SINE Finetune's per-crop cost) through ComfyUI's VAEEncode node."""
    import torch
    crop = torch.rand(1, size, size, 3, generator=torch.Generator().manual_seed(seed))
    return call_node("VAEEncode", pixels=crop, vae=vae)[0]
