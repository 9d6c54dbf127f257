"""Save / Load / Apply SINE Adapter: adapter files in ComfyUI's `loras` folder (readable by the stock LoraLoader),
and a (loaded) adapter turned into the fine-tuned MODEL, CLIP and source conditioning."""
from __future__ import annotations

import os
from dataclasses import replace

import folder_paths
from comfy_api.latest import io

from ..sine_ops.adapter_file import AdapterFileError, is_sine_adapter_file, load_adapter_file, save_adapter_file
from ..sine_ops.sine_adapter import SineAdapter
from . import comfy_compat as compat
from .adapter_glue import adapter_outputs
from .errors import InputError, node_errors
from .types import AdapterType


SUFFIX = ".safetensors"


def _checked_name(name: str) -> str:
    """The relative name (subfolders allowed, no extension) a user typed, or InputError saying what to type."""
    name = name.strip()
    if name.lower().endswith(SUFFIX):
        name = name[: -len(SUFFIX)]
    if "\0" in name:
        raise InputError("filename", "contains a NUL character, which no file system allows; retype the name")
    if not name.strip():
        raise InputError("filename", "is empty; type a name such as 'sine/my_dog'")
    base = os.path.basename(name)
    if base in ("", ".", "..") or name.endswith(("/", os.sep)):
        raise InputError("filename", f"'{name}' names a folder, not a file; add a file name such as "
                                     f"'{name.rstrip('/' + os.sep)}/my_dog'")
    norm = os.path.normpath(name)
    if os.path.isabs(name) or norm == ".." or norm.startswith(".." + os.sep):
        raise InputError("filename", f"'{name}' would leave the loras folder; use a plain name or a subfolder "
                                     "such as 'sine/my_dog'")
    return norm


def _check_name_length(root: str, rel: str, numbered: bool) -> None:
    try:
        limit = os.pathconf(root, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows) or no such folder yet
        limit = 255
    parts = rel.split(os.sep)
    parts[-1] += ("_00001_" if numbered else "") + SUFFIX
    for part in parts:
        if len(os.fsencode(part)) > limit:
            raise InputError("filename", f"'{part[:40]}…' is {len(os.fsencode(part))} bytes long; this file "
                                         f"system allows {limit} per name. Use a shorter name.")


def _check_folders_are_folders(root: str, rel: str) -> None:
    """Every folder part of `rel` is a folder, or absent (then created): never an existing file."""
    parts = rel.split(os.sep)[:-1]
    for i in range(1, len(parts) + 1):
        path = os.path.join(root, *parts[:i])
        if os.path.lexists(path) and not os.path.isdir(path):
            raise InputError("filename", f"'{'/'.join(parts[:i])}' is a file in the loras folder, not a folder, "
                                         "so nothing can be saved inside it; choose another name or subfolder")


def _save_target(name: str, overwrite: bool) -> tuple[str, str]:
    """(loras folder, file path inside it) for `name`: name_00001_.safetensors numbered after the files there
    (ComfyUI's convention), or name.safetensors itself when overwrite is on. The name must stay inside the loras
    folder; a symlinked subfolder takes saves where this ComfyUI allows it (comfy_compat.check_save_folder)."""
    root = os.path.abspath(folder_paths.get_folder_paths("loras")[0])
    rel = _checked_name(name)
    _check_name_length(root, rel, numbered=not overwrite)
    _check_folders_are_folders(root, rel)
    compat.check_save_folder(root, os.path.join(root, os.path.dirname(rel)), "filename")
    if overwrite:
        return root, os.path.join(root, rel + SUFFIX)
    folder, base, counter, _, _ = folder_paths.get_save_image_path(rel, root)
    return root, os.path.join(folder, f"{base}_{counter:05}_{SUFFIX}")


def _check_replaceable(path: str) -> None:
    """Overwrite replaces only a SINE adapter file: never a user's LoRA or model, a folder or a link."""
    if not os.path.lexists(path):
        return
    if os.path.islink(path) or not os.path.isfile(path):
        raise InputError("filename", f"{path} exists and is a link or folder, not a SINE adapter; it is never "
                                     "replaced. Choose another name")
    if not is_sine_adapter_file(path):
        raise InputError("filename", f"{path} exists and is not a SINE adapter (a LoRA or other model); it is "
                                     "never replaced. Choose another name, or turn overwrite off to save a "
                                     "numbered copy")


def save_numbered_or_replace(adapter: SineAdapter, name: str, overwrite: bool) -> tuple[str, str]:
    """Write `adapter` under `name` in models/loras; returns (name as Load SINE Adapter lists it, full path)."""
    for _ in range(100):  # another writer may take a number between the scan and the write: take the next one
        root, path = _save_target(name, overwrite)
        if overwrite:
            _check_replaceable(path)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            save_adapter_file(adapter, path, replace=overwrite, optimizer_sidecar=True)
            break
        except FileExistsError:
            continue
        except AdapterFileError as e:
            raise InputError("sine_adapter", f"{e}") from None
        except OSError as e:
            raise InputError("filename", f"could not write {path}: {e.strerror or e} (check the folder's "
                                         "permissions and free space)") from None
    else:
        raise InputError("filename", f"no free numbered name for '{name}'; choose another name")
    folder_paths.filename_list_cache.pop("loras", None)  # Load SINE Adapter lists the new file at once
    return os.path.relpath(path, root).replace(os.sep, "/"), path


class SaveSineAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SINE_SaveAdapter",
            display_name="Save SINE Adapter",
            category="SINE",
            description="Saves a SINE adapter to models/loras as .safetensors (ComfyUI LoRA key format: a non-patch "
                        "adapter also works in the stock LoraLoader) with its prompt, settings and patch config; "
                        "its optimizer state (to continue training) goes beside it as "
                        "name.sine-optimizer-state. "
                        "Files are numbered as ComfyUI's save nodes number them (name_00001_.safetensors); "
                        "nothing is replaced unless overwrite is on.",
            is_output_node=True,
            inputs=[
                AdapterType.Input("sine_adapter", tooltip="From SINE Finetune."),
                io.String.Input("filename", default="sine/sine_adapter",
                                tooltip="Name inside models/loras; subfolders allowed. Saved as "
                                        "name_00001_.safetensors, the number after the highest one there."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Off: a new numbered file every time. On: save exactly "
                                         "name.safetensors, replacing it only if it is a SINE adapter (a LoRA or "
                                         "other file of that name is never replaced)."),
            ],
            outputs=[io.String.Output(display_name="adapter_name",
                                      tooltip="The written file as Load SINE Adapter lists it."),
                     io.String.Output(display_name="path", tooltip="The written file's full path.")],
        )

    @classmethod
    def execute(cls, sine_adapter, filename, overwrite=False) -> io.NodeOutput:
        with node_errors("Save SINE Adapter"):
            name, path = save_numbered_or_replace(sine_adapter, filename, overwrite)
        return io.NodeOutput(name, path, ui={"text": [path]})


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
            path = folder_paths.get_full_path("loras", adapter_name)
            if path is None:
                raise InputError("adapter_name", f"{adapter_name} is not in models/loras (any more); refresh the "
                                                 "list (press R) and pick a file")
            if not path.endswith(SUFFIX):
                raise InputError("adapter_name", f"{adapter_name} is not a .safetensors file; only safetensors are "
                                                 "read")
            try:
                adapter, _ = load_adapter_file(path)
            except AdapterFileError as e:
                raise InputError("adapter_name", str(e)) from None
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
