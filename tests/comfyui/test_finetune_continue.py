"""SINE Finetune that a user can watch, continue and keep (issue 11), and its loss mask (issue 12), inside real
ComfyUI on the random-weight SD1.5 fixture at 64 px."""
import io as bytes_io
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from comfyui_harness import WorkflowError
from workflows_api import finetune_graph

SIZE = 64


def graph(fixtures, steps, seed, **inputs):
    g = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=steps, lr=1e-3, seed=seed,
                       resolution=SIZE)
    g["finetune"]["inputs"].update(inputs)
    return g


def trained_steps(comfy, total):
    return [v for v, t, _ in comfy.progress if t == total]


def params(adapter):
    return [p.detach().clone() for p in adapter.parameters()]


def assert_same_adapter(a, b, atol=1e-6):
    for x, y in zip(params(a), params(b), strict=True):
        assert torch.allclose(x, y, rtol=0, atol=atol), (x - y).abs().max()


def cache_entries(comfy) -> set[Path]:
    return set((Path(comfy.folder_paths.models_dir) / "sine_cache").glob("*.safetensors"))


def entry_steps(comfy, entry: Path) -> int:
    """The trained steps a cache entry records (a `-resume` entry's name does not say them)."""
    return comfy.pack_module("nodes.disk_cache").entry_steps(entry.stem)


@pytest.fixture(scope="module")
def six_at_once(comfy, fixtures):
    """The reference: 6 steps from zero, disk cache off (so nothing is read from an earlier run)."""
    comfy.run(graph(fixtures, 6, seed=61, disk_cache=False))
    return comfy.node_output("finetune", 3)


@pytest.fixture
def latent2rgb_previews(monkeypatch):
    """ComfyUI started with --preview-method latent2rgb (0.3.64's default is none: no previews at all)."""
    from comfy.cli_args import LatentPreviewMethod, args
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)


def test_previews_are_emitted_and_decodable(comfy, fixtures, latent2rgb_previews):
    comfy.run(graph(fixtures, 3, seed=60, disk_cache=False))
    previews = [(v, t, p) for v, t, p in comfy.previews if t == 3]
    assert previews and previews[-1][0] == 3, [(v, t) for v, t, _ in comfy.previews]
    fmt, image, max_size = previews[-1][2]
    assert fmt == "JPEG" and isinstance(max_size, int) and image.width > image.height > 0
    buf = bytes_io.BytesIO()
    image.save(buf, format=fmt)  # what ComfyUI's server does with it
    decoded = Image.open(bytes_io.BytesIO(buf.getvalue()))
    assert decoded.size == image.size and torch.from_numpy(np.array(decoded)).float().std() > 0


def test_loss_output_feeds_core_loss_graph_node(comfy, fixtures):
    g = graph(fixtures, 3, seed=60, disk_cache=False)
    g["plot"] = {"class_type": "LossGraphNode", "inputs": {"loss": ["finetune", 5], "filename_prefix": "sine_loss"}}
    result = comfy.run(g)
    loss = comfy.node_output("finetune", 5)
    assert set(loss) == {"loss"} and len(loss["loss"]) == 3 and all(isinstance(v, float) for v in loss["loss"])
    # ComfyUI 0.3.64 saves the plot under filename_prefix; newer ComfyUI shows it as a preview (a temp file).
    images = result.outputs["plot"]["images"]
    assert len(images) == 1 and (images[0]["type"] != "output" or images[0]["filename"].startswith("sine_loss"))
    plot = np.asarray(Image.open(comfy.output_path(images[0])).convert("L"))
    assert plot.std() > 0  # the drawn curve and axes, not a blank canvas


def test_three_then_three_more_equals_six_at_once_through_the_disk_cache(comfy, fixtures, six_at_once):
    comfy.run(graph(fixtures, 3, seed=61))
    assert trained_steps(comfy, 3)[-1] == 3
    comfy.run(graph(fixtures, 6, seed=61))
    assert trained_steps(comfy, 6)[0] == 4, "the cached 3-step run was not continued"
    assert_same_adapter(comfy.node_output("finetune", 3), six_at_once)
    assert len(comfy.node_output("finetune", 5)["loss"]) == 6


