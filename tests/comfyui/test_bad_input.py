"""Bad input catalogue: each case fails with a clear error naming the node and the input, writing nothing."""
import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from comfyui_harness import WorkflowError
from workflows_api import finetune_graph, load_graph, sine_sample_graph

EDIT = "photo of a dog wearing a superhero cape"


def snapshot(comfy) -> set:
    """Every file under the model folders (sine_cache, loras) and the output folder."""
    roots = [Path(comfy.folder_paths.models_dir), Path(comfy.folder_paths.get_output_directory())]
    return {p for r in roots if r.exists() for p in r.rglob("*") if p.is_file()}


def expect_error(comfy, graph, *patterns):
    before = snapshot(comfy)
    with pytest.raises(WorkflowError) as e:
        comfy.run(graph)
    msg = str(e.value)
    for pat in patterns:
        assert pat in msg, f"{pat!r} not in: {msg[:600]}"
    assert "Traceback" not in msg.split("'traceback'")[0]  # the message itself is not a traceback
    assert snapshot(comfy) == before, "a failing run wrote files"
    return msg


def ft(fixtures, **kw):
    kw.setdefault("steps", 2)
    return finetune_graph(fixtures["checkpoint"], fixtures["source_image"], **kw)


def with_image_node(graph, node):
    graph["img2"] = node
    graph["finetune"]["inputs"]["image"] = ["img2", 0]
    return graph


# ---- SINE Finetune -------------------------------------------------------------------------------------------------
def test_image_batch_larger_than_one(comfy, fixtures):
    g = with_image_node(ft(fixtures), {"class_type": "RepeatImageBatch", "inputs": {"image": ["image", 0], "amount": 2}})
    expect_error(comfy, g, "SINE Finetune", "'image'", "batch of 2", "ImageFromBatch")


def test_image_too_small(comfy, fixtures):
    g = with_image_node(ft(fixtures), {"class_type": "ImageScale", "inputs": {
        "image": ["image", 0], "upscale_method": "bilinear", "width": 48, "height": 80, "crop": "disabled"}})
    expect_error(comfy, g, "SINE Finetune", "'image'", "48x80", "at least 64")


def test_image_too_large(comfy, fixtures):
    g = with_image_node(ft(fixtures), {"class_type": "EmptyImage", "inputs": {
        "width": 8200, "height": 64, "batch_size": 1, "color": 0}})
    expect_error(comfy, g, "SINE Finetune", "'image'", "8200x64")


def test_empty_source_prompt(comfy, fixtures):
    expect_error(comfy, ft(fixtures, prompt="  "), "SINE Finetune", "'source_prompt'")


@pytest.mark.parametrize("field,value,needle", [("steps", 0, "steps"), ("learning_rate", 0.0, "learning_rate"),
                                                ("learning_rate", 0.5, "learning_rate")])
def test_out_of_range_widgets_are_refused_by_comfyui(comfy, fixtures, field, value, needle):
    g = ft(fixtures)
    g["finetune"]["inputs"][field] = value
    expect_error(comfy, g, "validation failed", needle)


def test_resolution_not_multiple_of_64(comfy, fixtures):
    expect_error(comfy, ft(fixtures, resolution=100), "SINE Finetune", "'resolution'", "multiple of 64")


def test_lora_rank_larger_than_the_layers(comfy, fixtures):
    """Above the widget's max (512) ComfyUI refuses it; below, layers smaller than the rank get their full rank."""
    expect_error(comfy, ft(fixtures, rank=4096), "validation failed", "lora_rank")
    comfy.run(ft(fixtures, rank=8, layers="all", resolution=64, steps=1))
    adapter = comfy.node_output("finetune", 3)
    assert adapter.unet["diffusion_model.out.2"].rank == 4  # the 4-channel output conv: full rank 4, not 8


def test_patch_config_geometry(comfy, fixtures):
    bad = {"working_size": 1000, "train_resolution": 64, "min_crop_frac": 0.1, "max_crop_frac": 1.0,
           "whole_image_prob": 0.0, "grid_size": 128, "interpolation": "bilinear", "grid_gate": False, "crop_bank": 2}
    expect_error(comfy, ft(fixtures, patch=bad), "SINE Patch Resolution Config", "working_size", "multiple")
    expect_error(comfy, ft(fixtures, patch={**bad, "working_size": 1024, "min_crop_frac": 0.9, "max_crop_frac": 0.5}),
                 "SINE Patch Resolution Config", "crop fractions")


