"""Training and guided sampling with the UNet stored in fp16, bf16 and fp8 (ComfyUI 0.3.64, CPU).

The user paths: `--fp16-unet` / `--bf16-unet` / `--fp8_e4m3fn-unet` (process flags read by
comfy.model_management.unet_dtype when a model loads) and Load Diffusion Model's `weight_dtype` (fp8_e4m3fn,
fp8_e5m2). The fixture's UNet is written once as a diffusion-model file and loaded by ComfyUI's own UNETLoader
under a distinct name per storage (so each test loads afresh instead of reusing the executor's cached MODEL);
the flags are set on ComfyUI's parsed args for the duration of the load, as the command line would.

Quantized checkpoints (QuantizedTensor weights in mixed-precision layers that are not nn.Linear) exist only in
newer ComfyUI (comfy/quant_ops.py, comfy_kitchen); that test skips on 0.3.64 and was run on ComfyUI 0.33.0.
"""
import importlib.util
import json
import os

import pytest
import torch

from comfyui_harness import WorkflowError
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


# ---- quantized checkpoints (newer ComfyUI) ------------------------------------------------------------------------
QUANTIZED = (".attn1.to_q", ".attn1.to_k", ".attn1.to_v", ".attn1.to_out.0", ".attn2.to_q", ".attn2.to_k",
             ".attn2.to_v", ".attn2.to_out.0", ".ff.net.0.proj", ".ff.net.2")  # every transformer-block Linear


def quantized_unet(comfy, unet_file) -> str:
    """The fixture UNet in ComfyUI's quantized checkpoint format (its QUANTIZATION.md): each transformer-block
    Linear weight as float8_e4m3fn with a per-tensor `weight_scale` and a per-layer `comfy_quant` JSON entry, which
    UNETLoader loads into mixed-precision layers with QuantizedTensor weights."""
    from comfy import utils
    path = unet_file.parent / "sine_test_sd15_unet_quantized_fp8.safetensors"
    if not path.exists():
        sd = utils.load_torch_file(str(unet_file))
        for key in [k for k in sd if k.endswith(".weight") and k[:-len(".weight")].endswith(QUANTIZED)]:
            layer, weight = key[:-len(".weight")], sd[key].float()
            scale = weight.abs().max() / torch.finfo(torch.float8_e4m3fn).max
            sd[key] = (weight / scale).to(torch.float8_e4m3fn)
            sd[layer + ".weight_scale"] = scale.reshape(())
            sd[layer + ".comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                                      dtype=torch.uint8)
        utils.save_torch_file(sd, str(path))
    comfy.folder_paths.filename_list_cache.clear()
    return path.name


def test_quantized_checkpoint_samples_with_sine_and_refuses_training(comfy, fixtures, unet_file):
    """Guided sampling adapts the mixed-precision Linear layers (found through CastWeightBiasOp, comfy/ops.py)
    with an adapter trained on the unquantized checkpoint; SINE Finetune on the quantized one names the problem."""
    if importlib.util.find_spec("comfy.quant_ops") is None:
        pytest.skip("this ComfyUI has no quantized checkpoints (comfy/quant_ops.py is newer than 0.3.64)")
    from comfy import quant_ops
    unet = {"class_type": "UNETLoader", "inputs": {"unet_name": quantized_unet(comfy, unet_file),
                                                    "weight_dtype": "default"}}
    ft = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=2, lr=1e-3, resolution=64, seed=21)
    nodes = {"image": ft["image"], "finetune": ft["finetune"], "unet": unet}
    results = {}
    for name, kw in (("guided", dict(weight=0.3)), ("stock", dict(weight=0.0, stock=True)),
                     ("zero", dict(weight=0.0))):
        g = sine_sample_graph(fixtures["checkpoint"], nodes, edit=EDIT, steps=3, **kw)
        g["sample"]["inputs"]["model"] = ["unet", 0]
        results[name] = sampled(comfy, g)
    layer = comfy.node_output("unet", 0).model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.to_k
    assert isinstance(layer.weight, quant_ops.QuantizedTensor) and not isinstance(layer, torch.nn.Linear)
    assert torch.isfinite(results["guided"]).all()
    assert (results["zero"] - results["stock"]).abs().max() <= 1e-5
    assert (results["guided"] - results["stock"]).abs().max() > 1e-3  # the adapter acted on the quantized layers

    ft["finetune"]["inputs"]["model"] = ["unet", 0]
    with pytest.raises(WorkflowError) as e:
        comfy.run({"ckpt": ft["ckpt"], "image": ft["image"], "finetune": ft["finetune"], "unet": unet,
                   "loss": ft["loss"]})
    for needle in ("SINE Finetune", "'model'", "stores quantized weights", "cannot train through them"):
        assert needle in str(e.value), str(e.value)[:600]
