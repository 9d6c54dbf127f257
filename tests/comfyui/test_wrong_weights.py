"""SINE Finetune trains on the checkpoint it is given, whatever an earlier prompt left loaded (issue 21.1).

In one ComfyUI process, a prompt that left a LoRA-patched clone of the same checkpoint loaded (a stock LoraLoader +
KSampler, or SINE Finetune on a LoRA-patched MODEL) shares its weight tensors with the plain MODEL. SINE Finetune on
the plain MODEL afterwards must equal a fine-tune in a clean state, plain CPU and under the GPU-copy emulation.

On ComfyUI 0.3.64 the training itself was right before the fix too (these tests passed on e5cd474 in both modes:
ComfyUI's load of the training clone unpatches the other clone first); what read the patched weights was the cache
key, computed before that load (the last two tests, which failed on e5cd474).
"""
from pathlib import Path

import pytest
import safetensors.torch
import torch

from workflows_api import finetune_graph, txt2img

LORA_NAME = "wrong_weights/strong_style.safetensors"


def graph(fixtures, model=("ckpt", 0), seed=2101, disk_cache=False):
    g = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=3, lr=1e-3, seed=seed, resolution=64)
    g["finetune"]["inputs"].update(disk_cache=disk_cache, model=list(model))
    return g


def with_lora(g):
    g["lora"] = {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                        "lora_name": LORA_NAME, "strength_model": 1.0,
                                                        "strength_clip": 1.0}}
    return g


def lora_ksampler(fixtures):
    g = with_lora(txt2img(fixtures["checkpoint"], "a dog", seed=1, size=64, steps=2))
    g["sample"]["inputs"]["model"] = ["lora", 0]
    return g


def params(adapter) -> dict:
    """By name: an adapter read back from the disk cache lists its layers in the file's order."""
    return {name: p.detach().clone() for name, p in adapter.named_parameters()}


def max_difference(a, b) -> float:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    return max(float((pa[n] - pb[n]).abs().max()) for n in pa)


