"""SINE Finetune's disk cache (models/sine_cache): unchanged inputs reuse the trained adapter after a restart.

An entry is `<key>.safetensors`, an adapter file whose checked metadata holds its key: a damaged, foreign (another
entry copied over it) or stale (older format) entry is deleted and the adapter retrained. The key covers everything
that changes what is trained (nodes/cache_key.py). The folder is kept under a size limit, least recently used entries
going first (a hit touches its entry). Writing is best effort: a read-only or full disk costs the cache, never the
trained adapter.
"""
from __future__ import annotations

import json
import logging
import os
import time

import safetensors

import folder_paths

from ..sine_ops.adapter_file import TEMP_SUFFIX, AdapterFileError, load_adapter_file, save_adapter_file
from ..sine_ops.sine_adapter import SineAdapter

log = logging.getLogger("sine")

KEY_FIELD, LOSSES_FIELD = "sine_cache_key", "sine_losses"
UNFINISHED_SUFFIX = "-resume"  # key ending of an unfinished training state: evicted first, never in place of others
# Size limit of models/sine_cache in GB (SINE_CACHE_LIMIT_GB overrides). A LoRA entry is 3-50 MB, but a full
# fine-tune entry is a copy of the trained layers (SD1.5 UNet: 3.4 GB, paper preset ~4.7 GB): 8 GB keeps one
# paper-preset entry or hundreds of LoRA entries without filling a small disk.
DEFAULT_LIMIT_GB = 8.0
LIMIT_ENV = "SINE_CACHE_LIMIT_GB"
STALE_TEMP_S = 3600  # temporary files of a write that crashed are removed after an hour


def cache_dir() -> str:
    return os.path.join(folder_paths.models_dir, "sine_cache")


def limit_bytes() -> int:
    try:
        return int(float(os.environ.get(LIMIT_ENV, DEFAULT_LIMIT_GB)) * 1024 ** 3)
    except ValueError:
        log.warning(f"SINE: {LIMIT_ENV}={os.environ[LIMIT_ENV]!r} is not a number; using {DEFAULT_LIMIT_GB} GB")
        return int(DEFAULT_LIMIT_GB * 1024 ** 3)


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


def entry_steps(key: str) -> int | None:
    """The trained steps an entry records (read from its header only), or None: absent or unreadable."""
    try:
        with safetensors.safe_open(entry_path(key), framework="pt", device="cpu") as f:
            steps = json.loads((f.metadata() or {}).get("sine", "{}")).get("settings", {}).get("steps")
    except Exception:  # noqa: BLE001 - safetensors' own error types; absent, damaged or foreign: not a start
        return None
    return steps if isinstance(steps, int) else None


def store(key: str, adapter: SineAdapter, losses: list[float], finished: bool = True) -> bool:
    """Write the entry (atomically, replacing an entry of the same key) and trim the folder to its size limit.
    Never raises for a failed write: logs one warning naming the folder and returns False (the caller still has
    the trained adapter). `finished` False: an unfinished state (key ending UNFINISHED_SUFFIX), which never makes
    a finished entry go."""
    try:
        os.makedirs(cache_dir(), exist_ok=True)
        save_adapter_file(adapter, entry_path(key), extra_metadata={KEY_FIELD: key, LOSSES_FIELD: json.dumps(losses)})
    except Exception as e:  # best effort: a full or read-only disk must not cost the trained adapter
        log.warning(f"SINE Finetune: could not write the disk cache in {cache_dir()} ({type(e).__name__}: {e}); "
                    "the adapter is used but will be retrained after a restart. Free space or make the folder "
                    "writable, or turn SINE Finetune's disk_cache off.")
        return False
    evict(keep=entry_path(key), finished_too=finished)
    return True


def evict(keep: str | None = None, finished_too: bool = True) -> list[str]:
    """Remove entries until the folder fits its size limit (never `keep`): unfinished states first, least
    recently used first, then (finished_too) finished entries; and temporary files of crashed writes. Returns
    the removed paths."""
    files = []
    try:
        for entry in os.scandir(cache_dir()):
            st = entry.stat()
            files.append((st.st_mtime, st.st_size, entry.path))
    except OSError:  # no folder yet, or it vanished / went unreadable meanwhile: nothing to trim now
        return []
    now = time.time()
    removed = [p for m, _, p in files if p.endswith(TEMP_SUFFIX) and now - m > STALE_TEMP_S and _remove(p)]
    live = [f for f in files if f[2].endswith(".safetensors")]
    total = sum(size for _, size, _ in live)
    unfinished = sorted(f for f in live if f[2].endswith(UNFINISHED_SUFFIX + ".safetensors"))
    finished = sorted(f for f in live if f not in unfinished) if finished_too else []
    for _, size, path in unfinished + finished:
        if total <= limit_bytes():
            break
        if path != keep and _remove(path):
            total -= size
            removed.append(path)
    if total > limit_bytes() and not finished_too:
        log.warning(f"SINE Finetune: the disk cache ({cache_dir()}) is over its size limit by this run's resume "
                    f"state; finished entries are kept. Raise {LIMIT_ENV} or free space.")
    return removed


def remove(key: str) -> None:
    """Remove `key`'s entry if there is one."""
    if os.path.exists(entry_path(key)):
        _remove(entry_path(key))


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
