"""The one place that uses ComfyUI internals which changed after 0.3.64, chosen by capability, never by version.

Each branch names the newer Comfy-Org/ComfyUI file and commit it follows; the 0.3.64 branch is the one run by the
test suite (ComfyUI 0.3.64, commit a125cd84). The newer branches are unit-tested against stand-in objects
(tests/comfyui/test_comfy_compat.py checks this module's branching, not ComfyUI's behaviour). See
docs/compatibility.md.
"""
from __future__ import annotations

import importlib
import os
from contextlib import contextmanager

import torch

import comfy.model_management
import comfy.ops
import folder_paths

from ..sine_ops.adapters import torch_layer_kind
from .errors import InputError

DYNAMIC_VRAM_HELP = "start ComfyUI with --disable-dynamic-vram"


# ---- dynamic VRAM: training needs a patcher whose weights are real tensors ----------------------------------------
def is_dynamic(patcher) -> bool:
    """Whether ComfyUI streams this model's weights per call (dynamic VRAM). ModelPatcherDynamic.is_dynamic():
    comfy/model_patcher.py @ e59d85a0; 0.3.64 patchers have no such method and are never dynamic."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


def training_clone(patcher, input_name: str):
    """A clone of `patcher` that autograd can train through.

    Under dynamic VRAM the weights are CPU tensors cast into per-call buffers, which a backward pass cannot use;
    core's trainer therefore trains on a freshly loaded, non-dynamic model made outside inference mode
    (comfy_extras/nodes_train.py, "force clone inside training mode", ComfyUI #13400; clone(disable_dynamic=True)
    in comfy/model_patcher.py @ e59d85a0). Call inside torch.inference_mode(False). On 0.3.64 a plain clone.
    """
    if not is_dynamic(patcher):
        return patcher.clone()
    try:
        return patcher.clone(disable_dynamic=True)
    except (RuntimeError, TypeError) as e:  # no cached_patcher_init: the model was not made by a loader
        raise InputError(input_name, f"this model is loaded with ComfyUI's dynamic VRAM and cannot be reloaded for "
                                     f"training ({e}); {DYNAMIC_VRAM_HELP}") from None


def training_clip_clone(clip):
    """CLIP.clone() whose patcher is a training_clone (the text encoder trains through its weights too)."""
    c = clip.clone()
    if is_dynamic(clip.patcher):
        c.patcher = training_clone(clip.patcher, "clip")
        c.cond_stage_model = c.patcher.model
    return c


@contextmanager
def training_mode():
    """comfy.model_management.in_training on for the enclosed training steps, restored after: newer ComfyUI picks
    differentiable paths with it (comfy/model_management.py @ a7631e35; set by core's trainer). Absent on 0.3.64."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        yield
        return
    previous, mm.in_training = mm.in_training, True
    try:
        yield
    finally:
        mm.in_training = previous


# ---- layers: cast layers and quantized weights -------------------------------------------------------------------
def layer_kind(module: torch.nn.Module) -> str | None:
    """"linear" / "conv2d" / None for ComfyUI's layers. Newer mixed-precision ops define Linear as
    (torch.nn.Module, CastWeightBiasOp), not an nn.Linear (comfy/ops.py @ 5522e4fd), so cast layers are also
    recognised by CastWeightBiasOp plus a Linear's in_features and 2-D weight."""
    kind = torch_layer_kind(module)
    if kind is not None:
        return kind
    weight = getattr(module, "weight", None)
    if isinstance(module, comfy.ops.CastWeightBiasOp) and hasattr(module, "in_features") and \
            weight is not None and len(weight.shape) == 2:  # in_features: a Linear, not e.g. an Embedding
        return "linear"
    return None


def _quantized_tensor_class():
    """comfy.quant_ops.QuantizedTensor (comfy/quant_ops.py @ cd9452e3, re-exported from comfy_kitchen), or None:
    0.3.64 has no comfy.quant_ops. Without comfy_kitchen newer ComfyUI defines a stub class no tensor is."""
    try:
        return getattr(importlib.import_module("comfy.quant_ops"), "QuantizedTensor", None)
    except ImportError:
        return None


def is_quantized(tensor) -> bool:
    qt = _quantized_tensor_class()
    return qt is not None and isinstance(tensor, qt)


def refuse_quantized_training(layers: list[tuple[str, torch.nn.Module]], input_name: str) -> None:
    """Training backpropagates through the base layers; a QuantizedTensor weight (a quantized / mixed-precision
    checkpoint) has no such path in this pack. Sampling with such checkpoints works (the base forward is
    ComfyUI's own)."""
    for path, module in layers:
        if is_quantized(getattr(module, "weight", None)):
            raise InputError(input_name, f"this checkpoint stores quantized weights (layer '{path}' is a "
                                         f"{type(module.weight).__name__}, e.g. an fp8-scaled or mixed-precision "
                                         "checkpoint); SINE Finetune cannot train through them. Load the fp16/bf16 "
                                         "version of the checkpoint (fp8 storage via --fp8_e4m3fn-unet or Load "
                                         "Diffusion Model's weight_dtype works), or train on it elsewhere and load "
                                         "the adapter.")


# ---- files: where ComfyUI lets a node save ---------------------------------------------------------------------
def check_save_folder(root: str, folder: str, input_name: str) -> None:
    """Refuse a save folder that ComfyUI itself would refuse. Newer ComfyUI resolves links before checking that a
    save stays inside its root, so a symlinked subfolder is listed and loaded from, but never saved into
    (folder_paths.is_within_directory, used by get_save_image_path: folder_paths.py @ 4effd056). 0.3.64 has no
    such function and checks the unresolved path only, so there a symlinked subfolder takes saves."""
    inside = getattr(folder_paths, "is_within_directory", None)
    if inside is not None and not inside(root, folder):
        raise InputError(input_name, f"'{os.path.relpath(folder, root)}' is a link to a folder outside the loras "
                                     f"folder ({os.path.realpath(folder)}); this ComfyUI saves only inside "
                                     f"{root}. Save into a real subfolder, or add the other folder as a loras "
                                     "path in extra_model_paths.yaml")
