"""SINE Finetune's disk cache (models/sine_cache): unchanged inputs reuse the trained adapter after a restart.

An entry is `<key>.safetensors`, an adapter file whose checked metadata holds its key: a damaged, foreign (another
entry copied over it) or stale (older format) entry is deleted and the adapter retrained. The key covers everything
that changes what is trained (see cache_key). The folder is kept under a size limit, least recently used entries
going first (a hit touches its entry). Writing is best effort: a read-only or full disk costs the cache, never the
trained adapter.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

import folder_paths

from ..sine_ops.adapter_file import TEMP_SUFFIX, AdapterFileError, load_adapter_file, save_adapter_file
from ..sine_ops.config import FinetuneSettings, PatchConfig
from ..sine_ops.sine_adapter import SineAdapter
from ..sine_ops.tensor_views import normal_view
from ..sine_ops.training_data import as_rgb

log = logging.getLogger("sine")

KEY_FIELD, LOSSES_FIELD = "sine_cache_key", "sine_losses"
# Size limit of models/sine_cache in GB (SINE_CACHE_LIMIT_GB overrides). A LoRA entry is 3-50 MB, but a full
# fine-tune entry is a copy of the trained layers (SD1.5 UNet: 3.4 GB, paper preset ~4.7 GB): 8 GB keeps one
# paper-preset entry or hundreds of LoRA entries without filling a small disk.
DEFAULT_LIMIT_GB = 8.0
LIMIT_ENV = "SINE_CACHE_LIMIT_GB"
STALE_TEMP_S = 3600  # temporary files of a write that crashed are removed after an hour
# The modules whose code decides what training produces: their source is part of the key, so an update of the
# pack's training code never reuses an adapter the old code trained.
_TRAINING_CODE = ("sine_ops/training.py", "sine_ops/training_data.py", "sine_ops/adapters.py",
                  "sine_ops/positional_grid.py", "sine_ops/config.py", "sine_ops/sine_adapter.py",
                  "nodes/training_run.py", "nodes/model_patching.py")
_SAMPLE = 4096  # elements of each tensor hashed byte for byte (besides its full sum and sum of squares)


def cache_dir() -> str:
    return os.path.join(folder_paths.models_dir, "sine_cache")


def limit_bytes() -> int:
    try:
        return int(float(os.environ.get(LIMIT_ENV, DEFAULT_LIMIT_GB)) * 1024 ** 3)
    except ValueError:
        log.warning(f"SINE: {LIMIT_ENV}={os.environ[LIMIT_ENV]!r} is not a number; using {DEFAULT_LIMIT_GB} GB")
        return int(DEFAULT_LIMIT_GB * 1024 ** 3)


# ---- the key --------------------------------------------------------------------------------------------------------
def cache_key(model, clip, image, source_prompt, settings: FinetuneSettings, patch: PatchConfig | None,
              vae=None, extra: dict | None = None) -> str:
    """Everything that changes the trained adapter: the image, prompt, settings and patch config; the UNet's and
    text encoder's effective weights (content of the weights and of every patch on them, object patches, model
    options); the CLIP's layer (CLIP Set Last Layer) and tokenizer settings; the VAE that encodes the image; the
    pack's training code. `extra`: further JSON-able inputs of the caller."""
    h = hashlib.sha256()
    h.update(as_rgb(image).contiguous().float().cpu().numpy().tobytes())
    h.update(json.dumps({"prompt": source_prompt, "settings": asdict(settings), "extra": extra,
                         "patch": None if patch is None else patch.to_dict()}, sort_keys=True, default=str).encode())
    for part in (_training_code_digest(), model_digest(model), clip_digest(clip, source_prompt),
                 "no vae" if vae is None else vae_digest(vae)):
        h.update(part.encode())
    return h.hexdigest()[:32]


def model_digest(model) -> str:
    base = model.model
    return _digest([type(base.model_config).__name__, str(base.get_dtype()), str(base.manual_cast_dtype),
                    _module_digest(base), _patcher_digest(model)])


def clip_digest(clip, prompt: str) -> str:
    """The CLIP by what it gives the training: the prompt's conditioning (which every weight, patch, layer choice
    and tokenizer option it uses shows in), and its patches. Not its raw weights: a checkpoint without some
    unused CLIP weights (SD1.x has no text projection) leaves them uninitialised, different after every load."""
    with torch.inference_mode():
        conds = clip.encode_from_tokens_scheduled(clip.tokenize(prompt))
    # fp16 bytes: the same CLIP gives the same digest even where kernels differ in the last bits
    rounded = [(c.half(), {k: v.half() if torch.is_tensor(v) and v.is_floating_point() else v
                           for k, v in sorted(extra.items())}) for c, extra in conds]
    return _digest([clip.layer_idx, clip.tokenizer_options, rounded, _patcher_digest(clip.patcher)])


def vae_digest(vae) -> str:
    return _digest([str(getattr(vae, "vae_dtype", None)), _module_digest(vae.first_stage_model),
                    _patcher_digest(vae.patcher)])


def _patcher_digest(patcher) -> str:
    """Weight patches (LoRAs etc., by content and strengths), object patches and model options of a ModelPatcher."""
    return _digest([sorted(patcher.patches.items()), sorted(patcher.object_patches.items()),
                    patcher.model_options])


