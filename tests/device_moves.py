"""CPU emulation of a GPU's weight copies, for the ComfyUI tier (docs/development.md, Tests; issue 18).

On CUDA every load and offload of a model copies each weight (`param.data = param.to(device)`), and the mode the
copy is made in decides whether the weight still works afterwards (../shared/repro/inference_tensor_move.py). On a
CPU, `.to("cpu")` returns the same tensor, so none of that happens. ComfyUI's device functions here return
`torch.device("cpu", 0)` for loading and `torch.device("cpu", 1)` for offloading instead: a CPU tensor's device has
no index, so each move to either copies, as a move to or from a GPU does, while everything still runs on the CPU.

`--lowvram` is emulated too (`lowvram=True`): on a GPU, a model that does not fit is loaded in part and its other
layers cast their weights on every call (model_management.load_models_gpu @ 0.3.64, the lowvram_model_memory
branch). ComfyUI never loads in part onto a CPU device (is_device_cpu -> VRAMState.DISABLED), so inside each load
that is not forced full the emulation answers that the load device is no CPU and has LOWVRAM_FREE bytes free.

Switches: SINE_EMULATE_DEVICE_MOVES=1 (or pytest --emulate-device-moves) for the whole test process, installed
before any model loads; the `device_moves` and `device_moves_lowvram` fixtures (tests/conftest.py) for one test.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

ENV = "SINE_EMULATE_DEVICE_MOVES"
LOAD_DEVICE = torch.device("cpu", 0)
OFFLOAD_DEVICE = torch.device("cpu", 1)
# comfy.model_management's device functions (0.3.64 and newer), by the device they stand for. ComfyUI calls them
# through the module (`model_management.get_torch_device()`), so replacing the module attributes reaches every caller.
LOAD_FUNCTIONS = ("get_torch_device", "vae_device", "text_encoder_device")
OFFLOAD_FUNCTIONS = ("unet_offload_device", "vae_offload_device", "text_encoder_offload_device")
# Free memory of the emulated --lowvram GPU: far below the fixture UNet's 3.4 GB, so every model loads in part.
LOWVRAM_FREE = 256 * 1024 ** 2


def requested(config=None) -> bool:
    """Whether this test process runs the whole ComfyUI tier under the emulation."""
    return os.environ.get(ENV) == "1" or bool(config is not None and config.getoption("emulate_device_moves"))


def is_active() -> bool:
    import comfy.model_management as mm
    return mm.get_torch_device() == LOAD_DEVICE


def install(lowvram: bool = False) -> dict:
    """Point the device functions at the copying devices (and, with `lowvram`, make loads partial as under
    --lowvram); returns the originals for `uninstall`."""
    import comfy.model_management as mm
    originals = {name: getattr(mm, name) for name in LOAD_FUNCTIONS + OFFLOAD_FUNCTIONS}
    for name in LOAD_FUNCTIONS:
        setattr(mm, name, lambda *args, **kwargs: LOAD_DEVICE)
    for name in OFFLOAD_FUNCTIONS:
        setattr(mm, name, lambda *args, **kwargs: OFFLOAD_DEVICE)
    if lowvram:
        originals.update(install_lowvram())
    return originals


def install_lowvram() -> dict:
    import comfy.model_management as mm
    originals = {"vram_state": mm.vram_state, "load_models_gpu": mm.load_models_gpu}
    mm.vram_state = mm.VRAMState.LOW_VRAM
    mm.load_models_gpu = partial_loads(mm.load_models_gpu)
    return originals


def partial_loads(load_models_gpu):
    """`load_models_gpu` as on a --lowvram GPU with LOWVRAM_FREE bytes free: a load not forced full loads in part."""
    import comfy.model_management as mm

    def load(models, *args, force_full_load=False, **kwargs):
        if force_full_load:
            return load_models_gpu(models, *args, force_full_load=True, **kwargs)
        is_device_cpu, get_free_memory = mm.is_device_cpu, mm.get_free_memory
        mm.is_device_cpu = lambda device: device != LOAD_DEVICE and is_device_cpu(device)
        mm.get_free_memory = lambda dev=None, torch_free_too=False: (
            (LOWVRAM_FREE, LOWVRAM_FREE) if torch_free_too else LOWVRAM_FREE) if dev == LOAD_DEVICE \
            else get_free_memory(dev, torch_free_too)
        try:
            return load_models_gpu(models, *args, **kwargs)
        finally:
            mm.is_device_cpu, mm.get_free_memory = is_device_cpu, get_free_memory
    return load


def uninstall(originals: dict) -> None:
    import comfy.model_management as mm
    for name, function in originals.items():
        setattr(mm, name, function)


@contextmanager
def emulated(session, lowvram: bool = False):
    """One test under the emulation: the models ComfyUI holds are unloaded and its node cache emptied before and
    after, so every model the test uses is loaded by a loader node under the copying devices (and none of them
    leaks into later tests)."""
    import comfy.model_management as mm
    if is_active() and not lowvram:  # the whole process already runs emulated
        yield
        return
    with torch.inference_mode():
        mm.unload_all_models()
    session.reset_node_cache()
    originals = install_lowvram() if is_active() else install(lowvram)
    try:
        yield
    finally:
        with torch.inference_mode():  # as ComfyUI unloads between prompts on a GPU: weights stay usable
            mm.unload_all_models()
        uninstall(originals)
        session.reset_node_cache()
