"""Concurrent UNet forwards of one SINE guider model with different row routings (ComfyUI's multi-GPU workers
call the model_function_wrapper from several threads): each call routes its own rows, as a serial call does."""
import threading

import torch

from workflows_api import finetune_graph


def test_concurrent_forwards_route_independently(comfy, fixtures):
    from comfy import model_management
    comfy.run(finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=2, lr=1e-3, resolution=64))
    source = comfy.node_output("finetune", 2)
    guider = comfy.nodes.NODE_CLASS_MAPPINGS["SINE_Guider"].execute(
        model=comfy.node_output("ckpt", 0), positive=source, negative=source, cfg=7.5,
        sine_adapter=comfy.node_output("finetune", 3), source_conditioning=source, finetuned_weight=0.3,
        start_percent=0.0, end_percent=0.6).result[0]
    patcher = guider.model_patcher
    wrapper = patcher.model_options["model_function_wrapper"]
    key = comfy.pack_module("nodes.model_patching").COND_OWNER_KEY
    gen = torch.Generator().manual_seed(0)
    x, cond = torch.randn(3, 4, 8, 8, generator=gen), torch.randn(3, 77, 768, generator=gen)
    sigma = torch.full((3,), 5.0)

    def forward(owner):
        args = {"input": x, "timestep": sigma, "cond_or_uncond": [0, 1, 2],
                "c": {"c_crossattn": cond, "transformer_options": {key: owner}}}
        with torch.inference_mode():
            return wrapper(patcher.model.apply_model, args)

    routings = {"a": [-1, -1, 0], "b": [0, 0, -1]}  # cond index -> adapter id (-1 = base model)
    with torch.inference_mode():
        model_management.load_models_gpu([patcher])
    serial = {name: forward(owner) for name, owner in routings.items()}
    assert (serial["a"] - serial["b"]).abs().max() > 1e-4
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def run(name):
        try:
            barrier.wait(timeout=30)
            results[name] = [forward(routings[name]) for _ in range(3)]
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in routings]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name, outs in results.items():
        assert all(torch.equal(out, serial[name]) for out in outs), name


def test_a_unet_call_has_no_host_sync_and_two_ops_per_adapted_layer(comfy, fixtures):
    """Issue 19: inside a UNet call of the guider's model no .item(), nonzero or host-data copy is dispatched,
    and the fine-tuned rows cost at most 2 operations per adapted layer (the down projection and one fused
    multiply-add into the layer's output)."""
    from comfy import model_management
    from op_counter import OpCounter
    comfy.run(finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=2, lr=1e-3, resolution=64))
    source = comfy.node_output("finetune", 2)
    adapter = comfy.node_output("finetune", 3)
    guider = comfy.nodes.NODE_CLASS_MAPPINGS["SINE_Guider"].execute(
        model=comfy.node_output("ckpt", 0), positive=source, negative=source, cfg=7.5, sine_adapter=adapter,
        source_conditioning=source, finetuned_weight=0.3, start_percent=0.0, end_percent=0.6).result[0]
    patcher = guider.model_patcher
    wrapper = patcher.model_options["model_function_wrapper"]
    key = comfy.pack_module("nodes.model_patching").COND_OWNER_KEY
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        model_management.load_models_gpu([patcher])

    def count(owner, chunks):
        n = len(chunks)
        x, cond = torch.randn(n, 4, 8, 8, generator=gen), torch.randn(n, 77, 768, generator=gen)
        args = {"input": x, "timestep": torch.full((n,), 5.0), "cond_or_uncond": chunks,
                "c": {"c_crossattn": cond, "transformer_options": {key: owner}}}
        with torch.inference_mode():
            wrapper(patcher.model.apply_model, args)  # first call: casts the adapter once
            with OpCounter() as c:
                wrapper(patcher.model.apply_model, args)
        return c

    base3 = count([-1, -1, -1], [0, 1, 2])   # three base rows: what a 3-row KSampler batch costs
    routed = count([-1, -1, 0], [0, 1, 2])   # in the window: the third row is the fine-tuned model's
    outside = count([-1, -1], [0, 1])        # outside the window: no fine-tuned row
    for c in (base3, routed, outside):
        assert not (c.syncs["item"] or c.syncs["nonzero"] or c.syncs["host data"]), dict(c.sync_ops)
    # at most 2 per layer; less where to_q / to_k / to_v share one down projection (SharedDown)
    assert 0 < routed.ops - base3.ops <= 2 * len(adapter.unet), (routed.ops, base3.ops, len(adapter.unet))