def _module_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(_tensor_digest(t).encode())
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> str:
    """dtype, shape, float64 sum and sum of squares of all elements, and the bytes of a strided sample: any
    weight change worth a cache miss changes one of them. Read through a view of the storage: a model weight may
    be in the state a GPU offload outside inference mode leaves it, where any other view fails (tensor_views)."""
    t = normal_view(t) if type(t) in (torch.Tensor, torch.nn.Parameter) else t.detach()  # subclasses: as they are
    flat = t.reshape(-1)
    head = f"{t.dtype}{tuple(t.shape)}"
    if not t.is_floating_point():
        return head + hashlib.sha256(flat.cpu().numpy().tobytes()).hexdigest()
    f = flat.float()
    sample = f[:: max(1, f.numel() // _SAMPLE)].cpu().numpy().tobytes()
    stats = torch.stack([f.sum(dtype=torch.float64), (f.double() ** 2).sum()]).tolist() if f.numel() else []
    return head + repr(stats) + hashlib.sha256(sample).hexdigest()


def _digest(obj) -> str:
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj) -> None:
    """Stable across restarts: tensors by content, containers recursively, weight adapters (objects with
    `weights`, e.g. a loaded LoRA) by their tensors, any other object by its type name (never its id)."""
    if torch.is_tensor(obj):
        h.update(_tensor_digest(obj).encode())
    elif isinstance(obj, (str, int, float, bool, type(None))):
        h.update(repr(obj).encode())
    elif isinstance(obj, dict):
        h.update(b"{")
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
        h.update(b"}")
    elif isinstance(obj, (list, tuple, set, frozenset)):
        h.update(b"[")
        for item in (sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj):
            _feed(h, item)
        h.update(b"]")
    else:
        h.update(f"<{type(obj).__module__}.{type(obj).__qualname__}".encode())
        if hasattr(obj, "weights"):
            _feed(h, getattr(obj, "weights"))
        h.update(b">")


_code_digest: str | None = None


def _training_code_digest() -> str:
    global _code_digest
    if _code_digest is None:
        root = Path(__file__).resolve().parent.parent
        _code_digest = _digest([(p, (root / p).read_bytes().decode("utf-8", "replace")) for p in _TRAINING_CODE])
    return _code_digest


# ---- entries --------------------------------------------------------------------------------------------------------
def entry_path(key: str) -> str:
    """The file of `key`'s entry."""
    return os.path.join(cache_dir(), f"{key}.safetensors")


def keys_with_prefix(prefix: str) -> list[str]:
    """Keys of the entries whose key starts with `prefix` (e.g. every step count of one continued run)."""
    try:
        names = os.listdir(cache_dir())
    except OSError:
        return []
    return [n[:-len(".safetensors")] for n in names if n.startswith(prefix) and n.endswith(".safetensors")]


def load_cached(key: str) -> tuple[SineAdapter, list[float]] | None:
    """The cached adapter and its losses, or None: absent, or damaged / foreign / stale (then the entry is
    removed, so the next run trains and writes a good one)."""
    path = entry_path(key)
    if not os.path.exists(path):
        return None
    try:
        adapter, meta = load_adapter_file(path, require_checksums=True)
        if meta.get(KEY_FIELD) != key:
            raise AdapterFileError(f"it belongs to key {meta.get(KEY_FIELD)!r}, not {key} (a copied or stale "
                                   "entry)")
        losses = json.loads(meta.get(LOSSES_FIELD, "[]"))
        if not isinstance(losses, list) or not all(isinstance(v, (int, float)) for v in losses):
            raise AdapterFileError(f"metadata field '{LOSSES_FIELD}' is not a list of numbers")
    except (AdapterFileError, ValueError, OSError) as e:
        log.warning(f"SINE Finetune: cache entry {path} is unusable ({e}); removing it and retraining")
        _remove(path)
        return None
    _touch(path)
    return adapter, [float(v) for v in losses]


def store(key: str, adapter: SineAdapter, losses: list[float]) -> bool:
    """Write the entry (atomically) and trim the folder to its size limit. Never raises for a failed write: logs
    one warning naming the folder and returns False (the caller still has the trained adapter)."""
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        save_adapter_file(adapter, entry_path(key), extra_metadata={KEY_FIELD: key, LOSSES_FIELD: json.dumps(losses)})
    except Exception as e:  # best effort: a full or read-only disk must not cost the trained adapter
        log.warning(f"SINE Finetune: could not write the disk cache in {cache_dir()} ({type(e).__name__}: {e}); "
                    "the adapter is used but will be retrained after a restart. Free space or make the folder "
                    "writable, or turn SINE Finetune's disk_cache off.")
        return False
    evict(keep=entry_path(key))
    return True


def evict(keep: str | None = None) -> list[str]:
    """Remove least recently used entries until the folder fits its size limit (never `keep`), and temporary
    files of crashed writes. Returns the removed paths."""
    files = []
    try:
        for entry in os.scandir(cache_dir()):
            st = entry.stat()
            files.append((st.st_mtime, st.st_size, entry.path))
    except OSError:  # no folder yet, or it vanished / went unreadable meanwhile: nothing to trim now
        return []
    now = time.time()
    removed = [p for m, _, p in files if p.endswith(TEMP_SUFFIX) and now - m > STALE_TEMP_S and _remove(p)]
    live = sorted(f for f in files if f[2].endswith(".safetensors"))
    total = sum(size for _, size, _ in live)
    for _, size, path in live:
        if total <= limit_bytes():
            break
        if path != keep and _remove(path):
            total -= size
            removed.append(path)
    return removed


def _touch(path: str) -> None:
    try:
        os.utime(path)  # least recently USED: a hit makes the entry the newest
    except OSError:
        pass  # a read-only cache still serves hits


def _remove(path: str) -> bool:
    try:
        os.remove(path)
        return True
    except OSError as e:
        log.warning(f"SINE Finetune: could not remove {path} ({e})")
        return False
