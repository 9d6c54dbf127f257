"""Patch-based fine-tuning and arbitrary-resolution sampling inside real ComfyUI (random-weight SD1.5 fixture)."""
from dataclasses import replace

import pytest
import torch

from workflows_api import finetune_graph, sine_sample_graph

PATCH = {"working_size": 256, "train_resolution": 64, "min_crop_frac": 0.1, "max_crop_frac": 1.0,
         "whole_image_prob": 0.1, "grid_size": 32, "interpolation": "bilinear", "grid_gate": False, "crop_bank": 4}
EDIT = "photo of a dog wearing a superhero cape"


@pytest.fixture(scope="module")
def patch_nodes(comfy, fixtures):
    g = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=4, lr=1e-3, seed=2, patch=PATCH)
    comfy.run(g)
    adapter = comfy.node_output("finetune", 3)
    assert adapter.patch is not None and adapter.patch.working_size == 256 and adapter.patch.grid_size == 32
    return {"image": g["image"], "patch": g["patch"], "finetune": g["finetune"]}


@pytest.mark.parametrize("size", [(256, 384), (384, 256)])
def test_patch_adapter_samples_at_other_aspect_ratios(comfy, fixtures, patch_nodes, size):
    out = None
    g = sine_sample_graph(fixtures["checkpoint"], patch_nodes, edit=EDIT, steps=2, size=size, weight=0.3,
                          start=0.0, end=1.0)
    comfy.run(g)
    out = comfy.node_output("sample", 0)["samples"]
    assert out.shape == (1, 4, size[1] // 8, size[0] // 8) and torch.isfinite(out).all()
    guider_rows = comfy.progress  # the sampler ran its steps
    assert guider_rows


def test_grid_goes_on_finetuned_rows_only_and_off_equals_non_patch(comfy, fixtures, patch_nodes):
    patching = comfy.pack_module("nodes.model_patching")
    adapter = comfy.node_output("finetune", 3)
    model = comfy.node_output("ckpt", 0)
    off, plain = replace(adapter, grid_enabled=False), replace(adapter, patch=None)
    router = comfy.pack_module("sine_ops.adapters").RowRouter()
    import comfy.model_management
    # apply_model is called directly here, so the inputs go to the model's device as a sampler would move them
    device = comfy.model_management.get_torch_device()
    x = torch.randn(2, 4, 6, 10, generator=torch.Generator().manual_seed(0)).to(device)
    sigma = torch.tensor([3.0, 3.0]).to(device)
    cond = torch.randn(2, 77, 768, generator=torch.Generator().manual_seed(1)).to(device)

    def predict(a, owner):
        m = patching.patched_model(model, {0: a}, router)
        with torch.inference_mode(), router.route(owner):
            comfy.model_management.load_models_gpu([m])
            return m.model.apply_model(x, sigma, c_crossattn=cond,
                                       transformer_options=m.model_options["transformer_options"])

    with_grid, grid_off, non_patch = predict(adapter, [-1, 0]), predict(off, [-1, 0]), predict(plain, [-1, 0])
    assert torch.equal(grid_off, non_patch)                        # grid off == the non-patch path, exactly
    assert torch.equal(with_grid[0], non_patch[0])                 # base row: no grid, no adapter
    assert (with_grid[1] - non_patch[1]).abs().max() > 1e-4        # fine-tuned row: the grid changes it


def test_save_load_sample_reproduces(comfy, fixtures, patch_nodes):
    g = sine_sample_graph(fixtures["checkpoint"], patch_nodes, edit=EDIT, steps=2, size=(64, 96))
    g["save_adapter"] = {"class_type": "SINE_SaveAdapter", "inputs": {"sine_adapter": ["finetune", 3],
                                                                      "filename": "sine_tests/patch_dog",
                                                                      "overwrite": True}}
    comfy.run(g)
    fresh = comfy.node_output("sample", 0)["samples"]
    comfy.folder_paths.filename_list_cache.clear()
    loaded = {"load": {"class_type": "SINE_LoadAdapter", "inputs": {"adapter_name": "sine_tests/patch_dog.safetensors"}},
              "apply": {"class_type": "SINE_ApplyAdapter", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                                      "sine_adapter": ["load", 0],
                                                                      "positional_grid": True}}}
    g2 = sine_sample_graph(fixtures["checkpoint"], loaded, edit=EDIT, steps=2, size=(64, 96))
    g2["sample"]["inputs"]["sine_adapter"] = ["apply", 3]
    g2["sample"]["inputs"]["source_conditioning"] = ["apply", 2]
    comfy.run(g2)
    adapter = comfy.node_output("load", 0)
    assert adapter.patch is not None and adapter.patch.interpolation == "bilinear"
    assert torch.equal(comfy.node_output("sample", 0)["samples"], fresh)


@pytest.mark.parametrize("cheap", [False, True])
def test_crop_bank_auto_follows_the_device(comfy, fixtures, monkeypatch, cheap):
    """crop_bank -1 (the default) trains with fresh crops where fresh_crops_cheap says so (a GPU holding the model)
    and with the bank of 32 elsewhere (this CPU); the adapter records what trained."""
    patching = comfy.pack_module("nodes.model_patching")
    if cheap:  # this CPU is never cheap: stand in for a GPU's answer at the pack's one decision point
        monkeypatch.setattr(patching, "fresh_crops_cheap", lambda model: True)
    # a seed per case: the same inputs would give ComfyUI's cached node output
    g = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=2, lr=1e-3, seed=3 + cheap,
                       patch=dict(PATCH, crop_bank=-1))
    comfy.run(g)
    assert cheap or not patching.fresh_crops_cheap(comfy.node_output("ckpt", 0))
    adapter = comfy.node_output("finetune", 3)
    assert adapter.patch.crop_bank == (0 if cheap else 32)
