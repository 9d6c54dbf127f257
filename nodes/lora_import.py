"""SINE LoRA as Fine-tuned Model: a stock LoRA file (DreamBooth, character LoRA...) as a SINE adapter.

The file's keys are mapped to layers with ComfyUI's own tables (comfy.lora.model_lora_keys_unet /
model_lora_keys_clip, read by comfy.lora.load_lora), so every naming the stock LoraLoader understands (kohya
`lora_unet_...` / `lora_te_...`, diffusers, ComfyUI's `diffusion_model.` / `text_encoders.`) works. The result is a
SineAdapter of LoRA modules on those layers: the guider runs it in the same single batched forward as a
SINE-trained adapter.
"""
from __future__ import annotations

import torch

import comfy.lora
import comfy.lora_convert
import comfy.utils
import comfy.weight_adapter
import folder_paths
from comfy_api.latest import io

from ..sine_ops.adapters import conv_spec
from ..sine_ops.lora_import import lora_module
from ..sine_ops.sine_adapter import SineAdapter
from . import model_patching as mp
from .adapter_glue import adapter_outputs
from .errors import InputError, node_errors
from .types import AdapterType

NODE_NAME = "SINE LoRA as Fine-tuned Model"
SINE_ONLY_PREFIX = "sine."  # sine_ops.adapter_file's keys beside the LoRA keys


class _ReadRecorder(dict):
    """The LoRA file's tensors, remembering which keys ComfyUI's loader read (the others map to no layer)."""

    def __init__(self, sd: dict):
        super().__init__(sd)
        self.read: set[str] = set()

    def __getitem__(self, key):
        value = super().__getitem__(key)
        self.read.add(key)
        return value

    def get(self, key, default=None):
        if key in self:
            return self[key]
        return default


def _kind(patch) -> str | None:
    """What a loaded patch is when it is NOT a plain LoRA (None for a plain LoRA)."""
    if isinstance(patch, comfy.weight_adapter.LoRAAdapter):
        _up, _down, _alpha, mid, dora_scale, reshape = patch.weights
        if dora_scale is not None:
            return "DoRA (dora_scale)"
        if mid is not None:
            return "LoCon with a Tucker mid weight (lora_mid)"
        return "LoRA with reshape_weight" if reshape is not None else None
    if isinstance(patch, comfy.weight_adapter.WeightAdapterBase):
        return {"loha": "LoHa", "lokr": "LoKr", "glora": "GLoRA", "oft": "OFT", "boft": "BOFT"}.get(patch.name,
                                                                                                    patch.name)
    if isinstance(patch, tuple):
        return {"diff": "a full weight difference (.diff / .diff_b; a SINE full fine-tune: use Load SINE Adapter)",
                "set": "a weight replacement (.set_weight)"}.get(patch[0], f"a '{patch[0]}' patch")
    return type(patch).__name__


def _loaded_patches(model, clip, lora_sd: dict, lora_name: str) -> dict:
    """{target weight key: LoRAAdapter} from ComfyUI's own key mapping; refuses what is not a usable plain LoRA."""
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    lora = _ReadRecorder(comfy.lora_convert.convert_lora(lora_sd))
    patches = comfy.lora.load_lora(lora, key_map, log_missing=False)
    unused = sorted(set(lora) - lora.read)
    if unused:
        raise InputError("lora_name", f"{lora_name}: {len(unused)} of its {len(lora)} keys map to no layer of this "
                                      f"model (e.g. {', '.join(unused[:3])}). Is it a LoRA for another model "
                                      "family? Pick a LoRA made for the connected checkpoint.")
    if not patches:
        raise InputError("lora_name", f"{lora_name}: no LoRA weights found in the file")
    found: dict[str, int] = {}
    for target, patch in patches.items():
        kind = "a partial-weight (fused) target" if not isinstance(target, str) else _kind(patch)
        if kind is not None:
            found[kind] = found.get(kind, 0) + 1
    if found:
        what = "; ".join(f"{n} layer(s) of {k}" for k, n in found.items())
        raise InputError("lora_name", f"{lora_name} is not a plain LoRA: found {what}. Only plain LoRA "
                                      "(lora_up/lora_down, any rank, with or without alpha) can be a SINE fine-tuned "
                                      "model; use this file with the stock LoraLoader instead.")
    return patches


