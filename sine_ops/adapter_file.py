"""The SINE adapter file: its format, and its (atomic) write and (safetensors-only) read.

File = safetensors in ComfyUI's LoRA key layout, so ComfyUI's stock LoraLoader reads the UNet and text-encoder
parts of a non-patch adapter: `diffusion_model.<module>.lora_down.weight / .lora_up.weight / .alpha` for LoRA,
`.diff / .diff_b` for full fine-tunes (weight deltas), `text_encoders.<module>...` for the text encoder.
SINE-only parts ride along under `sine.` keys (ComfyUI ignores them) and in the `sine` metadata entry, with a
checksum of the tensors in `sine_checksum`.
"""
from __future__ import annotations

import hashlib
import json
import os

import safetensors
import safetensors.torch
import torch

from .adapters import FullDelta, LoRA
from .config import PatchConfig
from .sine_adapter import SineAdapter

FORMAT_VERSION = 1
TE_PREFIX = "text_encoders."
GRID_GATE_KEY = "sine.grid_gate"


class AdapterFileError(ValueError):
    """The file is not a usable SINE adapter (wrong keys, shapes, dtype, or damaged)."""


# ---- adapter <-> tensors + metadata ---------------------------------------------------------------------------------
def state_dict(adapter: SineAdapter) -> dict[str, torch.Tensor]:
    sd = {}
    for group, prefix in ((adapter.unet, ""), (adapter.text_encoder, TE_PREFIX)):
        for path, ad in group.items():
            key = prefix + path
            if isinstance(ad, LoRA):
                sd[f"{key}.lora_down.weight"] = ad.down.detach().float().contiguous()
                sd[f"{key}.lora_up.weight"] = ad.up.detach().float().contiguous()
                sd[f"{key}.alpha"] = torch.tensor(float(ad.alpha))
            else:
                sd[f"{key}.diff"] = ad.weight.detach().float().contiguous()
                if ad.bias is not None:
                    sd[f"{key}.diff_b"] = ad.bias.detach().float().contiguous()
    if adapter.grid_gate is not None:
        sd[GRID_GATE_KEY] = adapter.grid_gate.detach().float().reshape(())
    return sd


def metadata(adapter: SineAdapter, sd: dict[str, torch.Tensor]) -> dict[str, str]:
    info = {"format": FORMAT_VERSION, "family": adapter.family, "source_prompt": adapter.source_prompt,
            "patch": None if adapter.patch is None else adapter.patch.to_dict(), "settings": adapter.settings}
    return {"sine": json.dumps(info, sort_keys=True), "sine_checksum": checksum(sd)}


def from_state_dict(sd: dict[str, torch.Tensor], meta: dict[str, str]) -> SineAdapter:
    """Rebuild from a file's tensors and metadata; every inconsistency raises AdapterFileError."""
    if "sine" not in (meta or {}):
        raise AdapterFileError("no SINE metadata: this is not a SINE adapter file (a plain LoRA? use LoraLoader)")
    try:
        info = json.loads(meta["sine"])
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"damaged SINE metadata ({e})") from None
    if info.get("format") != FORMAT_VERSION:
        raise AdapterFileError(f"unsupported SINE adapter format {info.get('format')!r}")
    if "sine_checksum" in meta and meta["sine_checksum"] != checksum(sd):
        raise AdapterFileError("checksum mismatch: the file is damaged")
    for k, t in sd.items():
        if not t.dtype.is_floating_point:
            raise AdapterFileError(f"tensor {k} has dtype {t.dtype}, expected floating point")
    unet, te = {}, {}
    modules = sorted({k.rsplit(".", 2)[0] if k.endswith((".lora_down.weight", ".lora_up.weight"))
                      else k.rsplit(".", 1)[0] for k in sd if k != GRID_GATE_KEY})
    for key in modules:
        group, path = (te, key[len(TE_PREFIX):]) if key.startswith(TE_PREFIX) else (unet, key)
        group[path] = _adapter_from_tensors(key, sd)
    used = {k for k in sd if k == GRID_GATE_KEY} | {k for k in sd for m in modules if k.startswith(m + ".")}
    if used != set(sd):
        raise AdapterFileError(f"unexpected keys: {sorted(set(sd) - used)[:5]}")
    if not unet and not te:
        raise AdapterFileError("the file holds no adapter weights")
    patch = None if info.get("patch") is None else PatchConfig.from_dict(info["patch"])
    gate = sd.get(GRID_GATE_KEY)
    return SineAdapter(unet=unet, text_encoder=te, family=info["family"], source_prompt=info["source_prompt"],
                       patch=patch, grid_gate=None if gate is None else
                       torch.nn.Parameter(gate.float().reshape(()), requires_grad=False),
                       settings=info.get("settings", {}))


def _adapter_from_tensors(key: str, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    down, up = sd.get(f"{key}.lora_down.weight"), sd.get(f"{key}.lora_up.weight")
    if down is not None or up is not None:
        return _lora_from_tensors(key, down, up, sd.get(f"{key}.alpha"))
    diff = sd.get(f"{key}.diff")
    if diff is None or diff.ndim not in (2, 4):
        raise AdapterFileError(f"{key}: expected lora_down/lora_up/alpha or a 2-D/4-D diff tensor")
    bias = sd.get(f"{key}.diff_b")
    if bias is not None and tuple(bias.shape) != (diff.shape[0],):
        raise AdapterFileError(f"{key}: diff_b shape {tuple(bias.shape)} does not match diff {tuple(diff.shape)}")
    ad = FullDelta(tuple(diff.shape), None if bias is None else tuple(bias.shape), conv={} if diff.ndim == 4 else None)
    with torch.no_grad():
        ad.weight.copy_(diff.float())
        if bias is not None:
            ad.bias.copy_(bias.float())
    return ad


def _lora_from_tensors(key: str, down, up, alpha) -> LoRA:
    if down is None or up is None or alpha is None:
        raise AdapterFileError(f"{key}: a LoRA needs lora_down, lora_up and alpha")
    if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or \
            (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
        raise AdapterFileError(f"{key}: inconsistent LoRA shapes {tuple(down.shape)} / {tuple(up.shape)}")
    shape = (up.shape[0],) + tuple(down.shape[1:])
    try:
        ad = LoRA(shape, down.shape[0], float(alpha), conv={} if down.ndim == 4 else None)
    except ValueError as e:
        raise AdapterFileError(f"{key}: {e}") from None
    with torch.no_grad():
        ad.down.copy_(down.float())
        ad.up.copy_(up.float())
    return ad


def checksum(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and bytes: detects damaged cache and adapter files."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().contiguous().cpu().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---- files ----------------------------------------------------------------------------------------------------------
def save_adapter_file(adapter: SineAdapter, path: str, extra_metadata: dict[str, str] | None = None) -> None:
    """Atomic write: a temporary name in the same folder, then a rename; a crash never leaves a half-written file
    under the final name."""
    sd = state_dict(adapter)
    tmp = f"{path}.partial"
    try:
        safetensors.torch.save_file(sd, tmp, metadata={**metadata(adapter, sd), **(extra_metadata or {})})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_adapter_file(path: str) -> tuple[SineAdapter, dict[str, str]]:
    """Only safetensors are read (no pickle: nothing in a file can run code). Raises AdapterFileError."""
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            sd = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / non-safetensors files
        raise AdapterFileError(f"not a readable .safetensors file ({type(e).__name__}: {e})") from None
    return from_state_dict(sd, meta), meta
