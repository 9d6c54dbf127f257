"""SINE Finetune inside real ComfyUI, on the random-weight SD1.5 fixture at 128 px."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from comfyui_harness import WorkflowError
from workflows_api import finetune_graph

PROMPT = "photo of a sks dog"
STEPS = 30


def show(*sources) -> dict:
    """PreviewAny output nodes, so the nodes feeding them execute and their outputs sit in the executor cache."""
    return {f"show{i}": {"class_type": "PreviewAny", "inputs": {"source": src}} for i, src in enumerate(sources)}


def base_graph(fixtures) -> dict:
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures["checkpoint"]}},
        "image": {"class_type": "LoadImage", "inputs": {"image": fixtures["source_image"]}},
        **show(["ckpt", 0], ["image", 0]),
    }


def encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0]


def predictions(model, cond, probes):
    """Denoised predictions of `model` at fixed (x_sigma, sigma) probes (ComfyUI's apply_model, inference mode)."""
    import comfy.model_management
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
        return torch.cat([model.model.apply_model(x, s, c_crossattn=cond) for x, s in probes])


def probe_set(model, x0, seed=999, n=6):
    """(x_sigma, sigma) pairs from a generator the training never sees, timesteps spread over the schedule."""
    ms = model.model.model_sampling
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in torch.linspace(50, 950, n).long():
        sigma = ms.sigmas[t].reshape(1).float()
        noise = torch.randn(x0.shape, generator=g)
        out.append((ms.noise_scaling(sigma, noise, x0), sigma))
    return out


def loss_at_probes(model, cond, x0, probes):
    from_denoised = [((p - x0) / s).pow(2).mean() for p, (_, s) in zip(predictions(model, cond, probes).split(1),
                                                                       probes)]
    return float(torch.stack(from_denoised).mean())


@pytest.fixture(scope="module")
def trained(comfy, fixtures):
    """One LoRA fine-tune (UNet attention + text-encoder LoRA) with probes taken before and after."""
    comfy.run(base_graph(fixtures))
    model, clip, vae = (comfy.node_output("ckpt", i) for i in range(3))
    image = comfy.node_output("image", 0)
    with torch.inference_mode():
        pixels = torch.nn.functional.interpolate(image.movedim(-1, 1), size=(128, 128), mode="bicubic",
                                                 antialias=True).clamp(0, 1).movedim(1, -1)
        x0 = model.model.process_latent_in(vae.encode(pixels))
    probes = probe_set(model, x0)
    base_cond = encode(clip, PROMPT)
    before = {"pred": predictions(model, base_cond, probes), "cond": base_cond}
    graph = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=STEPS, lr=2e-3, rank=8,
                           layers="attention+ff", text_encoder="lora", prompt=PROMPT)
    result = comfy.run(graph)
    outputs = [comfy.node_output("finetune", i) for i in range(5)]
    return dict(model=model, clip=clip, x0=x0, probes=probes, before=before, graph=graph, result=result,
                progress=list(comfy.progress), ft_model=outputs[0], ft_clip=outputs[1], ft_cond=outputs[2][0][0],
                adapter=outputs[3], loss_image=outputs[4])


def test_loss_on_source_falls_by_30_percent(trained):
    base_loss = loss_at_probes(trained["model"], trained["before"]["cond"], trained["x0"], trained["probes"])
    ft_loss = loss_at_probes(trained["ft_model"], trained["ft_cond"], trained["x0"], trained["probes"])
    print(f"held-out denoising loss: base {base_loss:.4f} -> fine-tuned {ft_loss:.4f}")
    assert ft_loss < 0.7 * base_loss


def test_progress_and_loss_curve(trained):
    steps = [v for v, total, _ in trained["progress"] if total == STEPS]
    # only the first and the final update are certain: newer ComfyUI throttles the ones between (comfy/utils.py)
    assert steps[0] <= 1 and steps[-1] == STEPS
    img = trained["loss_image"]
    assert img.shape[0] == 1 and img.shape[-1] == 3 and img.std() > 0


def test_input_model_and_clip_unchanged(trained):
    model, clip = trained["model"], trained["clip"]
    assert torch.equal(predictions(model, trained["before"]["cond"], trained["probes"]), trained["before"]["pred"])
    assert torch.equal(encode(clip, PROMPT), trained["before"]["cond"])
    assert not any(k.endswith(".forward") for k in model.object_patches)
    assert all(not p.requires_grad or p.grad is None for p in model.model.parameters())


def test_finetuned_prediction_differs_and_clip_is_trained(trained):
    ft = predictions(trained["ft_model"], trained["ft_cond"], trained["probes"])
    assert (ft - trained["before"]["pred"]).abs().max() > 1e-3
    assert not torch.equal(trained["ft_cond"], trained["before"]["cond"])
    assert trained["adapter"].text_encoder and trained["adapter"].unet