def lora_adapter(model, clip, lora_sd: dict, lora_name: str, source_prompt: str, strength: float) -> SineAdapter:
    """A SineAdapter whose LoRA modules sit on the layers ComfyUI's loader would patch with this file."""
    unet, text_encoder = {}, {}
    for target, patch in _loaded_patches(model, clip, lora_sd, lora_name).items():
        path = target[:-len(".weight")]
        unet_side = target.startswith("diffusion_model.")
        module = comfy.utils.get_attr(model.model if unet_side else clip.cond_stage_model, path)
        up, down, alpha = patch.weights[:3]
        bad = [name for name, t in (("lora_up", up), ("lora_down", down), ("alpha", alpha))
               if t is not None and not torch.isfinite(torch.as_tensor(t)).all()]
        if bad:
            raise InputError("lora_name", f"{lora_name}, layer {path}: {' and '.join(bad)} hold NaN/Inf values, "
                                          "which would make every image NaN (a damaged file or a diverged "
                                          "training). Pick another LoRA")
        try:
            adapter = lora_module(tuple(module.weight.shape), up, down, alpha, strength, conv_spec(module))
        except ValueError as e:
            raise InputError("lora_name", f"{lora_name}, layer {path}: {e}. Pick a LoRA made for the connected "
                                          "checkpoint.") from None
        (unet if unet_side else text_encoder)[path] = adapter
    return SineAdapter(unet=unet, text_encoder=text_encoder, family=mp.model_family(model),
                       source_prompt=source_prompt,
                       settings={"source": "lora_file", "lora_name": lora_name, "strength": strength})


class SineLoraAsAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SINE_LoraAsAdapter",
            display_name=NODE_NAME,
            category="SINE",
            description="Uses a LoRA you already have (DreamBooth, character or style LoRA from models/loras, any "
                        "naming the stock LoraLoader reads) as SINE's fine-tuned model, instead of SINE Finetune. "
                        "Outputs match SINE Finetune's: connect sine_adapter and source_conditioning to the SINE "
                        "Guider. A LoRA trained on many images keeps the identity (who/what), not one image's "
                        "layout.",
            inputs=[
                io.Model.Input("model", tooltip="The BASE model the LoRA was made for (from your checkpoint "
                                                "loader; not modified)."),
                io.Clip.Input("clip", tooltip="The base CLIP of the same checkpoint; the LoRA's text-encoder part, "
                                              "if any, goes on a clone of it."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="A plain LoRA in models/loras (kohya, diffusers or ComfyUI naming; UNet and "
                                       "optional text-encoder parts, any rank). LoHa, LoKr, DoRA and other kinds "
                                       "are refused."),
                io.String.Input("source_prompt", default="photo of sks person",
                                tooltip="The LoRA's trigger prompt: what the fine-tuned side is asked to draw, e.g. "
                                        "'photo of sks person' (use the LoRA's trigger words)."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Scales the LoRA (UNet and text encoder), as LoraLoader's strength: 1 = "
                                       "as trained."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The base model with the LoRA (a clone; usable in "
                                                              "KSampler, but not as the SINE Guider's model)."),
                io.Clip.Output(display_name="clip", tooltip="CLIP with the LoRA's text-encoder part (the input CLIP "
                                                            "when it has none)."),
                io.Conditioning.Output(display_name="source_conditioning",
                                       tooltip="source_prompt through that CLIP, for the SINE Guider."),
                AdapterType.Output(display_name="sine_adapter"),
            ],
        )

    @classmethod
    def execute(cls, model, clip, lora_name, source_prompt, strength) -> io.NodeOutput:
        with node_errors(NODE_NAME):
            path = folder_paths.get_full_path_or_raise("loras", lora_name)
            if not path.endswith(".safetensors"):
                raise InputError("lora_name", f"{lora_name} is not a .safetensors file; only safetensors are read")
            try:
                lora_sd = comfy.utils.load_torch_file(path, safe_load=True)
            except Exception as e:  # noqa: BLE001 - safetensors' own error types for a truncated / foreign file
                raise InputError("lora_name", f"{path} is not a readable .safetensors file ({type(e).__name__}: "
                                              f"{e}); it may be truncated (an interrupted download) or another "
                                              "format renamed. Download or save it again") from None
            # SINE-only tensors of a Save SINE Adapter file (grid gate, an older file's optimizer state), which
            # ComfyUI's LoRA loader skips too
            lora_sd = {k: v for k, v in lora_sd.items() if not k.startswith(SINE_ONLY_PREFIX)}
            adapter = lora_adapter(model, clip, lora_sd, lora_name, source_prompt.strip(), strength)
            return io.NodeOutput(*adapter_outputs(model, clip, adapter), adapter)
