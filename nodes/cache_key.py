"""The fingerprint of a SINE Finetune run: everything that changes what is trained, as one key (the disk cache's
entry names, training_cache's lineages). Stable across restarts: tensors by content, never by id."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import torch

from ..sine_ops.config import FinetuneSettings, PatchConfig
from ..sine_ops.tensor_views import normal_view
from ..sine_ops.training_data import as_rgb

# The modules whose code decides what training produces: their source is part of the key, so an update of the
# pack's training code never reuses an adapter the old code trained.
_TRAINING_CODE = ("sine_ops/training.py", "sine_ops/training_data.py", "sine_ops/adapters.py",
                  "sine_ops/positional_grid.py", "sine_ops/config.py", "sine_ops/sine_adapter.py",
                  "nodes/training_run.py", "nodes/model_patching.py")
_SAMPLE = 4096  # elements of each tensor hashed byte for byte (besides its full sum and sum of squares)


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
    """The MODEL by its base weights and its own patches. The weights are shared by every clone of the checkpoint,
    and a loaded clone (a LoRA prompt run before) may have patched them in place: those are read as the originals
    ComfyUI keeps to unpatch them (ModelPatcher.backup, one dict shared by all clones), never as patched."""
    base = model.model
    return _digest([type(base.model_config).__name__, str(base.get_dtype()), str(base.manual_cast_dtype),
                    _module_digest(base, _originals(model)), _patcher_digest(model)])


def _originals(patcher) -> dict:
    """{weight key: unpatched weight} of the weights some clone of `patcher`'s model has patched in place."""
    return {k: getattr(b, "weight", b) for k, b in dict(getattr(patcher, "backup", None) or {}).items()}


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


def _module_digest(module: torch.nn.Module, originals: dict | None = None) -> str:
    h = hashlib.sha256()
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(name.encode())
        h.update(_tensor_digest((originals or {}).get(name, t)).encode())
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
