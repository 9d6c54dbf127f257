"""SINE LoRA as Fine-tuned Model inside real ComfyUI: a stock-format LoRA file as the fine-tuned side.

The fixture LoRA (tests/comfyui_fixtures.py) is in kohya naming with UNet (attention, a 3x3 conv, a 1x1 conv stored
with 2-D factors) and text-encoder parts."""
import pytest
import safetensors.torch
import torch

from comfyui_harness import WorkflowError
from reference_forms import lora_delta_weight
from test_guidance_sampling import EDIT, per_step, run_latent, unet_calls
from workflows_api import sine_sample_graph, txt2img

TRIGGER = "photo of sks person"


def lora_node(fixtures, lora_name=None, strength=1.0):
    return {"class_type": "SINE_LoraAsAdapter", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": lora_name or fixtures["lora"],
        "source_prompt": TRIGGER, "strength": strength}}


def ksampler_on(graph, model, clip):
    """txt2img graph sampling with `model` and encoding both prompts with `clip` (node outputs)."""
    graph["sample"]["inputs"]["model"] = model
    graph["pos"]["inputs"]["clip"] = clip
    graph["neg"]["inputs"]["clip"] = clip
    graph["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "sine"}}
    del graph["decode"]
    return graph


def _latents_with(comfy, fixtures, models: dict, *, steps: int, cfg: float) -> dict:
    """{name: latent} of one KSampler run per (model, clip) source, same seed and prompts."""
    out = {}
    for name, (extra_nodes, model, clip) in models.items():
        g = ksampler_on(txt2img(fixtures["checkpoint"], "photo of sks person in a garden", seed=2, size=64,
                                steps=steps, cfg=cfg), model, clip)
        out[name] = run_latent(comfy, {**g, **extra_nodes})
    return out


def test_lora_model_samples_like_the_stock_lora_loader(comfy, fixtures):
    stock_lora = {"class_type": "LoraLoader", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": fixtures["lora"], "strength_model": 1.0,
        "strength_clip": 1.0}}
    apply = {"class_type": "SINE_ApplyAdapter", "inputs": {
        "model": ["ckpt", 0], "clip": ["ckpt", 1], "sine_adapter": ["lora", 3], "positional_grid": True}}
    models = {"stock": ({"stock_lora": stock_lora}, ["stock_lora", 0], ["stock_lora", 1]),
              "base": ({}, ["ckpt", 0], ["ckpt", 1]),
              "node": ({"lora": lora_node(fixtures)}, ["lora", 0], ["lora", 1]),
              "applied": ({"lora": lora_node(fixtures), "apply": apply}, ["apply", 0], ["apply", 1])}
    # one UNet forward (1 step, cfg 1), then a 4-step CFG run, where rounding differences compound
    for steps, cfg in ((1, 1.0), (4, 7.5)):
        lat = _latents_with(comfy, fixtures, models, steps=steps, cfg=cfg)
        # The stock loader rounds the merged weight to the UNet's storage dtype, ours adds the delta to the
        # activations: on a GPU (fp16/bf16 UNet) the two round differently, by about that dtype's epsilon, which the
        # random-weight network amplifies (seen on an H200, fp16: 0.35 on a scale of 238, 1.5e-3).
        unet_dtype = comfy.node_output("ckpt", 0).model.get_dtype()
        rel_tol = 1e-3 if unet_dtype == torch.float32 else 1e-2
        stock, scale = lat["stock"], float(lat["stock"].abs().max())
        effect = float((stock - lat["base"]).abs().max())
        diffs = {k: float((lat[k] - stock).abs().max()) for k in ("node", "applied")}
        print(f"steps {steps} cfg {cfg}: max|stock| {scale:.4g}, max|LoraLoader - no LoRA| {effect:.4g}, "
              f"max|ours - LoraLoader| {diffs}")
        assert effect > 0.05 * scale  # the LoRA does change the result...
        # ...and ours is the stock one, up to float rounding (amplified by the random-weight network: the weight
        # deltas themselves agree to 1e-6, see test_adapter_deltas_are_the_stock_loras_weight_patches)
        assert max(diffs.values()) <= rel_tol * scale, diffs


def test_adapter_deltas_are_the_stock_loras_weight_patches(comfy, fixtures):
    """Layer by layer: the adapter's delta equals the weight patch the stock LoraLoader puts on the same key
    (ComfyUI's own calculate_weight applied to a zero weight), on the UNet and on CLIP."""
    import importlib
    calculate_weight = importlib.import_module("comfy.lora").calculate_weight
    comfy.run({"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures["checkpoint"]}},
               "stock_lora": {"class_type": "LoraLoader", "inputs": {
                   "model": ["ckpt", 0], "clip": ["ckpt", 1], "lora_name": fixtures["lora"], "strength_model": 1.0,
                   "strength_clip": 1.0}},
               "lora": lora_node(fixtures),
               "show": {"class_type": "PreviewAny", "inputs": {"source": ["lora", 3]}},
               "show_stock": {"class_type": "PreviewAny", "inputs": {"source": ["stock_lora", 1]}}})
    adapter = comfy.node_output("lora", 3)
    assert adapter.text_encoder and any(m.weight_shape[2:] == (3, 3) for m in adapter.unet.values())  # + a LoCon
    for ours, patcher in ((adapter.unet, comfy.node_output("stock_lora", 0)),
                          (adapter.text_encoder, comfy.node_output("stock_lora", 1).patcher)):
        assert {f"{path}.weight" for path in ours} == set(patcher.patches)
        for path, module in ours.items():
            key = f"{path}.weight"
            stock = calculate_weight(patcher.patches[key], torch.zeros(module.weight_shape), key)
            assert torch.allclose(lora_delta_weight(module), stock, rtol=1e-5,
                                  atol=1e-6 * float(stock.abs().max())), key


