"""SDXL (two text encoders, size conditioning): SINE Finetune + SINE Guided Sampler on a random-weight SDXL.

Opt-in (SINE_TEST_SDXL=1): the fixture is 7 GB and needs ~15 GB RAM, too much for CI. Run it alone:
    SINE_TEST_SDXL=1 bash tests/run.sh tests/comfyui/test_sdxl.py
"""
import importlib
import os

import pytest
import torch

from workflows_api import finetune_graph, sine_sample_graph

pytestmark = pytest.mark.skipif(os.environ.get("SINE_TEST_SDXL") != "1",
                                reason="SDXL test is opt-in (SINE_TEST_SDXL=1): 7 GB fixture, ~15 GB RAM")


def test_sdxl_finetune_and_guided_sampling(comfy, fixtures):
    from comfyui_fixtures import ensure_sdxl_checkpoint
    ckpt = ensure_sdxl_checkpoint(comfy.work / "models", 4321, importlib.import_module("comfyui_version").__version__)
    g = finetune_graph(ckpt, fixtures["source_image"], steps=2, lr=1e-3, rank=4, resolution=128)
    comfy.run(g)
    adapter = comfy.node_output("finetune", 3)
    assert adapter.family == "sdxl" and adapter.unet
    nodes = {"image": g["image"], "finetune": g["finetune"]}
    out = sine_sample_graph(ckpt, nodes, edit="photo of a dog wearing a superhero cape", steps=2, size=(128, 128),
                            end=1.0)
    comfy.run(out)
    guided = comfy.node_output("sample", 0)["samples"]
    comfy.run(sine_sample_graph(ckpt, nodes, edit="photo of a dog wearing a superhero cape", steps=2,
                                size=(128, 128), stock=True))
    stock = comfy.node_output("sample", 0)["samples"]
    assert guided.shape == (1, 4, 16, 16) and torch.isfinite(guided).all()
    assert (guided - stock).abs().max() > 1e-4
