"""CPU emulation of a GPU's weight copies, for the ComfyUI tier (DEVELOPERS.md, Testing 3; issue 18).

On CUDA every load and offload of a model copies each weight (`param.data = param.to(device)`), and the mode the
copy is made in decides whether the weight still works afterwards (../shared/repro/inference_tensor_move.py). On a
CPU, `.to("cpu")` returns the same tensor, so none of that happens. ComfyUI's device functions here return
`torch.device("cpu", 0)` for loading and `torch.device("cpu", 1)` for offloading instead: a CPU tensor's device has
no index, so each move to either copies, as a move to or from a GPU does, while everything still runs on the CPU.

Switches: SINE_EMULATE_DEVICE_MOVES=1 (or pytest --emulate-device-moves) for the whole test process, installed
before any model loads; the `device_moves` fixture (tests/conftest.py) for one test.
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


def requested(config=None) -> bool:
    """Whether this test process runs the whole ComfyUI tier under the emulation."""
    return os.environ.get(ENV) == "1" or bool(config is not None and config.getoption("emulate_device_moves"))


def is_active() -> bool:
    import comfy.model_management as mm
    return mm.get_torch_device() == LOAD_DEVICE


def install() -> dict:
    """Point the device functions at the copying devices; returns the originals for `uninstall`."""
    import comfy.model_management as mm
    originals = {name: getattr(mm, name) for name in LOAD_FUNCTIONS + OFFLOAD_FUNCTIONS}
    for name in LOAD_FUNCTIONS:
        setattr(mm, name, lambda *args, **kwargs: LOAD_DEVICE)
    for name in OFFLOAD_FUNCTIONS:
        setattr(mm, name, lambda *args, **kwargs: OFFLOAD_DEVICE)
    return originals


def uninstall(originals: dict) -> None:
    import comfy.model_management as mm
    for name, function in originals.items():
        setattr(mm, name, function)


@contextmanager
def emulated(session):
    """One test under the emulation: the models ComfyUI holds are unloaded and its node cache emptied before and
    after, so every model the test uses is loaded by a loader node under the copying devices (and none of them
    leaks into later tests)."""
    import comfy.model_management as mm
    if is_active():  # the whole process already runs emulated
        yield
        return
    mm.unload_all_models()
    session.reset_node_cache()
    originals = install()
    try:
        yield
    finally:
        with torch.inference_mode():  # as ComfyUI unloads between prompts on a GPU: weights stay usable
            mm.unload_all_models()
        uninstall(originals)
        session.reset_node_cache()
