"""Spatial control of the SINE mix (mask / outside_weight / mask_feather) inside real ComfyUI, on the fixtures."""
import pytest
import torch

from comfyui_harness import WorkflowError
from test_guidance_sampling import EDIT, adapter_nodes, guider_graph, run_latent
from workflows_api import sine_sample_graph


def with_mask(graph, node, value=None, *, left=None, outside=0.0, feather=0, size=64):
    """Connect a mask to `node`'s entry: a SolidMask of `value`, or `left` = 1 on the left part, 0 elsewhere."""
    if left is None:
        graph["mask"] = {"class_type": "SolidMask", "inputs": {"value": value, "width": size, "height": size}}
    else:
        graph["mask_bg"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size, "height": size}}
        graph["mask_fg"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": left, "height": size}}
        graph["mask"] = {"class_type": "MaskComposite", "inputs": {
            "destination": ["mask_bg", 0], "source": ["mask_fg", 0], "x": 0, "y": 0, "operation": "add"}}
    graph[node]["inputs"].update(mask=["mask", 0], outside_weight=outside, mask_feather=feather)
    return graph


@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("dpmpp_2m", "karras")])
def test_constant_masks_equal_todays_results_and_a_half_mask_differs(comfy, fixtures, sampler, scheduler):
    nodes = adapter_nodes(fixtures)
    kw = dict(edit=EDIT, sampler=sampler, scheduler=scheduler, steps=4)

    def graph(**gk):
        return sine_sample_graph(fixtures["checkpoint"], nodes, **kw, **gk)
    plain = run_latent(comfy, graph(weight=0.3))
    stock = run_latent(comfy, graph(stock=True))
    ones = run_latent(comfy, with_mask(graph(weight=0.3), "sample", 1.0, outside=0.1, feather=3))
    assert torch.equal(ones, plain)  # an all-ones mask: the weight as set everywhere, bit for bit
    zeros = run_latent(comfy, with_mask(graph(weight=0.3), "sample", 0.0, outside=0.0))
    assert (zeros - stock).abs().max() <= 1e-5  # outside weight 0 everywhere: the stock KSampler
    half = run_latent(comfy, with_mask(graph(weight=0.3), "sample", left=32, outside=0.0))
    assert (half - plain).abs().max() > 1e-3 and (half - stock).abs().max() > 1e-3
    feathered = run_latent(comfy, with_mask(graph(weight=0.3), "sample", left=32, outside=0.0, feather=2))
    assert (feathered - half).abs().max() > 1e-4


def test_masked_entries_in_the_guider_compose_and_the_sum_is_checked_per_pixel(comfy, fixtures):
    nodes = adapter_nodes(fixtures)
    nodes["extra"] = {"class_type": "SINE_AddFinetunedModel", "inputs": {
        "sine_adapter": ["finetune", 3], "source_conditioning": ["finetune", 2], "finetuned_weight": 0.8,
        "start_percent": 0.0, "end_percent": 0.6, "mask": ["mask_right", 0], "outside_weight": 0.0}}
    nodes["mask_right"] = {"class_type": "InvertMask", "inputs": {"mask": ["mask", 0]}}

    def graph(guider_weight):
        g = guider_graph(fixtures, nodes, scheduler="normal", steps=4, weight=guider_weight, extra="extra")
        return with_mask(g, "guider", left=32, outside=0.0)
    # 0.8 on the left from the guider's entry, 0.8 on the right from the extra one: 0.8 + 0.8 > 1 overall but
    # never at one pixel, so it runs
    out = run_latent(comfy, graph(0.8), "run")
    assert torch.isfinite(out).all()
    g = graph(0.8)
    g["guider"]["inputs"]["outside_weight"] = 0.5  # now 0.5 + 0.8 on the right
    with pytest.raises(WorkflowError) as e:
        comfy.run(g)
    msg = str(e.value)
    assert "SINE Guider: inputs 'finetuned_weight' / 'outside_weight' / 'mask'" in msg and "1.300 > 1" in msg


def test_mask_works_with_controlnet_and_a_latent_noise_mask(comfy, fixtures):
    nodes = adapter_nodes(fixtures)

    def graph(**kw):
        g = sine_sample_graph(fixtures["checkpoint"], nodes, edit=EDIT, steps=3, **kw)
        g["cnet"] = {"class_type": "ControlNetLoader", "inputs": {"control_net_name": fixtures["controlnet"]}}
        g["hint"] = {"class_type": "LoadImage", "inputs": {"image": fixtures["hint_image"]}}
        g["apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["pos", 0], "negative": ["neg", 0], "control_net": ["cnet", 0], "image": ["hint", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        g["keep_top"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": 64, "height": 32}}
        g["noise_bg"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": 64, "height": 64}}
        g["noise_mask"] = {"class_type": "MaskComposite", "inputs": {
            "destination": ["noise_bg", 0], "source": ["keep_top", 0], "x": 0, "y": 0, "operation": "add"}}
        g["masked"] = {"class_type": "SetLatentNoiseMask", "inputs": {"samples": ["latent", 0],
                                                                      "mask": ["noise_mask", 0]}}
        g["sample"]["inputs"].update(positive=["apply", 0], negative=["apply", 1], latent_image=["masked", 0])
        return g
    stock = run_latent(comfy, graph(stock=True))
    masked = run_latent(comfy, with_mask(graph(weight=0.6), "sample", left=32, outside=0.1, feather=1))
    assert torch.equal(masked[..., 4:, :], stock[..., 4:, :])  # the noise mask still freezes its region exactly
    assert (masked[..., :4, :] - stock[..., :4, :]).abs().max() > 1e-3
