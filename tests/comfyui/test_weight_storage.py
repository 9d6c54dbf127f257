"""Training and guided sampling with the UNet stored in fp16, bf16 and fp8 (ComfyUI 0.3.64, CPU).

The user paths: `--fp16-unet` / `--bf16-unet` / `--fp8_e4m3fn-unet` (process flags read by
comfy.model_management.unet_dtype when a model loads) and Load Diffusion Model's `weight_dtype` (fp8_e4m3fn,
fp8_e5m2). The fixture's UNet is written once as a diffusion-model file and loaded by ComfyUI's own UNETLoader
under a distinct name per storage (so each test loads afresh instead of reusing the executor's cached MODEL);
the flags are set on ComfyUI's parsed args for the duration of the load, as the command line would.
"""
import os

import pytest
import torch

from workflows_api import finetune_graph, sine_sample_graph

EDIT = "photo of a dog wearing a superhero cape"
STORAGES = {  # name -> (cli flag on comfy.cli_args.args or None, UNETLoader weight_dtype, expected weight dtype)
    "fp16_unet": ("fp16_unet", "default", torch.float16),
    "bf16_unet": ("bf16_unet", "default", torch.bfloat16),
    "fp8_e4m3fn_unet": ("fp8_e4m3fn_unet", "default", torch.float8_e4m3fn),
    "weight_dtype_fp8_e4m3fn": (None, "fp8_e4m3fn", torch.float8_e4m3fn),
    "weight_dtype_fp8_e5m2": (None, "fp8_e5m2", torch.float8_e5m2),
}


@pytest.fixture(scope="module")
def unet_file(comfy, fixtures):
    """The fixture checkpoint's UNet as a diffusion_models file (ComfyUI's own key layout for UNETLoader)."""
    from comfy import utils
    folder = comfy.work / "models" / "diffusion_models"
    folder.mkdir(parents=True, exist_ok=True)
    comfy.folder_paths.add_model_folder_path("diffusion_models", str(folder), is_default=True)
    path = folder / "sine_test_sd15_unet.safetensors"
    if not path.exists():
        ckpt = comfy.folder_paths.get_full_path_or_raise("checkpoints", fixtures["checkpoint"])
        sd = utils.load_torch_file(ckpt)
        prefix = "model.diffusion_model."
        utils.save_torch_file({k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, str(path))
    return path


def storage_graph(fixtures, unet_name: str, weight_dtype: str, *, weight: float, seed: int,
                  stock: bool = False) -> dict:
    """UNETLoader (the stored UNet) + the checkpoint's CLIP/VAE -> SINE Finetune -> SINE Guided Sampler."""
    ft = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=2, lr=1e-3, resolution=64,
                        seed=seed)
    ft["finetune"]["inputs"]["model"] = ["unet", 0]
    nodes = {"image": ft["image"], "finetune": ft["finetune"],
             "unet": {"class_type": "UNETLoader", "inputs": {"unet_name": unet_name, "weight_dtype": weight_dtype}}}
    g = sine_sample_graph(fixtures["checkpoint"], nodes, edit=EDIT, steps=3, weight=weight, stock=stock)
    g["sample"]["inputs"]["model"] = ["unet", 0]
    return g


def sampled(comfy, graph) -> torch.Tensor:
    comfy.run(graph)
    return comfy.node_output("sample", 0)["samples"]


@pytest.mark.parametrize("storage", list(STORAGES))
def test_finetune_and_guided_sampling_per_weight_storage(comfy, fixtures, unet_file, storage):
    from comfy.cli_args import args
    flag, weight_dtype, expected = STORAGES[storage]
    name = f"sine_test_sd15_unet_{storage}.safetensors"  # a name per storage: a fresh load, not a cached MODEL
    link = unet_file.parent / name
    if not link.exists():
        os.symlink(unet_file, link)
    comfy.folder_paths.filename_list_cache.clear()
    if flag:
        setattr(args, flag, True)
    try:
        seed = list(STORAGES).index(storage)  # a training seed per storage: trained here, not found in a cache
        guided, stock, zero = (sampled(comfy, storage_graph(fixtures, name, weight_dtype, seed=seed, **kw))
                               for kw in (dict(weight=0.3), dict(weight=0.0, stock=True), dict(weight=0.0)))
        model = comfy.node_output("unet", 0)
    finally:
        if flag:
            setattr(args, flag, False)
    assert model.model.diffusion_model.input_blocks[1][1].proj_in.weight.dtype == expected
    adapter = comfy.node_output("finetune", 3)
    assert all(torch.isfinite(p.detach()).all() for p in adapter.parameters())
    assert any(float(a.up.detach().abs().max()) > 0 for a in adapter.unet.values())  # it trained through the stored weights
    assert torch.isfinite(guided).all()
    assert (zero - stock).abs().max() <= 1e-5          # weight 0 == the stock KSampler on the same stored model
    assert (guided - stock).abs().max() > 1e-3
