"""A fine-tuned SINE model as adapters on its base, and its file format.

File = safetensors in ComfyUI's LoRA key layout, so ComfyUI's stock LoraLoader reads the UNet and text-encoder
parts of a non-patch adapter: `diffusion_model.<module>.lora_down.weight / .lora_up.weight / .alpha` for LoRA,
`.diff / .diff_b` for full fine-tunes (weight deltas), `text_encoders.<module>...` for the text encoder.
SINE-only parts ride along under `sine.` keys (ComfyUI ignores them) and in the `sine` metadata entry.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from .adapters import FullDelta, LoRA
from .config import PatchConfig

FORMAT_VERSION = 1
TE_PREFIX = "text_encoders."
GRID_GATE_KEY = "sine.grid_gate"


class AdapterFileError(ValueError):
    """The file is not a usable SINE adapter (wrong keys, shapes, dtype, or damaged)."""


@dataclass
class SineAdapter:
    """Everything the guided sampler needs from SINE Finetune (or from a saved file)."""
    unet: dict[str, torch.nn.Module]          # "diffusion_model.<path>" -> LoRA | FullDelta
    text_encoder: dict[str, torch.nn.Module]  # "<path in CLIP's cond_stage_model>" -> LoRA | FullDelta
    family: str                               # model family it was trained on: "sd1", "sd2", "sdxl", ...
    source_prompt: str                        # the training caption (SINE feeds it to the fine-tuned model)
    patch: PatchConfig | None = None          # set for patch-based adapters: the grid goes on their rows
    grid_gate: torch.Tensor | None = None     # () learnable grid scale (PatchConfig.grid_gate), else None
    grid_enabled: bool = True                 # sampling-time switch: False = a patch adapter without its grid
    settings: dict = field(default_factory=dict)  # how it was trained, for metadata / the cache key

    def parameters(self):
        for group in (self.unet, self.text_encoder):
            for adapter in group.values():
                yield from adapter.parameters()
        if self.grid_gate is not None:
            yield self.grid_gate

    def requires_grad_(self, flag: bool) -> "SineAdapter":
        for p in self.parameters():
            p.requires_grad_(flag)
        return self

    @property
    def grid_scale(self) -> torch.Tensor | float:
        return 1.0 if self.grid_gate is None else self.grid_gate

    # ---- file format -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        groups = ((self.unet, ""), (self.text_encoder, TE_PREFIX))
        for group, prefix in groups:
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
        if self.grid_gate is not None:
            sd[GRID_GATE_KEY] = self.grid_gate.detach().float().reshape(())
        return sd

    def metadata(self) -> dict[str, str]:
        info = {"format": FORMAT_VERSION, "family": self.family, "source_prompt": self.source_prompt,
                "patch": None if self.patch is None else self.patch.to_dict(), "settings": self.settings}
        return {"sine": json.dumps(info, sort_keys=True), "sine_checksum": checksum(self.state_dict())}

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], metadata: dict[str, str]) -> "SineAdapter":
        """Rebuild from a file's tensors and metadata; every inconsistency raises AdapterFileError."""
        if "sine" not in (metadata or {}):
            raise AdapterFileError("no SINE metadata: this is not a SINE adapter file (a plain LoRA? use LoraLoader)")
        try:
            info = json.loads(metadata["sine"])
        except json.JSONDecodeError as e:
            raise AdapterFileError(f"damaged SINE metadata ({e})") from None
        if info.get("format") != FORMAT_VERSION:
            raise AdapterFileError(f"unsupported SINE adapter format {info.get('format')!r}")
        if "sine_checksum" in metadata and metadata["sine_checksum"] != checksum(sd):
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
        return cls(unet=unet, text_encoder=te, family=info["family"], source_prompt=info["source_prompt"],
                   patch=patch, grid_gate=None if gate is None else torch.nn.Parameter(gate.float().reshape(()),
                                                                                       requires_grad=False),
                   settings=info.get("settings", {}))


def _adapter_from_tensors(key: str, sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    down, up = sd.get(f"{key}.lora_down.weight"), sd.get(f"{key}.lora_up.weight")
    if down is not None or up is not None:
        if down is None or up is None or f"{key}.alpha" not in sd:
            raise AdapterFileError(f"{key}: a LoRA needs lora_down, lora_up and alpha")
        if down.ndim not in (2, 4) or up.ndim != down.ndim or up.shape[1] != down.shape[0] or \
                (up.ndim == 4 and tuple(up.shape[2:]) != (1, 1)):
            raise AdapterFileError(f"{key}: inconsistent LoRA shapes {tuple(down.shape)} / {tuple(up.shape)}")
        rank = down.shape[0]
        shape = (up.shape[0],) + tuple(down.shape[1:])
        try:
            ad = LoRA(shape, rank, float(sd[f"{key}.alpha"]), conv={} if down.ndim == 4 else None)
        except ValueError as e:
            raise AdapterFileError(f"{key}: {e}") from None
        with torch.no_grad():
            ad.down.copy_(down.float())
            ad.up.copy_(up.float())
        return ad
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


def checksum(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and bytes: detects damaged cache and adapter files."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().contiguous().cpu().reshape(-1)
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