def test_save_load_and_stock_lora_loader_reproduce(comfy, fixtures, trained):
    graph = dict(trained["graph"])
    graph["save"] = {"class_type": "SINE_SaveAdapter", "inputs": {"sine_adapter": ["finetune", 3],
                                                                 "filename": "sine_tests/dog",
                                                                 "overwrite": True}}
    comfy.run(graph)
    import folder_paths
    folder_paths.filename_list_cache.clear()
    graph = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures["checkpoint"]}},
        "load": {"class_type": "SINE_LoadAdapter", "inputs": {"adapter_name": "sine_tests/dog.safetensors"}},
        "apply": {"class_type": "SINE_ApplyAdapter", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                                "sine_adapter": ["load", 0], "positional_grid": True}},
        "stock": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                         "lora_name": "sine_tests/dog.safetensors",
                                                         "strength_model": 1.0, "strength_clip": 1.0}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": PROMPT, "clip": ["stock", 1]}},
        **show(["apply", 0], ["apply", 2], ["stock", 0], ["pos", 0]),
    }
    comfy.run(graph)
    loaded_model, loaded_cond = comfy.node_output("apply", 0), comfy.node_output("apply", 2)[0][0]
    assert torch.equal(loaded_cond, trained["ft_cond"])
    ref = predictions(trained["ft_model"], trained["ft_cond"], trained["probes"])
    assert torch.allclose(predictions(loaded_model, loaded_cond, trained["probes"]), ref, atol=1e-6, rtol=0)
    # The stock loader merges the same deltas into the weights; compare against the size of the fine-tuning itself.
    stock_model, stock_cond = comfy.node_output("stock", 0), comfy.node_output("pos", 0)[0][0]
    base_cond, base_pred = trained["before"]["cond"], trained["before"]["pred"]
    cond_err = ((stock_cond - trained["ft_cond"]).norm() / (trained["ft_cond"] - base_cond).norm()).item()
    stock = predictions(stock_model, stock_cond, trained["probes"])
    pred_err = ((stock - ref).norm() / (ref - base_pred).norm()).item()
    print(f"stock LoraLoader vs SINE adapter, relative to the fine-tuning's own change: text encoder "
          f"{cond_err:.2e}, UNet prediction {pred_err:.2e}")
    assert cond_err < 0.01 and pred_err < 0.01


def _training_steps(progress, steps=STEPS):
    return [v for v, total, _ in progress if total == steps]


def test_second_run_is_a_cache_hit_in_process_and_from_disk(comfy, trained):
    comfy.executor.reset()  # forget ComfyUI's in-memory node cache: only the disk cache can avoid training now
    comfy.run(trained["graph"])
    assert not _training_steps(comfy.progress), "disk cache missed: training ran again"
    comfy.run(trained["graph"])
    assert "finetune" in comfy.cached_nodes() and not _training_steps(comfy.progress)


def test_cache_hit_from_a_fresh_process(comfy, trained):
    script = Path(__file__).with_name("fresh_process_finetune.py")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    out = subprocess.run([sys.executable, str(script), str(comfy.work), json.dumps(trained["graph"])], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["training_steps"] == 0, report


def test_damaged_cache_entry_is_retrained(comfy, trained):
    cache = Path(comfy.folder_paths.models_dir) / "sine_cache"
    entries = sorted(cache.glob("*.safetensors"), key=lambda p: p.stat().st_mtime)
    assert entries
    data = bytearray(entries[-1].read_bytes())
    data[len(data) // 2] ^= 0xFF  # flip one byte inside the tensor data
    entries[-1].write_bytes(bytes(data))
    comfy.executor.reset()
    comfy.run(trained["graph"])
    assert _training_steps(comfy.progress)[-1] == STEPS, [p.name for p in entries]


def test_cancel_leaves_inputs_unchanged_and_next_run_works(comfy, fixtures, trained):
    graph = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=6, lr=1e-3, seed=5,
                           text_encoder="lora")
    comfy.interrupt_at = 2
    with pytest.raises(WorkflowError, match="interrupted|Interrupt"):
        comfy.run(graph)
    model, clip = trained["model"], trained["clip"]
    assert torch.equal(predictions(model, trained["before"]["cond"], trained["probes"]), trained["before"]["pred"])
    assert torch.equal(encode(clip, PROMPT), trained["before"]["cond"])
    comfy.run(graph)
    assert _training_steps(comfy.progress, 6)[-1] == 6


@pytest.mark.parametrize("method,text_encoder", [("full", "full"), ("lora", "off")])
def test_methods_and_text_encoder_modes_run(comfy, fixtures, method, text_encoder):
    graph = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=2, lr=1e-5, seed=11,
                           method=method, text_encoder=text_encoder, resolution=64)
    comfy.run(graph)
    adapter = comfy.node_output("finetune", 3)
    kinds = {type(a).__name__ for a in adapter.unet.values()}
    assert kinds == {"FullDelta" if method == "full" else "LoRA"}
    assert bool(adapter.text_encoder) == (text_encoder != "off")
