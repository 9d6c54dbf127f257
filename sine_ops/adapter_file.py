"""The SINE adapter file: its format, its checks, and its (atomic) write and (safetensors-only) read.

File = safetensors in ComfyUI's LoRA key layout, so ComfyUI's stock LoraLoader reads the UNet and text-encoder
parts of a non-patch adapter: `diffusion_model.<module>.lora_down.weight / .lora_up.weight / .alpha` for LoRA,
`.diff / .diff_b` for full fine-tunes (weight deltas), `text_encoders.<module>...` for the text encoder.
SINE-only parts ride along under `sine.` keys (ComfyUI ignores them) and in the `sine` metadata entry. Two
checksums: `sine_checksum` over the tensors, `sine_metadata_checksum` over every other metadata entry (so a cache
entry's key, stored in its metadata, is checked too).

The AdamW state that lets an adapter continue training is bulky (twice the weights) and would be 'lora key not
loaded' for every stock loader, so a file in the loras folder keeps it in a sidecar file beside it,
`<name>.sine-optimizer-state` (safetensors; an extension ComfyUI lists nowhere), bound to the adapter by its tensor
checksum. Disk-cache entries, which no loader lists, keep it inline under `sine.optim.` keys, as older adapter files
did (still read).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile

import logging

import safetensors
import safetensors.torch
import torch

from .adapters import FullDelta, LoRA
from .config import PatchConfig
from .sine_adapter import SineAdapter

log = logging.getLogger("sine")
FORMAT_VERSION = 1
SIDECAR_SUFFIX = ".sine-optimizer-state"  # the optimizer-state file beside `<name>.safetensors`
SIDECAR_FOR_KEY = "sine_optimizer_state_for"  # sidecar metadata: the adapter tensors' checksum it belongs to
TE_PREFIX = "text_encoders."
GRID_GATE_KEY = "sine.grid_gate"
OPTIM_PREFIX, OPTIM_FIELDS = "sine.optim.", ("step", "exp_avg", "exp_avg_sq")  # AdamW state, to continue training
CHECKSUM_KEY, METADATA_CHECKSUM_KEY = "sine_checksum", "sine_metadata_checksum"
# The temporary file of an atomic write: hidden, and not ending in an extension ComfyUI lists (.safetensors)
TEMP_PREFIX, TEMP_SUFFIX = ".sine-", ".partial"
# A layer path component: a module attribute or a ModuleList index. Names of nn.Module's own attributes
# (forward, to, state_dict...) are not layers: a key naming one would patch a method.
_PATH_PART = re.compile(r"[A-Za-z][A-Za-z0-9_]*|\d+")
_MODULE_ATTRS = frozenset(dir(torch.nn.Module))


class AdapterFileError(ValueError):
    """The file is not a usable SINE adapter (wrong keys, shapes, dtype, values or metadata, or damaged)."""


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
    for name, state in (adapter.optimizer_state or {}).items():
        for field, t in state.items():
            sd[f"{OPTIM_PREFIX}{name}.{field}"] = t.detach().float().reshape(t.shape).contiguous()
    return sd


def split_optimizer_state(sd: dict[str, torch.Tensor]):
    """(adapter tensors, optimizer state {parameter name: {field: tensor}} or None) of a file's tensors: the
    optional `sine.optim.<parameter>.<step|exp_avg|exp_avg_sq>` keys let a saved adapter continue training."""
    state: dict[str, dict[str, torch.Tensor]] = {}
    for k in [k for k in sd if k.startswith(OPTIM_PREFIX)]:
        name, _, field = k[len(OPTIM_PREFIX):].rpartition(".")
        if not name or field not in OPTIM_FIELDS:
            raise AdapterFileError(f"unexpected optimizer-state key {k!r}")
        state.setdefault(name, {})[field] = sd[k].float()
    return {k: v for k, v in sd.items() if not k.startswith(OPTIM_PREFIX)}, state or None


def non_finite_tensor(sd: dict[str, torch.Tensor]) -> str | None:
    """The name of the first tensor holding NaN/Inf, or None. One read per device the tensors are on (a read per
    tensor would be a host sync each on a GPU: over a thousand per saved SD1.5 LoRA)."""
    by_device: dict[torch.device, list[str]] = {}
    for k in sorted(sd):
        by_device.setdefault(sd[k].device, []).append(k)
    bad = []
    for names in by_device.values():
        finite = torch.stack([torch.isfinite(sd[k]).all() for k in names])
        if not bool(finite.all()):  # which ones: read only on the way to an error
            bad += [k for k, ok in zip(names, finite.tolist()) if not ok]
    return min(bad, default=None)


def check_finite(adapter: SineAdapter) -> None:
    """Raises AdapterFileError when a weight is NaN/Inf: such an adapter renders black or noise."""
    bad = non_finite_tensor(state_dict(adapter))
    if bad is not None:
        raise AdapterFileError(f"the adapter's tensor {bad} holds NaN/Inf values (training diverged)")


def metadata(adapter: SineAdapter, sd: dict[str, torch.Tensor],
             extra: dict[str, str] | None = None) -> dict[str, str]:
    info = {"format": FORMAT_VERSION, "family": adapter.family, "source_prompt": adapter.source_prompt,
            "patch": None if adapter.patch is None else adapter.patch.to_dict(), "settings": adapter.settings}
    meta = {"sine": json.dumps(info, sort_keys=True), **(extra or {})}
    return {**meta, CHECKSUM_KEY: checksum(sd), METADATA_CHECKSUM_KEY: metadata_checksum(meta)}


def from_state_dict(sd: dict[str, torch.Tensor], meta: dict[str, str],
                    require_checksums: bool = False) -> SineAdapter:
    """Rebuild from a file's tensors and metadata; every inconsistency raises AdapterFileError naming the field.

    require_checksums: refuse a file without both checksums (cache entries: always written with them). Files
    saved by hand-edited tools may lack them and are still read when their content passes every other check."""
    info = _checked_info(meta)
    _check_checksums(sd, meta, require_checksums)
    for k, t in sd.items():
        if not t.dtype.is_floating_point:
            raise AdapterFileError(f"tensor {k} has dtype {t.dtype}, expected floating point")
    bad = non_finite_tensor(sd)
    if bad is not None:
        raise AdapterFileError(f"tensor {bad} holds NaN/Inf values: the adapter is unusable")
    sd, optimizer_state = split_optimizer_state(sd)
    unet, te = {}, {}
    modules = sorted({k.rsplit(".", 2)[0] if k.endswith((".lora_down.weight", ".lora_up.weight"))
                      else k.rsplit(".", 1)[0] for k in sd if k != GRID_GATE_KEY})
    for key in modules:
        _check_layer_path(key)
        group, path = (te, key[len(TE_PREFIX):]) if key.startswith(TE_PREFIX) else (unet, key)
        group[path] = _adapter_from_tensors(key, sd)
    used = {k for k in sd if k == GRID_GATE_KEY} | {k for k in sd for m in modules if k.startswith(m + ".")}
    if used != set(sd):
        raise AdapterFileError(f"unexpected keys: {sorted(set(sd) - used)[:5]}")
    if not unet and not te:
        raise AdapterFileError("the file holds no adapter weights")
    gate = sd.get(GRID_GATE_KEY)
    if gate is not None and (gate.numel() != 1 or info["patch"] is None):
        raise AdapterFileError(f"tensor {GRID_GATE_KEY} must be one value, and only in a patch adapter")
    return SineAdapter(unet=unet, text_encoder=te, family=info["family"], source_prompt=info["source_prompt"],
                       patch=info["patch"], grid_gate=None if gate is None else
                       torch.nn.Parameter(gate.float().reshape(()), requires_grad=False),
                       settings=info["settings"], optimizer_state=optimizer_state)


def _checked_info(meta: dict[str, str]) -> dict:
    """The `sine` metadata entry, every field checked: family, source_prompt, settings, patch (a PatchConfig)."""
    if "sine" not in (meta or {}):
        raise AdapterFileError("no SINE metadata: this is not a SINE adapter file (a plain LoRA? use LoraLoader)")
    try:
        info = json.loads(meta["sine"])
    except json.JSONDecodeError as e:
        raise AdapterFileError(f"damaged SINE metadata: 'sine' is not JSON ({e})") from None
    if not isinstance(info, dict):
        raise AdapterFileError(f"damaged SINE metadata: 'sine' is a {type(info).__name__}, expected an object")
    if info.get("format") != FORMAT_VERSION:
        raise AdapterFileError(f"SINE metadata field 'format': unsupported version {info.get('format')!r} "
                               f"(this pack reads version {FORMAT_VERSION})")
    for field in ("family", "source_prompt"):
        if not isinstance(info.get(field), str) or not info[field].strip():
            raise AdapterFileError(f"SINE metadata field '{field}' is {_shown(info.get(field))}, expected a "
                                   "non-empty text")
    settings = info.get("settings", {})
    if not isinstance(settings, dict):
        raise AdapterFileError(f"SINE metadata field 'settings' is {_shown(settings)}, expected an object")
    return {**info, "settings": settings, "patch": _checked_patch(info.get("patch"))}


def _checked_patch(raw) -> PatchConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise AdapterFileError(f"SINE metadata field 'patch' is {_shown(raw)}, expected an object or null")
    for name, field in PatchConfig.__dataclass_fields__.items():
        if name in raw and not _has_type(raw[name], type(field.default)):
            raise AdapterFileError(f"SINE metadata field 'patch.{name}' is {_shown(raw[name])}, expected "
                                   f"{type(field.default).__name__}")
    patch = PatchConfig.from_dict(raw)
    try:
        patch.validate()
    except ValueError as e:
        raise AdapterFileError(f"SINE metadata field 'patch': {e}") from None
    if not patch.working_size or not patch.train_resolution:
        raise AdapterFileError("SINE metadata field 'patch': working_size and train_resolution must be set")
    return patch


def _has_type(value, expected: type) -> bool:
    if expected is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, expected)


def _shown(value) -> str:
    return "missing" if value is None else f"{json.dumps(value)[:60]} ({type(value).__name__})"


def _check_layer_path(key: str) -> None:
    parts = key.split(".")
    if not all(_PATH_PART.fullmatch(p) and p not in _MODULE_ATTRS for p in parts):
        raise AdapterFileError(f"key {key!r} does not name a layer (each part must be a layer name or an index, "
                               "never a method or private attribute)")


def _check_checksums(sd, meta, required: bool) -> None:
    for name, expected in ((CHECKSUM_KEY, lambda: checksum(sd)), (METADATA_CHECKSUM_KEY, lambda: metadata_checksum(meta))):
        if name not in meta:
            if required:
                raise AdapterFileError(f"metadata field '{name}' is missing")
        elif meta[name] != expected():
            raise AdapterFileError(f"checksum mismatch ({name}): the file is damaged")


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
    if alpha.numel() != 1 or not float(alpha) > 0:
        raise AdapterFileError(f"{key}.alpha must be one positive value, got {alpha.flatten()[:3].tolist()}")
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


def metadata_checksum(meta: dict[str, str]) -> str:
    """sha256 over every metadata entry but the two checksums."""
    kept = {k: v for k, v in meta.items() if k not in (CHECKSUM_KEY, METADATA_CHECKSUM_KEY)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True).encode()).hexdigest()


# ---- files ----------------------------------------------------------------------------------------------------------
def is_sine_adapter_file(path: str) -> bool:
    """Whether `path` is a safetensors file with SINE metadata (read from the header only)."""
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            return "sine" in (f.metadata() or {})
    except Exception:  # safetensors' own error types: not a safetensors file at all
        return False


def save_adapter_file(adapter: SineAdapter, path: str, extra_metadata: dict[str, str] | None = None,
                      replace: bool = True, optimizer_sidecar: bool = False) -> None:
    """Atomic write: a temporary name in the same folder (not listed by ComfyUI), flushed, then renamed; a crash
    never leaves a half-written file under the final name. replace=False never replaces an existing file (raises
    FileExistsError, also when another writer got there first). Refuses NaN/Inf weights (AdapterFileError).
    optimizer_sidecar: the optimizer state goes to sidecar_path(path) (replaced, or removed when there is none)
    instead of into the file, so stock LoRA loaders read the file without unknown keys."""
    sd = state_dict(adapter)
    bad = non_finite_tensor(sd)
    if bad is not None:
        raise AdapterFileError(f"the adapter's tensor {bad} holds NaN/Inf values (training diverged); not saved")
    optim = {k: v for k, v in sd.items() if k.startswith(OPTIM_PREFIX)} if optimizer_sidecar else {}
    sd = {k: v for k, v in sd.items() if k not in optim}
    _write_atomically(sd, metadata(adapter, sd, extra_metadata), path, replace)
    if not optimizer_sidecar:
        return
    sidecar = sidecar_path(path)
    if optim:
        _write_atomically(optim, {SIDECAR_FOR_KEY: checksum(sd), CHECKSUM_KEY: checksum(optim)}, sidecar, True)
    elif os.path.lexists(sidecar):
        os.remove(sidecar)  # the state of an adapter this file no longer holds


def sidecar_path(path: str) -> str:
    return (path[:-len(".safetensors")] if path.endswith(".safetensors") else path) + SIDECAR_SUFFIX


def _write_atomically(sd: dict[str, torch.Tensor], meta: dict[str, str], path: str, replace: bool) -> None:
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=os.path.dirname(path) or ".")
    os.close(fd)
    try:
        safetensors.torch.save_file(sd, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _publish(tmp, path, replace)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _publish(tmp: str, path: str, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails with FileExistsError instead of replacing: no check-then-write race
    except FileExistsError:
        raise
    except OSError:  # file systems without hard links (FAT, some network shares)
        if os.path.lexists(path):
            raise FileExistsError(path) from None
        os.replace(tmp, path)


def load_adapter_file(path: str, require_checksums: bool = False) -> tuple[SineAdapter, dict[str, str]]:
    """Only safetensors are read (no pickle: nothing in a file can run code). Raises AdapterFileError naming the
    file and what is wrong. The optimizer state comes from the file or else its sidecar (a sidecar that does not
    belong to this file, or is damaged, is skipped with a warning: the adapter itself is intact)."""
    meta, sd = _read(path)
    try:
        adapter = from_state_dict(sd, meta, require_checksums)
    except AdapterFileError as e:
        raise AdapterFileError(f"{path}: {e}") from None
    if adapter.optimizer_state is None:
        adapter.optimizer_state = _sidecar_state(path, sd)
    return adapter, meta


def _read(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    try:
        with safetensors.safe_open(path, framework="pt", device="cpu") as f:
            return f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated / non-safetensors files
        raise AdapterFileError(f"{path}: not a readable .safetensors file ({type(e).__name__}: {e}); it may be "
                               "truncated (an interrupted copy) or another format renamed") from None


def _sidecar_state(path: str, sd: dict[str, torch.Tensor]) -> dict | None:
    """The optimizer state in `path`'s sidecar, or None: no sidecar, or one that is not usable (warned)."""
    sidecar = sidecar_path(path)
    if not os.path.exists(sidecar):
        return None
    try:
        meta, optim = _read(sidecar)
        if meta.get(SIDECAR_FOR_KEY) != checksum(sd):
            raise AdapterFileError("it belongs to another version of the adapter file")
        if meta.get(CHECKSUM_KEY) != checksum(optim) or non_finite_tensor(optim) is not None:
            raise AdapterFileError("it is damaged")
        rest, state = split_optimizer_state(optim)
        if rest:
            raise AdapterFileError(f"unexpected keys {sorted(rest)[:3]}")
    except AdapterFileError as e:
        log.warning(f"SINE: optimizer state {sidecar} is not used ({e}); the adapter loads without it, and "
                    "continuing its training restarts AdamW")
        return None
    return state
