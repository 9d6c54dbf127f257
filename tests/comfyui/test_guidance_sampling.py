"""SINE Guider / Guided Sampler inside real ComfyUI, on the random-weight fixtures at 64-128 px."""
import itertools
from contextlib import contextmanager

import pytest
import torch

from workflows_api import finetune_graph, sine_sample_graph

EDIT = "photo of a dog wearing a superhero cape"


def adapter_nodes(fixtures, *, seed=0, prompt="photo of a sks dog", name="finetune", patch=None, steps=3,
                  method="lora"):
    """The LoadImage + SINE Finetune part of a graph (short training: these tests check guidance, not quality)."""
    g = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=steps, lr=1e-3, seed=seed,
                       prompt=prompt, resolution=64, patch=patch, method=method)
    nodes = {"image": g["image"], name: g["finetune"]}
    if patch is not None:
        nodes["patch"] = g["patch"]
    return nodes


def run_latent(comfy, graph, node="sample"):
    comfy.run(graph)
    return comfy.node_output(node, 0)["samples"]


def test_weight_zero_or_empty_window_equals_stock_ksampler(comfy, fixtures):
    nodes = adapter_nodes(fixtures)
    for sampler, scheduler in (("euler", "normal"), ("dpmpp_2m", "karras")):
        kw = dict(edit=EDIT, sampler=sampler, scheduler=scheduler, steps=4)
        stock = run_latent(comfy, sine_sample_graph(fixtures["checkpoint"], nodes, stock=True, **kw))
        zero = run_latent(comfy, sine_sample_graph(fixtures["checkpoint"], nodes, weight=0.0, **kw))
        empty = run_latent(comfy, sine_sample_graph(fixtures["checkpoint"], nodes, start=0.3, end=0.3, **kw))
        assert (zero - stock).abs().max() <= 1e-5 and (empty - stock).abs().max() <= 1e-5
        guided = run_latent(comfy, sine_sample_graph(fixtures["checkpoint"], nodes, weight=0.3, **kw))
        assert (guided - stock).abs().max() > 1e-3


def guider_graph(fixtures, nodes, *, scheduler, steps, weight=0.3, extra=None, stock=False):
    """SINE Guider (or the stock CFGGuider) -> SamplerCustomAdvanced."""
    g = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures["checkpoint"]}},
        **nodes,
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": EDIT, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 5}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["ckpt", 0], "scheduler": scheduler,
                                                              "steps": steps, "denoise": 1.0}},
        "run": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["noise", 0], "guider": ["guider", 0],
                                                                  "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
                                                                  "latent_image": ["latent", 0]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["run", 0], "filename_prefix": "sine"}},
    }
    if stock:
        g["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["ckpt", 0], "positive": ["pos", 0],
                                                             "negative": ["neg", 0], "cfg": 7.5}}
    else:
        g["guider"] = {"class_type": "SINE_Guider", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 7.5,
            "sine_adapter": ["finetune", 3], "source_conditioning": ["finetune", 2], "finetuned_weight": weight,
            "start_percent": 0.0, "end_percent": 0.6}}
        if extra is not None:
            g["guider"]["inputs"]["extra_models"] = [extra, 0]
    return g


@contextmanager
def unet_calls(comfy):
    """Records (sigma, batch rows) of every UNet forward call the SINE guider makes (test instrumentation on the
    pack's RoutingWrapper, the model_function_wrapper each forward call goes through)."""
    wrapper_cls = comfy.pack_module("nodes.model_patching").RoutingWrapper
    original, calls = wrapper_cls.__call__, []

    def recording(self, apply_model, args):
        calls.append((float(args["timestep"][0]), args["input"].shape[0]))
        return original(self, apply_model, args)

    wrapper_cls.__call__ = recording
    try:
        yield calls
    finally:
        wrapper_cls.__call__ = original


def per_step(calls):
    """[(rows per step, forward calls per step)] grouping consecutive calls at the same sigma (one sampler step)."""
    steps = [list(group) for _, group in itertools.groupby(calls, key=lambda c: c[0])]
    return [sum(rows for _, rows in g) for g in steps], [len(g) for g in steps]


