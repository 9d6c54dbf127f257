"""SINE Finetune's disk cache (models/sine_cache): unchanged inputs reuse the trained adapter after a restart."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict

import torch

import folder_paths

from ..sine_ops.adapter_file import AdapterFileError, load_adapter_file, save_adapter_file
from ..sine_ops.config import FinetuneSettings, PatchConfig
from ..sine_ops.sine_adapter import SineAdapter
from ..sine_ops.training_data import as_rgb

log = logging.getLogger("sine")


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


def _path(key: str) -> str:
    return os.path.join(cache_dir(), f"{key}.safetensors")


def load_cached(key: str) -> tuple[SineAdapter, list[float]] | None:
    """The cached adapter and its losses, or None (absent, or damaged: then the entry is removed)."""
    path = _path(key)
    if not os.path.exists(path):
        return None
    try:
        adapter, extra = load_adapter_file(path)
        return adapter, json.loads(extra.get("sine_losses", "[]"))
    except (AdapterFileError, ValueError, OSError) as e:
        log.warning(f"SINE Finetune: cache entry {path} is damaged ({e}); retraining")
        os.remove(path)
        return None


def store(key: str, adapter: SineAdapter, losses: list[float]) -> None:
    os.makedirs(cache_dir(), exist_ok=True)
    save_adapter_file(adapter, _path(key), extra_metadata={"sine_losses": json.dumps(losses)})
