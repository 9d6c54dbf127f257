"""Glue shared by the node files (which import it, never each other): from the run's inputs to the trained
adapter (reused, continued or trained), and from an adapter to the outputs a fine-tuned model gives."""
from __future__ import annotations

import logging

from ..sine_ops.adapter_file import AdapterFileError, check_finite
from ..sine_ops.adapters import RowRouter
from ..sine_ops.config import FinetuneSettings, family_sizes
from ..sine_ops.sine_adapter import SineAdapter
from . import memory_guard
from . import model_patching as mp
from . import training_cache
from .errors import InputError
from .training_run import run_finetune

log = logging.getLogger("sine")
NODE = "SINE Finetune"  # the node whose runs train_or_reuse serves


def adapter_outputs(model, clip, adapter: SineAdapter):
    """(fine-tuned MODEL, CLIP, source CONDITIONING) from an adapter, all on clones of the inputs."""
    mp.check_family(adapter, model)
    ft_model = mp.patched_model(model, {0: adapter}, RowRouter())
    ft_model.model_options["transformer_options"][mp.FINETUNED_FLAG] = True  # the guider refuses it as a base
    ft_clip = mp.patched_clip(clip, adapter)
    cond = ft_clip.encode_from_tokens_scheduled(ft_clip.tokenize(adapter.source_prompt))
    return ft_model, ft_clip, cond


def train_or_reuse(model, clip, vae, image, source_prompt, settings: FinetuneSettings, patch_config, mask,
                   continue_from, save_every: int, use_disk: bool, compile: bool = False):
    """The adapter of `settings.steps` steps: reused when known, else trained on from the most trained known state
    of the same run (training_cache), else from zero. use_disk: results, periodic saves and a stopped run's last
    state go to the disk cache and are looked up there; off: nothing is read or written there, states are kept in
    memory for this session. compile: train with the UNet compiled (not part of any cache key: it changes the
    result only by float rounding)."""
    if patch_config is not None:  # crop_bank -1 (auto) decided here, so that the cache key holds what trains
        patch_config = patch_config.for_device(mp.fresh_crops_cheap(model))
    lineage = training_cache.lineage_key(model, clip, vae, image, source_prompt, settings, patch_config, mask)
    if continue_from is not None:
        trained = training_cache.steps_of(continue_from)
        if trained > settings.steps:
            raise InputError("steps", f"{settings.steps} is fewer than the {trained} steps continue_from already "
                                      f"has; steps counts in total: set more than {trained} (or disconnect "
                                      "continue_from)")
        if continue_from.settings.get(training_cache.LINEAGE_FIELD) != lineage:
            lineage = training_cache.foreign_lineage(lineage, continue_from)
    start = training_cache.best_start(lineage, settings.steps, continue_from, use_disk)
    if start is not None and training_cache.steps_of(start) == settings.steps:
        log.info(f"{NODE}: reusing the trained {settings.steps}-step state ({lineage})")
        return start
    if start is not None:
        log.info(f"{NODE}: continuing from {training_cache.steps_of(start)} trained steps to {settings.steps}")
    check_memory(model, settings, patch_config)

    def kept(what: str):
        def keep(adapter):
            where = training_cache.keep(lineage, adapter, use_disk, finished=False)
            done = training_cache.steps_of(adapter)
            log.info(f"{NODE}: {what} at step {done}/{settings.steps}; " + (
                "the state could not be saved" if where is None else
                "the state is kept in memory (disk_cache is off): run again with the same inputs in this session "
                "to continue from it" if where == "memory" else
                f"the state is saved in {where}: run again with the same inputs to continue from it"))
        return keep

    adapter, _ = run_finetune(model, clip, vae, image, source_prompt, settings, patch_config, mask=mask, start=start,
                              save_every=save_every, on_checkpoint=kept("periodic save"),
                              on_stopped=kept("training stopped"), compile=compile)
    refuse_non_finite(adapter)
    training_cache.keep(lineage, adapter, use_disk)
    return adapter


def check_memory(model, settings: FinetuneSettings, patch) -> None:
    """Refuse a training size that cannot fit in the device's memory at all (nodes/memory_guard.py)."""
    family = mp.model_family(model)
    try:
        side, input_name = (patch.resolved(family).train_resolution, "patch_config") if patch is not None else \
            (settings.resolution or family_sizes(family).native, "resolution")
    except ValueError:
        return  # an invalid patch config: the training run reports it, naming the setting
    memory_guard.check_training(model, (side, side), input_name)


def refuse_non_finite(adapter) -> None:
    try:
        check_finite(adapter)
    except AdapterFileError as e:
        raise InputError("learning_rate", f"{e}; lower the learning rate") from None