def test_odd_sizes_alpha_and_grayscale_are_accepted(comfy, fixtures):
    """Not errors, by design: images are resized to the training size; alpha is dropped; gray is repeated."""
    finetune = comfy.pack_module("nodes.finetune")
    as_rgb = comfy.pack_module("sine_ops.training_data").as_rgb
    settings = comfy.pack_module("sine_ops.config").FinetuneSettings()
    finetune.validate(settings, torch.rand(1, 101, 77, 3), "photo of a sks dog")  # not a multiple of 8
    rgba, gray = torch.rand(1, 64, 64, 4), torch.rand(1, 64, 64, 1)
    assert torch.equal(as_rgb(rgba), rgba[..., :3])
    assert as_rgb(gray).shape == (1, 64, 64, 3) and torch.equal(as_rgb(gray)[..., 2], gray[..., 0])
    with pytest.raises(ValueError, match="empty") as e:
        finetune.validate(settings, torch.zeros(0, 64, 64, 3), "photo of a sks dog")
    assert e.value.input_name == "image"
    with pytest.raises(ValueError, match="NaN") as e:
        finetune.validate(settings, torch.full((1, 64, 64, 3), float("nan")), "photo of a sks dog")
    assert e.value.input_name == "image"


# ---- SINE Guider / Guided Sampler ----------------------------------------------------------------------------------
def sample(comfy, fixtures, **kw):
    """A guided-sampling graph whose fine-tune already ran (so a failure below is the sampler's alone)."""
    g = ft(fixtures, resolution=64)
    comfy.run(g)
    return sine_sample_graph(fixtures["checkpoint"], {"image": g["image"], "finetune": g["finetune"]}, edit=EDIT,
                             steps=1, **kw)


def test_window_start_after_end(comfy, fixtures):
    expect_error(comfy, sample(comfy, fixtures, start=0.7, end=0.2), "SINE Guided Sampler", "'start_percent'",
                 "'end_percent'")


def test_weight_outside_zero_one(comfy, fixtures):
    expect_error(comfy, sample(comfy, fixtures, weight=1.5), "validation failed", "finetuned_weight")


def test_weights_summing_above_one(comfy, fixtures):
    g = sample(comfy, fixtures, weight=0.6)
    g["extra"] = {"class_type": "SINE_AddFinetunedModel", "inputs": {
        "sine_adapter": ["finetune", 3], "source_conditioning": ["finetune", 2], "finetuned_weight": 0.6,
        "start_percent": 0.0, "end_percent": 0.6}}
    g["sample"]["inputs"]["extra_models"] = ["extra", 0]
    expect_error(comfy, g, "SINE Guided Sampler", "sum to 1.200", "finetuned_weight")


def test_finetuned_model_as_base(comfy, fixtures):
    g = sample(comfy, fixtures)
    g["sample"]["inputs"]["model"] = ["finetune", 0]
    expect_error(comfy, g, "SINE Guided Sampler", "input 'model'", "checkpoint loader")


# ---- adapter files -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_adapter(comfy, fixtures):
    g = ft(fixtures, resolution=64)
    g["save"] = {"class_type": "SINE_SaveAdapter", "inputs": {"sine_adapter": ["finetune", 3],
                                                              "filename": "sine_tests/good",
                                                              "overwrite": True}}
    comfy.run(g)
    return Path(comfy.folder_paths.get_folder_paths("loras")[0]) / "sine_tests" / "good.safetensors"


def write_bad(comfy, name, data: bytes):
    path = Path(comfy.folder_paths.get_folder_paths("loras")[0]) / "sine_tests" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    comfy.folder_paths.filename_list_cache.clear()
    return f"sine_tests/{name}"


def rewrite(comfy, saved_adapter, name, edit_sd=None, edit_meta=None):
    sd = safetensors.torch.load_file(str(saved_adapter))
    with safetensors.safe_open(str(saved_adapter), "pt") as f:
        meta = f.metadata()
    if edit_sd:
        edit_sd(sd)
    if edit_meta:
        edit_meta(meta)
    path = Path(comfy.folder_paths.get_folder_paths("loras")[0]) / "sine_tests" / name
    safetensors.torch.save_file(sd, str(path), metadata=meta)
    comfy.folder_paths.filename_list_cache.clear()
    return f"sine_tests/{name}"


def test_adapter_file_that_is_not_safetensors(comfy, fixtures, saved_adapter):
    name = write_bad(comfy, "garbage.safetensors", b"PK\x03\x04 this is a zip, or a pickle, not safetensors")
    expect_error(comfy, load_graph(fixtures, name), "Load SINE Adapter", "'adapter_name'", "not a readable")


def test_pickle_files_are_never_read(comfy, fixtures, saved_adapter):
    name = write_bad(comfy, "old.ckpt", b"\x80\x04 pickle")
    expect_error(comfy, load_graph(fixtures, name), "Load SINE Adapter", "'adapter_name'", "only safetensors")