def test_continue_from_an_adapter_equals_six_at_once(comfy, fixtures, six_at_once):
    g = graph(fixtures, 3, seed=61, disk_cache=False)
    g["more"] = {"class_type": "SINE_Finetune", "inputs": {**g["finetune"]["inputs"], "steps": 6,
                                                          "continue_from": ["finetune", 3]}}
    g["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["more", 3]}}
    comfy.run(g)
    first, more = comfy.node_output("finetune", 3), comfy.node_output("more", 3)
    assert first.settings["steps"] == 3 and more.settings["steps"] == 6 and first.optimizer_state
    assert_same_adapter(more, six_at_once)


def test_continue_from_with_fewer_steps_is_refused(comfy, fixtures):
    g = graph(fixtures, 3, seed=62, disk_cache=False)
    g["more"] = {"class_type": "SINE_Finetune", "inputs": {**g["finetune"]["inputs"], "steps": 2,
                                                          "continue_from": ["finetune", 3]}}
    g["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["more", 3]}}
    with pytest.raises(WorkflowError, match="steps.*counts in total"):
        comfy.run(g)


def test_cancel_keeps_a_continuable_state(comfy, fixtures):
    before = cache_entries(comfy)
    comfy.interrupt_at = 3
    with pytest.raises(WorkflowError, match="interrupted|Interrupt"):
        comfy.run(graph(fixtures, 6, seed=63))
    kept = cache_entries(comfy) - before
    assert len(kept) == 1 and next(iter(kept)).stem.endswith("-resume"), kept
    resume = kept.pop()
    done = entry_steps(comfy, resume)
    assert 1 <= done < 6
    comfy.run(graph(fixtures, 6, seed=63))
    assert trained_steps(comfy, 6)[0] == done + 1, "the cancelled run's steps were trained again"
    assert not resume.exists()  # the finished 6-step entry supersedes the resume state
    continued = comfy.node_output("finetune", 3)
    comfy.run(graph(fixtures, 6, seed=63, disk_cache=False))
    assert trained_steps(comfy, 6)[0] == 1
    assert_same_adapter(continued, comfy.node_output("finetune", 3))


def test_periodic_saves(comfy, fixtures, caplog):
    """Each periodic save replaces the run's one resume state; the finished entry supersedes it."""
    before = cache_entries(comfy)
    with caplog.at_level(logging.INFO, logger="sine"):
        comfy.run(graph(fixtures, 5, seed=64, save_every=2))
    saves = [line for line in caplog.text.splitlines() if "periodic save at step" in line]
    assert [s.split("periodic save at step ")[1][:3] for s in saves] == ["2/5", "4/5"], saves
    assert all("-resume.safetensors" in s for s in saves), saves
    assert [p.stem.rsplit("-", 1)[1] for p in cache_entries(comfy) - before] == ["5"]


def test_all_ones_mask_trains_bit_identically(comfy, fixtures):
    g = graph(fixtures, 3, seed=65, disk_cache=False)
    g["mask"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 100, "height": 70}}
    g["masked"] = {"class_type": "SINE_Finetune", "inputs": {**g["finetune"]["inputs"], "mask": ["mask", 0]}}
    g["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["masked", 3]}}
    comfy.run(g)
    plain, masked = comfy.node_output("finetune", 3), comfy.node_output("masked", 3)
    for x, y in zip(params(plain), params(masked), strict=True):
        assert torch.equal(x, y)
    assert comfy.node_output("finetune", 5) == comfy.node_output("masked", 5)
    half = dict(g)
    half["mask"] = {"class_type": "SolidMask", "inputs": {"value": 0.5, "width": 100, "height": 70}}
    comfy.run(half)  # a uniform mask of 0.5 is the same weighting: equal up to rounding
    assert_same_adapter(comfy.node_output("masked", 3), plain, atol=1e-5)
    empty = dict(g)
    empty["mask"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 100, "height": 70}}
    with pytest.raises(WorkflowError, match="mask.*empty"):
        comfy.run(empty)


def test_patch_mode_with_fresh_crops_and_reconstruction_loss(comfy, fixtures):
    patch = {"working_size": 128, "train_resolution": 64, "min_crop_frac": 0.1, "max_crop_frac": 1.0,
             "whole_image_prob": 0.0, "grid_size": 16, "interpolation": "bilinear", "grid_gate": False,
             "crop_bank": 0, "recon_loss": True}
    g = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=3, lr=1e-3, seed=66, patch=patch)
    g["finetune"]["inputs"]["disk_cache"] = False
    comfy.run(g)
    with_rec = comfy.node_output("finetune", 5)["loss"]
    g["patch"]["inputs"]["recon_loss"] = False
    comfy.run(g)
    without = comfy.node_output("finetune", 5)["loss"]
    assert comfy.node_output("finetune", 3).patch.crop_bank == 0
    # same crops, noise and timesteps: L_rec adds a positive term from the first step on
    assert with_rec[0] > without[0]


def test_a_base_exception_cancel_is_not_swallowed_and_keeps_the_state(comfy, fixtures, monkeypatch):
    """Newer ComfyUI's InterruptProcessingException is a BaseException (comfy/model_management.py @ a7631e35).
    Swapped in here for 0.3.64's class (the executor catches it by that module attribute): the pack's own cancel
    handling still keeps the stopped state and lets the cancel through to the executor."""
    import comfy.model_management as mm

    class InterruptAsBaseException(BaseException):
        pass

    monkeypatch.setattr(mm, "InterruptProcessingException", InterruptAsBaseException)
    before = cache_entries(comfy)
    comfy.interrupt_at = 2
    with pytest.raises(WorkflowError, match="interrupted|Interrupt"):
        comfy.run(graph(fixtures, 5, seed=66))
    kept = cache_entries(comfy) - before
    assert len(kept) == 1 and 1 <= entry_steps(comfy, kept.pop()) < 5