@pytest.fixture(scope="module")
def strong_lora(comfy, fixtures):
    """A LoRA on every attention projection, large enough that training on it gives another adapter."""
    comfy.run({"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures["checkpoint"]}},
               "show": {"class_type": "PreviewAny", "inputs": {"source": ["ckpt", 0]}}})
    unet = comfy.node_output("ckpt", 0).model.diffusion_model
    g = torch.Generator().manual_seed(21)
    sd = {}
    for name, m in unet.named_modules():
        if name.endswith(("attn1.to_q", "attn1.to_k", "attn2.to_q", "attn1.to_out.0")):
            out_f, in_f = m.weight.shape
            key = f"diffusion_model.{name}"
            sd[f"{key}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.5
            sd[f"{key}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.5
            sd[f"{key}.alpha"] = torch.tensor(4.0)
    path = Path(comfy.folder_paths.get_folder_paths("loras")[0]) / LORA_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(sd, str(path))
    comfy.folder_paths.filename_list_cache.clear()
    return LORA_NAME


_runs = iter(range(1000, 100000))


def fresh_run(comfy, g, clean: bool = False):
    """Run `g` as a user re-queues it: the checkpoint loader's output is ComfyUI's cached one (the weights shared
    with the earlier prompts), SINE Finetune runs again (a save_every beyond its steps changes nothing but the
    node's inputs) and trains: nothing is reused from memory. clean: after ComfyUI has unloaded (and unpatched)
    every model, as a fresh process starts."""
    g["finetune"]["inputs"]["save_every"] = next(_runs)
    comfy.pack_module("nodes.training_cache")._recent.clear()
    if clean:
        import comfy.model_management as mm
        mm.unload_all_models()
    comfy.run(g)
    return comfy.node_output("finetune", 3)


def check_after_lora_prompts(comfy, fixtures):
    clean = fresh_run(comfy, graph(fixtures), clean=True)
    again = fresh_run(comfy, graph(fixtures), clean=True)
    noise = max_difference(clean, again)
    assert noise < 1e-5, noise
    tolerance = 10 * max(noise, 1e-7)

    on_lora = fresh_run(comfy, with_lora(graph(fixtures, model=("lora", 0))), clean=True)
    assert max_difference(on_lora, clean) > 100 * tolerance, "the LoRA does not change training: no test"

    comfy.run(lora_ksampler(fixtures))  # a stock LoRA prompt leaves the LoRA-patched clone loaded
    after_ksampler = fresh_run(comfy, graph(fixtures))
    assert max_difference(after_ksampler, clean) <= tolerance, \
        f"trained on other weights after a LoRA KSampler: {max_difference(after_ksampler, clean):.3g} from clean, " \
        f"{max_difference(after_ksampler, on_lora):.3g} from the LoRA run"

    again_on_lora = fresh_run(comfy, with_lora(graph(fixtures, model=("lora", 0))))  # SINE Finetune on the LoRA
    assert max_difference(again_on_lora, on_lora) <= tolerance
    after_lora_finetune = fresh_run(comfy, graph(fixtures))
    assert max_difference(after_lora_finetune, clean) <= tolerance, \
        f"trained on other weights after a LoRA fine-tune: {max_difference(after_lora_finetune, clean):.3g} " \
        f"from clean, {max_difference(after_lora_finetune, on_lora):.3g} from the LoRA run"


def test_finetune_after_a_lora_prompt_trains_on_the_plain_checkpoint(comfy, fixtures, strong_lora):
    check_after_lora_prompts(comfy, fixtures)


def test_finetune_after_a_lora_prompt_under_device_moves(comfy, fixtures, strong_lora, device_moves):
    check_after_lora_prompts(comfy, fixtures)


def lora_finetune(fixtures, seed):
    """SINE Finetune on the LoRA-patched MODEL with the same settings (cached too, under its own key)."""
    return with_lora(graph(fixtures, model=("lora", 0), seed=seed, disk_cache=True))


def check_cache_key_after_a_lora_prompt(comfy, fixtures, seed, earlier):
    """The disk-cache key digests the checkpoint's weights: read while a LoRA prompt's patches are still on them,
    the plain MODEL got another key, so its cached fine-tune was missed (and retrained). After a fine-tune on the
    LoRA MODEL with the same settings, the plain MODEL must find its own entry, not the LoRA run's."""
    g = graph(fixtures, seed=seed, disk_cache=True)
    first = fresh_run(comfy, g, clean=True)
    assert [v for v, t, _ in comfy.progress if t == 3], "the first run did not train"
    if earlier == "lora_ksampler":
        comfy.run(lora_ksampler(fixtures))
    else:
        on_lora = fresh_run(comfy, lora_finetune(fixtures, seed))
        assert [v for v, t, _ in comfy.progress if t == 3], "the LoRA fine-tune reused the plain one's entry"
        assert max_difference(on_lora, first) > 1e-4, "the LoRA does not change training: no test"
    again = fresh_run(comfy, g)
    assert not [v for v, t, _ in comfy.progress if t == 3], "the cached fine-tune was not found after a LoRA prompt"
    assert max_difference(again, first) == 0


@pytest.mark.parametrize("earlier", ["lora_ksampler", "lora_finetune"])
def test_the_cache_key_reads_the_unpatched_weights(comfy, fixtures, strong_lora, earlier):
    check_cache_key_after_a_lora_prompt(comfy, fixtures, seed={"lora_ksampler": 2121, "lora_finetune": 2123}[earlier],
                                        earlier=earlier)


@pytest.mark.parametrize("earlier", ["lora_ksampler", "lora_finetune"])
def test_the_cache_key_reads_the_unpatched_weights_under_device_moves(comfy, fixtures, strong_lora, device_moves,
                                                                     earlier):
    check_cache_key_after_a_lora_prompt(comfy, fixtures, seed={"lora_ksampler": 2122, "lora_finetune": 2124}[earlier],
                                        earlier=earlier)
