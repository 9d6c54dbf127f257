"""Which trained state a SINE Finetune run starts from, and where its results and checkpoints are kept.

A *lineage* is everything that decides the trained adapter except the step count (image, prompt, mask, settings
but `steps`, patch config, model, CLIP, VAE, training code). Because step k's randomness depends on (seed, k) only
and the AdamW state is kept, the k-step state of a lineage is the same whether it was reached at once or in parts.
So a 400-step request continues the lineage's most trained state with at most 400 steps (a cached 200-step run,
the 200 steps a cancelled run completed, a periodic save) and never retrains what is already trained. States are
kept in the disk cache as `<lineage>-<steps>` entries plus one rolling `<lineage>-resume` entry for the unfinished
state (periodic saves, a cancelled run) and, when the disk cache is off, in memory only (the last few).
"""
from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from dataclasses import replace

import torch

from ..sine_ops.adapter_file import checksum, state_dict
from ..sine_ops.config import FinetuneSettings, PatchConfig
from ..sine_ops.sine_adapter import SineAdapter
from . import cache_key, disk_cache

log = logging.getLogger("sine")
MEMORY_ENTRIES = 3  # states kept in memory with the disk cache off (ComfyUI's output cache holds the last too)
LINEAGE_FIELD = "lineage"  # adapter.settings entry naming the lineage an adapter belongs to
_recent: OrderedDict[str, SineAdapter] = OrderedDict()  # entry key -> adapter (finished or a resume state)


def lineage_key(model, clip, vae, image, source_prompt: str, settings: FinetuneSettings,
                patch: PatchConfig | None, mask: torch.Tensor | None) -> str:
    mask_digest = None if mask is None else \
        hashlib.sha256(mask.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()
    return cache_key.cache_key(model, clip, image, source_prompt, replace(settings, steps=0), patch, vae=vae,
                                extra={"mask": mask_digest})


def foreign_lineage(lineage: str, start: SineAdapter) -> str:
    """The lineage of a continuation from an adapter that is not of `lineage` (another file, other settings): it
    depends on that adapter's content."""
    return hashlib.sha256(f"{lineage}:{checksum(state_dict(start))}".encode()).hexdigest()[:32]


def entry_key(lineage: str, steps: int) -> str:
    return f"{lineage}-{steps}"


def resume_key(lineage: str) -> str:
    """The one rolling entry of a run's unfinished state (periodic saves, a cancelled or failed run): replaced in
    place by each newer state, so save_every never piles up entries."""
    return lineage + disk_cache.UNFINISHED_SUFFIX


def steps_of(adapter: SineAdapter) -> int:
    return int(adapter.settings.get("steps", 0))


def best_start(lineage: str, steps: int, given: SineAdapter | None, use_disk: bool) -> SineAdapter | None:
    """The most trained known state of `lineage` with at most `steps` steps, or None: `given`, then the disk
    cache (use_disk) or else the states kept in memory (the disk cache switched off)."""
    known = {} if given is None else {steps_of(given): given}
    if not use_disk:
        known.update({steps_of(a): a for k, a in _recent.items() if k.startswith(f"{lineage}-")})
    best = max((n for n in known if 0 < n <= steps), default=0)
    on_disk = sorted((n, k) for k in (disk_cache.keys_with_prefix(f"{lineage}-") if use_disk else [])
                     if (n := _steps_in(k, lineage)) is not None and best < n <= steps)
    for n, key in reversed(on_disk):
        cached = disk_cache.load_cached(key)  # None for a damaged entry (then removed): try the next one
        if cached is not None and steps_of(cached[0]) == n:
            return replace(cached[0], losses=cached[1])
    return known.get(best)


def _steps_in(key: str, lineage: str) -> int | None:
    if key == resume_key(lineage):
        return disk_cache.entry_steps(key)
    tail = key[len(lineage) + 1:]
    return int(tail) if tail.isdigit() else None


def keep(lineage: str, adapter: SineAdapter, use_disk: bool, finished: bool = True) -> str | None:
    """Record a state of `lineage` (tagging the adapter with it): in the disk cache (use_disk), else in memory
    only (nothing is written with the disk cache off). A finished state gets its own `<lineage>-<steps>` entry and
    drops the run's resume state when it is not ahead of it; an unfinished one replaces the run's resume state.
    Returns where it is kept: the written file, "memory", or None (a failed write)."""
    adapter.settings[LINEAGE_FIELD] = lineage
    key = entry_key(lineage, steps_of(adapter)) if finished else resume_key(lineage)
    if not use_disk:
        _recent[key] = adapter
        _recent.move_to_end(key)
        if finished and steps_of(_recent.get(resume_key(lineage), adapter)) <= steps_of(adapter):
            _recent.pop(resume_key(lineage), None)
        while len(_recent) > MEMORY_ENTRIES:  # unfinished states go first, then the least recent
            oldest = next((k for k in _recent if k != key and k.endswith(disk_cache.UNFINISHED_SUFFIX)),
                          next(iter(_recent)))
            _recent.pop(oldest)
        return "memory"
    if not disk_cache.store(key, adapter, adapter.losses, finished=finished):
        return None
    if finished and (disk_cache.entry_steps(resume_key(lineage)) or 0) <= steps_of(adapter):
        disk_cache.remove(resume_key(lineage))
    return disk_cache.entry_path(key)
