"""SINE Finetune's compile setting (issue 19, beyond eager): the UNet's training step under torch.compile.

torch.compile traces with the "aot_eager" backend here: TorchDynamo captures the training forward and AOTAutograd
builds its backward, exactly as for the node's "inductor", but no code is generated (inductor's C++ code for the
full SD1.5 UNet takes minutes on this CPU; what it generates is torch's, and only a GPU can time it). ComfyUI's
attention is its GPU choice (PyTorch SDPA): on the CPU it picks split attention, which asks psutil for free
memory inside every attention call, a graph break of ComfyUI's own that no GPU run has.
"""
import pytest
import torch

from comfyui_harness import WorkflowError
from test_wrong_weights import fresh_run, max_difference
from workflows_api import finetune_graph, txt2img

@pytest.fixture
def traced(comfy, monkeypatch):
    """torch.compile with the tracing-only backend, GPU attention, fresh dynamo caches and graph-break counters."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    import comfy.ldm.modules.attention as attention
    monkeypatch.setattr(comfy.pack_module("nodes.training_run"), "COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    monkeypatch.setattr(attention, "optimized_attention_masked", attention.attention_pytorch)
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


def graph(fixtures, compile: bool, **finetune_inputs):
    g = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=3, lr=1e-3, seed=1901, resolution=64)
    g["finetune"]["inputs"].update(disk_cache=False, compile=compile, **finetune_inputs)
    return g


def trained(comfy, g):
    """(adapter, losses) of `g` run so that SINE Finetune trains (test_wrong_weights.fresh_run)."""
    adapter = fresh_run(comfy, g)
    return adapter, list(adapter.losses)


def unet_state(comfy):
    """The user's UNet as the checkpoint loader's cached output holds it: the module and every parameter object."""
    unet = comfy.node_output("ckpt", 0).model.diffusion_model
    return unet, {name: p for name, p in unet.named_parameters()}


@pytest.mark.parametrize("inputs", [{}, {"gradient_checkpointing": True}, {"text_encoder": "lora"}],
                         ids=["plain", "checkpointing", "text_encoder"])
def test_compiled_finetune_equals_uncompiled_with_no_graph_break(comfy, fixtures, traced, inputs):
    eager, eager_losses = trained(comfy, graph(fixtures, compile=False, **inputs))
    unet, params = unet_state(comfy)
    compiled, compiled_losses = trained(comfy, graph(fixtures, compile=True, **inputs))

    assert traced["stats"]["unique_graphs"] >= 1, "nothing was compiled: no test"
    assert not traced["graph_break"], dict(traced["graph_break"])
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert max_difference(compiled, eager) < 1e-5
    # the UNet the training clone shared with the user's MODEL has its own forward and weights back
    after, after_params = unet_state(comfy)
    assert after is unet and "forward" not in vars(unet)
    assert after_params.keys() == params.keys() and all(after_params[n] is params[n] for n in params)


def test_each_run_keeps_its_compiled_code_to_itself(comfy, fixtures, traced):
    """Compiled code is kept on the code object a frame starts from, guarded on the run's adapters: on the UNet's
    own forward, every run would add one entry until torch's recompile limit (8) silently turned compiling off."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    for seed in (1902, 1903):
        trained(comfy, graph(fixtures, compile=True, seed=seed))
    unet, _ = unet_state(comfy)
    assert traced["stats"]["unique_graphs"] == 2  # one per run, whatever its number of steps
    assert not traced["graph_break"]
    assert _debug_get_cache_entry_list(type(unet).forward.__code__) == []


@pytest.mark.parametrize("vram", ["normal", "lowvram"])
def test_stock_nodes_after_a_compiled_finetune(comfy, fixtures, traced, request, vram):
    """Under the GPU-copy emulation (issue 18's failure mode), normal and --lowvram: the compiled run trains, and
    the stock nodes after it still read the shared weights."""
    request.getfixturevalue("device_moves" if vram == "normal" else "device_moves_lowvram")
    _, losses = trained(comfy, graph(fixtures, compile=True))
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    comfy.run(txt2img(fixtures["checkpoint"], "a dog", seed=1, size=64, steps=2))
    assert comfy.node_output("decode", 0).isfinite().all()


def test_a_failing_compile_names_the_input(comfy, fixtures, traced, monkeypatch):
    def broken_backend(graph_module, example_inputs):
        raise RuntimeError("no compiler on this machine")
    monkeypatch.setattr(comfy.pack_module("nodes.training_run"), "COMPILE_BACKEND", broken_backend)
    with pytest.raises(WorkflowError) as failure:
        trained(comfy, graph(fixtures, compile=True))
    message = str(failure.value)
    assert "SINE Finetune" in message and "'compile'" in message and "set compile to false" in message, message
    assert "no compiler on this machine" in message


@pytest.mark.parametrize("crop_bank", [0, 4], ids=["fresh_crops", "crop_bank"])
def test_patch_mode_compiled_equals_uncompiled_with_no_graph_break(comfy, fixtures, traced, crop_bank):
    """Patch mode: each step's crop window of the positional grid (and the learnable grid gate) goes into the one
    compiled graph as an input, made before the forward from the step's box."""
    patch = {"working_size": 128, "train_resolution": 64, "min_crop_frac": 0.1, "max_crop_frac": 1.0,
             "whole_image_prob": 0.0, "grid_size": 16, "interpolation": "bilinear", "grid_gate": True,
             "crop_bank": crop_bank, "recon_loss": False}

    def patch_graph(compile):
        g = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=3, lr=1e-3, seed=1904,
                           patch=patch)
        g["finetune"]["inputs"].update(disk_cache=False, compile=compile)
        return g

    eager, eager_losses = trained(comfy, patch_graph(False))
    compiled, compiled_losses = trained(comfy, patch_graph(True))
    assert traced["stats"]["unique_graphs"] >= 1, "nothing was compiled: no test"
    assert not traced["graph_break"], dict(traced["graph_break"])
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-4)
    assert max_difference(compiled, eager) < 1e-5
    assert abs(float(compiled.grid_gate) - float(eager.grid_gate)) < 1e-6
