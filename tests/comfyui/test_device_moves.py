"""Every node order a user can produce, under the GPU-copy emulation (tests/device_moves.py; issue 18).

On a GPU, ComfyUI copies every weight on each load and offload. A copy made outside inference mode leaves an
inference Parameter holding a normal tensor, and every later view of it raises "Inference tensors do not track
version counter" in this pack and in stock nodes alike. These tests run the orders users meet (stock nodes after
SINE Finetune, two fine-tunes, sampling then "Unload Models" then a fine-tune, the whole flow twice) with every
move copying, under normal VRAM and --lowvram (models loaded in part), and check that each prompt succeeds, gives
finite results, and trains what a run without the emulation trains.
"""
import pytest
import torch

import device_moves as emulation
from workflows_api import finetune_graph, sine_sample_graph, txt2img

SIZE = 64


def finetune(fixtures, seed, **inputs):
    g = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=3, lr=1e-3, seed=seed,
                       resolution=SIZE, **inputs)
    g["finetune"]["inputs"]["disk_cache"] = False  # each test trains: no hit from an earlier test's file
    return g


def stock_nodes_after(graph: dict) -> dict:
    """`graph` plus the stock nodes that share its checkpoint's MODEL, CLIP and VAE: CLIPTextEncode -> KSampler ->
    VAEDecode -> VAEEncode."""
    return {**graph,
            "stock_pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a dog", "clip": ["ckpt", 1]}},
            "stock_latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE,
                                                                          "batch_size": 1}},
            "stock_sample": {"class_type": "KSampler", "inputs": {
                "model": ["ckpt", 0], "positive": ["stock_pos", 0], "negative": ["stock_pos", 0],
                "latent_image": ["stock_latent", 0], "seed": 1, "steps": 2, "cfg": 7.5, "sampler_name": "euler",
                "scheduler": "normal", "denoise": 1.0}},
            "stock_decode": {"class_type": "VAEDecode", "inputs": {"samples": ["stock_sample", 0],
                                                                   "vae": ["ckpt", 2]}},
            "stock_encode": {"class_type": "VAEEncode", "inputs": {"pixels": ["stock_decode", 0],
                                                                   "vae": ["ckpt", 2]}},
            "stock_save": {"class_type": "SaveLatent", "inputs": {"samples": ["stock_encode", 0],
                                                                  "filename_prefix": "sine_moves"}}}


def decoded(comfy) -> torch.Tensor:
    return comfy.node_output("stock_decode", 0)


def adapter_params(adapter) -> dict:
    return {k: v.detach().clone() for k, v in adapter.named_parameters()}


def unload_models_button(comfy):
    """ComfyUI's "Unload Models" / POST /free: the prompt worker calls unload_all_models between prompts, outside
    the executor's inference mode (main.py @ a125cd84, prompt_worker)."""
    import comfy.model_management
    comfy.model_management.unload_all_models()


def test_stock_nodes_after_finetune(comfy, fixtures, device_moves):
    comfy.run(stock_nodes_after(finetune(fixtures, seed=80)))
    assert torch.isfinite(decoded(comfy)).all()
    # the stock nodes alone in the next prompt, on the same (cached) checkpoint objects the fine-tune used: so they
    # surely run after it, whatever order ComfyUI chose inside the first prompt
    stock = stock_nodes_after({"ckpt": finetune(fixtures, seed=80)["ckpt"]})
    stock["stock_sample"]["inputs"]["seed"] = 2
    comfy.run(stock)
    assert torch.isfinite(decoded(comfy)).all()
    # and once more in a new prompt, after the fine-tune's models were offloaded and reloaded
    comfy.reset_node_cache()
    comfy.run(stock_nodes_after(finetune(fixtures, seed=81)))
    assert torch.isfinite(decoded(comfy)).all()


@pytest.fixture(params=["normal", "lowvram"])
def vram_moves(request) -> int:
    """The test under the emulation of a normal-VRAM GPU, then of a --lowvram one; gives a seed offset per mode (the
    same inputs twice would give ComfyUI's cached node outputs, not a second run)."""
    request.getfixturevalue("device_moves" if request.param == "normal" else "device_moves_lowvram")
    return 0 if request.param == "normal" else 100


def test_finetune_then_finetune(comfy, fixtures, vram_moves):
    comfy.run(finetune(fixtures, seed=82 + vram_moves))
    # the second trains the text encoder too; then the stock CLIPTextEncode, KSampler and VAE nodes
    comfy.run(stock_nodes_after(finetune(fixtures, seed=83 + vram_moves, text_encoder="lora")))
    assert comfy.node_output("finetune", 3).text_encoder
    assert torch.isfinite(decoded(comfy)).all()