def sd_sigma_at(t: int) -> float:
    """σ(t) of SD's linear-in-sqrt beta schedule, computed here from the betas (independent of ComfyUI)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)[t]
    return float(((1 - ab) / ab) ** 0.5)


@pytest.mark.parametrize("scheduler", ["normal", "karras"])
@pytest.mark.parametrize("steps", [5, 8])
def test_window_boundary_and_unet_evaluations_per_step(comfy, fixtures, scheduler, steps):
    with unet_calls(comfy) as calls:
        comfy.run(guider_graph(fixtures, adapter_nodes(fixtures), scheduler=scheduler, steps=steps))
    sigmas = comfy.node_output("sigmas", 0)
    rows, forwards = per_step(calls)
    k400 = sd_sigma_at(400)  # paper K = 400: guided while t > 400, i.e. sigma > sigma(400)
    sigmas = [float(s) for s in sigmas]
    expected_rows = [3 if s > k400 else 2 for s in sigmas[:-1]]
    assert 3 in expected_rows and 2 in expected_rows, "schedule does not straddle the window; pick other steps"
    # euler's call at sigmas[i] comes after step i - 1's report: where the window end lies within
    # sigmas[i] .. sigmas[i - 1], the host cannot tell the call's side without a read, so its batch holds the
    # fine-tuned row too (picked on the device, tests/comfyui/test_guidance_schedule.py); only that step
    crossing = [i for i in range(1, len(sigmas) - 1) if sigmas[i] <= k400 < sigmas[i - 1]]
    assert len(crossing) == 1 and expected_rows[crossing[0]] == 2
    expected_rows[crossing[0]] = 3
    assert rows == expected_rows
    assert forwards == [1] * len(expected_rows)  # base and fine-tuned rows in ONE forward


def test_guider_equals_stock_cfg_guider_at_weight_zero_and_two_models_compose(comfy, fixtures):
    nodes = {**adapter_nodes(fixtures), **adapter_nodes(fixtures, seed=1, prompt="painting in sks style",
                                                        name="style")}
    stock = run_latent(comfy, guider_graph(fixtures, nodes, scheduler="normal", steps=4, stock=True), "run")
    zero = run_latent(comfy, guider_graph(fixtures, nodes, scheduler="normal", steps=4, weight=0.0), "run")
    assert (zero - stock).abs().max() <= 1e-5
    single = run_latent(comfy, guider_graph(fixtures, nodes, scheduler="normal", steps=4), "run")
    nodes["extra"] = {"class_type": "SINE_AddFinetunedModel", "inputs": {
        "sine_adapter": ["style", 3], "source_conditioning": ["style", 2], "finetuned_weight": 0.4,
        "start_percent": 0.0, "end_percent": 0.6}}
    with unet_calls(comfy) as calls:
        both = run_latent(comfy, guider_graph(fixtures, nodes, scheduler="normal", steps=4, extra="extra"), "run")
    rows, forwards = per_step(calls)
    assert max(rows) == 4 and set(forwards) == {1}
    assert (both - single).abs().max() > 1e-3 and torch.isfinite(both).all()


def test_controlnet_steers_and_img2img_runs(comfy, fixtures):
    nodes = adapter_nodes(fixtures)
    outs = []
    for strength in (1.0, 0.5):
        g = sine_sample_graph(fixtures["checkpoint"], nodes, edit=EDIT, steps=3)
        g["cnet"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": fixtures["controlnet"]}}
        g["hint"] = {"class_type": "LoadImage", "inputs": {"image": fixtures["hint_image"]}}
        g["hint_small"] = {"class_type": "ImageScale", "inputs": {"image": ["hint", 0], "upscale_method": "bilinear",
                                                                  "width": 64, "height": 64, "crop": "disabled"}}
        g["apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cnet", 0], "image": ["hint_small", 0],
            "strength": strength, "start_percent": 0.0, "end_percent": 1.0}}
        g["sample"]["inputs"]["positive"] = ["apply", 0]
        g["sample"]["inputs"]["negative"] = ["apply", 1]
        outs.append(run_latent(comfy, g))
    assert (outs[0] - outs[1]).abs().max() > 1e-3

    g = sine_sample_graph(fixtures["checkpoint"], nodes, edit=EDIT, steps=5, denoise=0.6)
    g["small"] = {"class_type": "ImageScale", "inputs": {"image": ["image", 0], "upscale_method": "bilinear",
                                                         "width": 64, "height": 64, "crop": "disabled"}}
    g["encode"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["small", 0], "vae": ["ckpt", 2]}}
    g["sample"]["inputs"]["latent_image"] = ["encode", 0]
    out = run_latent(comfy, g)
    source = comfy.node_output("encode", 0)["samples"]
    assert out.shape == source.shape and torch.isfinite(out).all()


def noise_masked(g, node):
    """A latent noise mask (left half re-generated, right half kept) on `node`'s latent_image (64 px graphs)."""
    g["keep"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
    g["left"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 32, "height": 64}}
    g["mask"] = {"class_type": "MaskComposite", "inputs": {"destination": ["keep", 0], "source": ["left", 0],
                                                           "x": 0, "y": 0, "operation": "add"}}
    g["masked"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["latent", 0], "mask": ["mask", 0]}}
    g[node]["inputs"]["latent_image"] = ["masked", 0]
    return g


def test_model_patches_noise_masks_and_full_finetunes(comfy, fixtures):
    """RescaleCFG (sampler_cfg_function) and a latent noise mask behave as with KSampler; full fine-tunes sample."""
    def graph(nodes, **kw):
        g = noise_masked(sine_sample_graph(fixtures["checkpoint"], nodes, edit=EDIT, steps=3, **kw), "sample")
        g["rescale"] = {"class_type": "RescaleCFG", "inputs": {"model": ["ckpt", 0], "multiplier": 0.7}}
        g["sample"]["inputs"]["model"] = ["rescale", 0]
        return g

    nodes = adapter_nodes(fixtures)
    stock = run_latent(comfy, graph(nodes, stock=True))
    zero = run_latent(comfy, graph(nodes, weight=0.0))
    guided = run_latent(comfy, graph(nodes, weight=0.3))
    assert (zero - stock).abs().max() <= 1e-5
    assert (guided - stock).abs().max() > 1e-3
    assert torch.equal(guided[..., 4:], stock[..., 4:])  # outside the mask the latent is kept, as KSampler does
    full = adapter_nodes(fixtures, method="full", seed=4)
    out = run_latent(comfy, sine_sample_graph(fixtures["checkpoint"], full, edit=EDIT, steps=3))
    plain = run_latent(comfy, sine_sample_graph(fixtures["checkpoint"], full, edit=EDIT, steps=3, stock=True))
    assert comfy.node_output("finetune", 3).unet and (out - plain).abs().max() > 1e-3
