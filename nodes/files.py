"""Save / Load SINE Adapter: .safetensors in ComfyUI's `loras` folder, readable by the stock LoraLoader."""
from __future__ import annotations

import os

import safetensors
import safetensors.torch
import torch

import folder_paths
from comfy_api.latest import io

from ..sine_ops.adapter_set import AdapterFileError, SineAdapter
from .glue import SineNodeError
from .types import AdapterType


def save_adapter_file(adapter: SineAdapter, path: str, extra_metadata: dict[str, str] | None = None) -> None:
    """Atomic write: a crash never leaves a half-written file under the final name."""
    tmp = f"{path}.partial"
    safetensors.torch.save_file(adapter.state_dict(), tmp, metadata={**adapter.metadata(), **(extra_metadata or {})})
    os.replace(tmp, path)


def load_adapter_file(path: str) -> tuple[SineAdapter, dict[str, str]]:
    """Only safetensors are read (no pickle: nothing in a file can run code). Raises AdapterFileError."""
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / non-safetensors files
        raise AdapterFileError(f"not a readable .safetensors file ({type(e).__name__}: {e})") from None
    return SineAdapter.from_state_dict(sd, metadata), metadata


def _save_path(name: str) -> str:
    root = os.path.realpath(folder_paths.get_folder_paths("loras")[0])
    rel = name if name.endswith(".safetensors") else f"{name}.safetensors"
    path = os.path.realpath(os.path.join(root, rel))
    if os.path.commonpath([root, path]) != root or os.path.isabs(name):
        raise SineNodeError(f"Save SINE Adapter: input 'filename': '{name}' would leave the loras folder; use a "
                            "plain name or a subfolder such as 'sine/my_dog'")
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
        path = folder_paths.get_full_path_or_raise("loras", adapter_name)
        if not path.endswith(".safetensors"):
            raise SineNodeError(f"Load SINE Adapter: input 'adapter_name': {adapter_name} is not a .safetensors file; "
                                "only safetensors are read")
        try:
            adapter, _ = load_adapter_file(path)
        except AdapterFileError as e:
            raise SineNodeError(f"Load SINE Adapter: input 'adapter_name': {adapter_name}: {e}") from None
        return io.NodeOutput(adapter)