def test_sample_unload_all_then_finetune(comfy, fixtures, vram_moves):
    comfy.run(txt2img(fixtures["checkpoint"], "a dog", seed=1 + vram_moves, size=SIZE, steps=2))
    unload_models_button(comfy)
    comfy.run(finetune(fixtures, seed=84 + vram_moves))
    unload_models_button(comfy)
    comfy.run(stock_nodes_after(finetune(fixtures, seed=85 + vram_moves)))
    assert torch.isfinite(decoded(comfy)).all()


def user_flow(fixtures, seed) -> dict:
    """KSampler -> SINE Finetune -> SINE Guided Sampler -> VAEDecode, in one prompt (the example workflows' order)."""
    g = sine_sample_graph(fixtures["checkpoint"], {}, edit="a dog in the snow", size=(SIZE, SIZE), steps=3)
    g.update({k: v for k, v in finetune(fixtures, seed).items() if k not in ("ckpt",)})
    g["first"] = {"class_type": "KSampler", "inputs": {**g["sample"]["inputs"]}}
    for name in ("sine_adapter", "source_conditioning", "finetuned_weight", "start_percent", "end_percent"):
        g["first"]["inputs"].pop(name)
    g["first_decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["first", 0], "vae": ["ckpt", 2]}}
    g["first_show"] = {"class_type": "PreviewImage", "inputs": {"images": ["first_decode", 0]}}
    g["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}}
    g["show"] = {"class_type": "PreviewImage", "inputs": {"images": ["decode", 0]}}
    return g


def test_user_flow_twice(comfy, fixtures, device_moves):
    for seed in (86, 87):
        comfy.run(user_flow(fixtures, seed))
        assert torch.isfinite(comfy.node_output("decode", 0)).all()
        assert torch.isfinite(comfy.node_output("first_decode", 0)).all()


def test_lowvram_stock_nodes_and_user_flow(comfy, fixtures, device_moves_lowvram):
    """--lowvram: the stock nodes after SINE Finetune, then the whole flow, with the sampled models loaded in part."""
    comfy.run(stock_nodes_after(finetune(fixtures, seed=89)))
    assert torch.isfinite(decoded(comfy)).all()
    comfy.run(user_flow(fixtures, seed=90))
    assert torch.isfinite(comfy.node_output("decode", 0)).all()
    assert torch.isfinite(comfy.node_output("first_decode", 0)).all()


def test_emulated_finetune_trains_what_a_cpu_finetune_trains(comfy, fixtures):
    """The weights the training reads under copying moves are the checkpoint's: same adapter as without them."""
    graph = finetune(fixtures, seed=88, text_encoder="lora")
    comfy.reset_node_cache()
    comfy.run(graph)
    plain = adapter_params(comfy.node_output("finetune", 3))
    with emulation.emulated(comfy):
        comfy.run(txt2img(fixtures["checkpoint"], "a dog", seed=1, size=SIZE, steps=2))  # models moved first
        comfy.run(graph)
        moved = adapter_params(comfy.node_output("finetune", 3))
    assert plain.keys() == moved.keys()
    worst = max((plain[k] - moved[k]).abs().max().item() for k in plain)
    assert worst <= 1e-6, worst


def test_emulation_copies_on_every_move(comfy, fixtures, device_moves):
    """The emulation itself: a load really replaces the weight tensors (else these tests would prove nothing)."""
    import comfy.model_management as mm
    comfy.run(txt2img(fixtures["checkpoint"], "a dog", seed=1, size=SIZE, steps=1))
    model = comfy.node_output("ckpt", 0)
    # held, so that the allocator cannot hand the same memory to the copy and make the pointers equal by chance
    before = model.model.diffusion_model.out[2].weight.data
    with torch.inference_mode():
        mm.unload_all_models()
        mm.load_models_gpu([model])
    assert model.model.diffusion_model.out[2].weight.data_ptr() != before.data_ptr()
    assert mm.get_torch_device() == emulation.LOAD_DEVICE


def test_lowvram_emulation_loads_in_part(comfy, fixtures, device_moves_lowvram):
    """The --lowvram emulation itself: sampling loads the UNet in part (else the lowvram test would prove nothing)."""
    import comfy.model_management as mm
    comfy.run(txt2img(fixtures["checkpoint"], "a dog", seed=1, size=SIZE, steps=1))
    model = comfy.node_output("ckpt", 0)
    with torch.inference_mode():
        mm.load_models_gpu([model])  # as KSampler loads it
    assert model.model.model_lowvram
    assert model.loaded_size() < model.model_size() / 2
    assert mm.vram_state == mm.VRAMState.LOW_VRAM
