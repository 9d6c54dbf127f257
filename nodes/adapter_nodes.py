"""Save / Load / Apply SINE Adapter: adapter files in ComfyUI's `loras` folder (readable by the stock LoraLoader),
and a (loaded) adapter turned into the fine-tuned MODEL, CLIP and source conditioning."""
from __future__ import annotations

import os
from dataclasses import replace

import folder_paths
from comfy_api.latest import io

from ..sine_ops.adapter_file import AdapterFileError, load_adapter_file, save_adapter_file
from ..sine_ops.adapters import RowRouter
from ..sine_ops.sine_adapter import SineAdapter
from . import model_patching as mp
from .errors import InputError, node_errors
from .types import AdapterType


def adapter_outputs(model, clip, adapter: SineAdapter):
    """(fine-tuned MODEL, CLIP, source CONDITIONING) from an adapter, all on clones of the inputs."""
    mp.check_family(adapter, model)
    ft_model = mp.patched_model(model, {0: adapter}, RowRouter())
    ft_model.model_options["transformer_options"][mp.FINETUNED_FLAG] = True  # the guider refuses it as a base
    ft_clip = mp.patched_clip(clip, adapter)
    cond = ft_clip.encode_from_tokens_scheduled(ft_clip.tokenize(adapter.source_prompt))
    return ft_model, ft_clip, cond


def _save_path(name: str) -> str:
    root = os.path.realpath(folder_paths.get_folder_paths("loras")[0])
    rel = name if name.endswith(".safetensors") else f"{name}.safetensors"
    path = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, path]) != root or os.path.isabs(name):
        raise InputError("filename", f"'{name}' would leave the loras folder; use a plain name or a subfolder such "
                                     "as 'sine/my_dog'")
    return path


class SaveSineAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SINE_SaveAdapter",
            display_name="Save SINE Adapter",
            category="SINE",
            description="Saves a SINE adapter to models/loras as .safetensors (ComfyUI LoRA key format: a non-patch "
                        "adapter also works in the stock LoraLoader) with its prompt, settings and patch config.",
            is_output_node=True,
            inputs=[
                AdapterType.Input("sine_adapter", tooltip="From SINE Finetune."),
                io.String.Input("filename", default="sine/sine_adapter",
                                tooltip="Name inside models/loras ('.safetensors' is added); subfolders allowed. "
                                        "An existing file of that name is replaced."),
            ],
            outputs=[io.String.Output(display_name="path", tooltip="The written file.")],
        )

    @classmethod
    def execute(cls, sine_adapter, filename) -> io.NodeOutput:
        with node_errors("Save SINE Adapter"):
            path = _save_path(filename.strip())
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_adapter_file(sine_adapter, path)
        return io.NodeOutput(path, ui={"text": [path]})


class LoadSineAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SINE_LoadAdapter",
            display_name="Load SINE Adapter",
            category="SINE",
            description="Loads a SINE adapter saved by Save SINE Adapter, for the SINE Guider / SINE Apply Adapter.",
            inputs=[io.Combo.Input("adapter_name", options=folder_paths.get_filename_list("loras"),
                                   tooltip="A .safetensors file in models/loras written by Save SINE Adapter.")],
            outputs=[AdapterType.Output(display_name="sine_adapter")],
        )

    @classmethod
    def execute(cls, adapter_name) -> io.NodeOutput:
        with node_errors("Load SINE Adapter"):
            path = folder_paths.get_full_path_or_raise("loras", adapter_name)
            if not path.endswith(".safetensors"):
                raise InputError("adapter_name", f"{adapter_name} is not a .safetensors file; only safetensors are "
                                                 "read")
            try:
                adapter, _ = load_adapter_file(path)
            except AdapterFileError as e:
                raise InputError("adapter_name", f"{adapter_name}: {e}") from None
        return io.NodeOutput(adapter)


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
        with node_errors("SINE Apply Adapter"):
            outputs = adapter_outputs(model, clip, adapter)
        return io.NodeOutput(*outputs, adapter)