def test_guider_with_a_lora_at_weight_zero_equals_the_stock_ksampler(comfy, fixtures):
    nodes = {"finetune": lora_node(fixtures)}  # same outputs 2 / 3 as SINE Finetune's
    kw = dict(edit=EDIT, steps=4)
    stock = run_latent(comfy, sine_sample_graph(fixtures["checkpoint"], nodes, stock=True, **kw))
    zero = run_latent(comfy, sine_sample_graph(fixtures["checkpoint"], nodes, weight=0.0, **kw))
    with unet_calls(comfy) as calls:
        guided = run_latent(comfy, sine_sample_graph(fixtures["checkpoint"], nodes, weight=0.3, **kw))
    assert (zero - stock).abs().max() <= 1e-5
    assert (guided - stock).abs().max() > 1e-3
    rows, forwards = per_step(calls)
    assert 3 in rows and set(forwards) == {1}  # LoRA rows batched with the base rows: ONE forward per step


def _renamed(comfy, fixtures, naming: str) -> dict:
    """The fixture LoRA's tensors under another naming ComfyUI reads: its own ('diffusion_model.' /
    'text_encoders.' prefixes, lora_up/lora_down) or diffusers/PEFT ('unet.' / 'text_encoder.', lora_B/lora_A)."""
    import importlib  # ComfyUI's modules are importable once the session started
    comfy_lora, comfy_utils = importlib.import_module("comfy.lora"), importlib.import_module("comfy.utils")
    model, clip = comfy.node_output("ckpt", 0), comfy.node_output("ckpt", 1)
    key_map = comfy_lora.model_lora_keys_clip(clip.cond_stage_model, comfy_lora.model_lora_keys_unet(model.model, {}))
    by_target: dict[str, list[str]] = {}
    for prefix, target in key_map.items():
        by_target.setdefault(target, []).append(prefix)
    sd = comfy_utils.load_torch_file(comfy.folder_paths.get_full_path("loras", fixtures["lora"]), safe_load=True)
    out = {}
    for key, tensor in sd.items():
        prefix, suffix = key.split(".", 1)
        target = key_map[prefix]
        if naming == "comfyui":
            new = ("" if target.startswith("diffusion_model.") else "text_encoders.") + target[:-len(".weight")]
        else:
            new = next(p for p in by_target[target] if p.startswith(("unet.", "text_encoder.")))
            suffix = {"lora_up.weight": "lora_B.weight", "lora_down.weight": "lora_A.weight"}.get(suffix, suffix)
        out[f"{new}.{suffix}"] = tensor
    return out


def load_lora_only(comfy, fixtures, lora_name=None):
    """Run just the checkpoint loader and the LoRA node (Preview Any on its adapter makes it an output)."""
    comfy.run({"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures["checkpoint"]}},
               "lora": lora_node(fixtures, lora_name),
               "show": {"class_type": "PreviewAny", "inputs": {"source": ["lora", 3]}}})
    return comfy.node_output("lora", 3)


def write_lora(comfy, name: str, sd: dict) -> str:
    safetensors.torch.save_file(sd, str(comfy.work / "models" / "loras" / name))
    return name


def test_every_naming_comfyui_reads_gives_the_same_adapter(comfy, fixtures):
    reference = load_lora_only(comfy, fixtures)
    assert len(reference.unet) > 10 and len(reference.text_encoder) == 24
    for naming in ("comfyui", "diffusers"):
        sd = _renamed(comfy, fixtures, naming)
        assert not set(sd) & set(safetensors.torch.load_file(
            comfy.folder_paths.get_full_path("loras", fixtures["lora"])))  # really other names
        name = write_lora(comfy, f"sine_test_lora_{naming}.safetensors", sd)
        adapter = load_lora_only(comfy, fixtures, name)
        assert adapter.unet.keys() == reference.unet.keys()
        assert adapter.text_encoder.keys() == reference.text_encoder.keys()
        for group, ref in ((adapter.unet, reference.unet), (adapter.text_encoder, reference.text_encoder)):
            for path, module in group.items():
                assert torch.equal(lora_delta_weight(module), lora_delta_weight(ref[path])), path


@pytest.mark.parametrize("kind,extra,message", [
    ("loha", {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_a": (320, 2),
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w1_b": (2, 320),
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w2_a": (320, 2),
              "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.hada_w2_b": (2, 320)},
     "found 1 layer(s) of LoHa"),
    ("dora", {"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k.dora_scale": (320, 1)},
     "found 1 layer(s) of DoRA"),
    ("unmapped", {"lora_unet_no_such_layer.lora_up.weight": (8, 2),
                  "lora_unet_no_such_layer.lora_down.weight": (2, 8)}, "2 of its"),
])
def test_other_lora_kinds_and_unknown_keys_are_refused(comfy, fixtures, kind, extra, message):
    sd = safetensors.torch.load_file(comfy.folder_paths.get_full_path("loras", fixtures["lora"]))
    if kind == "loha":  # a layer the fixture LoRA leaves alone, as LoHa
        sd = {k: v for k, v in sd.items() if "down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" not in k}
    sd.update({k: torch.randn(shape) * 0.01 for k, shape in extra.items()})
    name = write_lora(comfy, f"sine_test_lora_{kind}.safetensors", sd)
    with pytest.raises(WorkflowError) as e:
        load_lora_only(comfy, fixtures, name)
    msg = str(e.value)
    assert "SINE LoRA as Fine-tuned Model: input 'lora_name'" in msg and name in msg and message in msg, msg[:800]
