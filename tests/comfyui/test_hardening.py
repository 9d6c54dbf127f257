"""Cancellation during sampling, memory over repeated runs, determinism (random-weight SD1.5 fixture, CPU)."""
import gc
import shutil
from pathlib import Path

import pytest
import torch

from comfyui_harness import WorkflowError
from workflows_api import finetune_graph, sine_sample_graph

EDIT = "photo of a dog wearing a superhero cape"


def graph(fixtures, seed, *, steps=2, sample_steps=2):
    ft = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=steps, lr=1e-3, seed=seed,
                        resolution=64, text_encoder="lora")
    g = sine_sample_graph(fixtures["checkpoint"], {"image": ft["image"], "finetune": ft["finetune"]}, edit=EDIT,
                          steps=sample_steps, seed=seed)
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
    g["preview"] = {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}}
    return g


def base_state(comfy):
    """Predictions and an encoding of the checkpoint loader's MODEL and CLIP, through ComfyUI's model loading."""
    from comfy import model_management
    model, clip = comfy.node_output("ckpt", 0), comfy.node_output("ckpt", 1)
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 768, generator=g)
    with torch.inference_mode():
        model_management.load_models_gpu([model])
        pred = model.model.apply_model(x, torch.tensor([2.0, 9.0]), c_crossattn=cond)
        enc = clip.encode_from_tokens_scheduled(clip.tokenize("photo of a sks dog"))[0][0]
    return pred, enc


def test_cancel_during_sampling_leaves_inputs_unchanged(comfy, fixtures):
    g = graph(fixtures, seed=21, sample_steps=4)
    comfy.run(g)
    before = base_state(comfy)
    g["sample"]["inputs"]["seed"] = 22
    comfy.interrupt_at = 2
    with pytest.raises(WorkflowError, match="interrupted"):
        comfy.run(g)
    after = base_state(comfy)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    comfy.run(g)  # and the next run works


def clear_disk_cache(comfy):
    shutil.rmtree(Path(comfy.folder_paths.models_dir) / "sine_cache", ignore_errors=True)


def test_same_seed_same_adapter_and_image(comfy, fixtures):
    state_dict = comfy.pack_module("sine_ops.adapter_file").state_dict
    results = []
    for _ in range(2):
        comfy.executor.reset()
        clear_disk_cache(comfy)
        comfy.run(graph(fixtures, seed=31))
        results.append((state_dict(comfy.node_output("finetune", 3)), comfy.node_output("decode", 0)))
    (sd_a, img_a), (sd_b, img_b) = results
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert torch.equal(img_a, img_b)


def test_memory_does_not_grow_over_ten_runs(comfy, fixtures):
    import psutil  # a ComfyUI dependency: present wherever this tier runs
    rss = []
    for i in range(10):
        comfy.run(graph(fixtures, seed=100 + i))  # a new seed: a new fine-tune and a new sample every run
        gc.collect()
        rss.append(psutil.Process().memory_info().rss)
    growth = (rss[-1] - rss[0]) / rss[0]
    print("RSS after each run (MB):", [r // 2**20 for r in rss], f"growth after the first: {growth:+.2%}")
    assert growth <= 0.02