def test_truncated_adapter_file(comfy, fixtures, saved_adapter):
    data = saved_adapter.read_bytes()
    name = write_bad(comfy, "truncated.safetensors", data[: len(data) // 2])
    expect_error(comfy, load_graph(fixtures, name), "Load SINE Adapter", "'adapter_name'", "not a readable")


def test_plain_lora_without_sine_metadata(comfy, fixtures, saved_adapter):
    name = rewrite(comfy, saved_adapter, "plain.safetensors", edit_meta=lambda m: m.clear())
    expect_error(comfy, load_graph(fixtures, name), "Load SINE Adapter", "not a SINE adapter", "LoraLoader")


def test_damaged_tensor_bytes(comfy, fixtures, saved_adapter):
    def flip(sd):
        k = next(k for k in sd if k.endswith("lora_up.weight"))
        sd[k] = sd[k] + 1.0
    name = rewrite(comfy, saved_adapter, "damaged.safetensors", edit_sd=flip)
    expect_error(comfy, load_graph(fixtures, name), "Load SINE Adapter", "checksum")


def _drop_checksum(meta):
    meta.pop("sine_checksum")


def test_wrong_keys(comfy, fixtures, saved_adapter):
    def add(sd):
        sd["diffusion_model.not_a_layer.lora_down.weight"] = torch.zeros(4, 8)
        sd["diffusion_model.not_a_layer.lora_up.weight"] = torch.zeros(8, 4)
        sd["diffusion_model.not_a_layer.alpha"] = torch.tensor(4.0)
    name = rewrite(comfy, saved_adapter, "wrongkeys.safetensors", edit_sd=add, edit_meta=_drop_checksum)
    expect_error(comfy, load_graph(fixtures, name), "SINE Apply Adapter", "not_a_layer", "different model family")


def test_wrong_shapes(comfy, fixtures, saved_adapter):
    def shrink(sd):
        k = next(k for k in sd if k.endswith("lora_down.weight"))
        sd[k] = sd[k][:, :-1].contiguous()
    name = rewrite(comfy, saved_adapter, "wrongshape.safetensors", edit_sd=shrink, edit_meta=_drop_checksum)
    expect_error(comfy, load_graph(fixtures, name), "SINE Apply Adapter", "in the adapter")


def test_adapter_from_another_model_family(comfy, fixtures, saved_adapter):
    def other_family(meta):
        info = json.loads(meta["sine"])
        info["family"] = "sdxl"
        meta["sine"] = json.dumps(info)
        meta.pop("sine_metadata_checksum", None)  # as a hand edit would: the checksum would flag it first
    name = rewrite(comfy, saved_adapter, "sdxl.safetensors", edit_meta=other_family)
    expect_error(comfy, load_graph(fixtures, name), "SINE Apply Adapter", "sdxl", "'model'")


@pytest.mark.parametrize("filename", ["../escape", "sine/../../escape", "/tmp/sine_escape"])
def test_save_name_leaving_the_loras_folder(comfy, fixtures, filename):
    g = ft(fixtures, resolution=64)
    g["save"] = {"class_type": "SINE_SaveAdapter", "inputs": {"sine_adapter": ["finetune", 3], "filename": filename}}
    comfy.run(ft(fixtures, resolution=64))  # train first, so the failing run below only tries to save
    expect_error(comfy, g, "Save SINE Adapter", "'filename'", "leave the loras folder")


def test_patch_mode_and_patch_adapters_on_a_dit_model(comfy, fixtures, saved_adapter):
    """A model family without a UNet input conv (PixArt, a DiT): clear errors naming the node and the input."""
    import importlib
    from comfyui_fixtures import ensure_dit_model
    name = ensure_dit_model(comfy.folder_paths, comfy.work / "models", 77,
                            importlib.import_module("comfyui_version").__version__)
    patch = {"working_size": 256, "train_resolution": 64, "min_crop_frac": 0.1, "max_crop_frac": 1.0,
             "whole_image_prob": 0.0, "grid_size": 32, "interpolation": "bilinear", "grid_gate": False, "crop_bank": 2}
    g = ft(fixtures, patch=patch)
    g["dit"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
    g["finetune"]["inputs"]["model"] = ["dit", 0]
    expect_error(comfy, g, "SINE Finetune", "'patch_config'", "input conv", "pixartsigma")
    g = load_graph(fixtures, "sine_tests/good.safetensors")
    g["dit"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
    g["apply"]["inputs"]["model"] = ["dit", 0]
    expect_error(comfy, g, "SINE Apply Adapter", "sd1", "'model'", "pixartsigma")
