"""What a hostile but realistic user met (issue 21, findings 2-9), each ending in a correct result or a clear error
naming the node and the input, with nothing lost, inside real ComfyUI on the random-weight SD1.5 fixture."""
import logging
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from comfyui_harness import WorkflowError
from workflows_api import finetune_graph

SIZE = 64


def graph(fixtures, steps=3, seed=2100, patch=None, **inputs):
    g = finetune_graph(fixtures["checkpoint"], fixtures["source_image"], steps=steps, lr=1e-3, seed=seed,
                       resolution=SIZE, patch=patch)
    g["finetune"]["inputs"].update(inputs)
    return g


def expect_error(comfy, g, *patterns):
    with pytest.raises(WorkflowError) as e:
        comfy.run(g)
    for pat in patterns:
        assert pat in str(e.value), f"{pat!r} not in: {str(e.value)[:700]}"
    return str(e.value)


def cache_files(comfy) -> set[Path]:
    return set((Path(comfy.folder_paths.models_dir) / "sine_cache").glob("*"))


def loras(comfy) -> Path:
    return Path(comfy.folder_paths.get_folder_paths("loras")[0])


def small_square_mask(g, node, side, at, size=(100, 70)):
    """A white `side` x `side` square at `at` on a black MASK of `size`, connected to `node`'s mask input."""
    g["mask_bg"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": size[0], "height": size[1]}}
    g["mask_fg"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": side, "height": side}}
    g["mask"] = {"class_type": "MaskComposite", "inputs": {"destination": ["mask_bg", 0], "source": ["mask_fg", 0],
                                                           "x": at[0], "y": at[1], "operation": "add"}}
    g[node]["inputs"]["mask"] = ["mask", 0]
    return g


# ---- 2: a training mask in patch mode -----------------------------------------------------------------------------
PATCH = {"working_size": 128, "train_resolution": 64, "min_crop_frac": 0.1, "max_crop_frac": 0.3,
         "whole_image_prob": 0.0, "grid_size": 16, "interpolation": "bilinear", "grid_gate": False,
         "crop_bank": 0, "recon_loss": False}


def test_2_patch_crops_that_miss_the_mask_are_redrawn_and_a_vanishing_mask_is_refused(comfy, fixtures, caplog):
    g = small_square_mask(graph(fixtures, steps=8, seed=2102, patch=PATCH, disk_cache=False), "finetune", 30, (0, 0))
    with caplog.at_level(logging.INFO, logger="sine"):
        comfy.run(g)  # before: "the loss became NaN/Inf ... lower the learning rate" at the first missed crop
    losses = comfy.node_output("finetune", 5)["loss"]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    assert "missed the mask's white area and were drawn again" in caplog.text
    dot = small_square_mask(graph(fixtures, seed=2103, disk_cache=False), "finetune", 1, (50, 30))
    expect_error(comfy, dot, "SINE Finetune", "input 'mask'", "too small")


# ---- 3: NaN never reaches the sampler silently ----------------------------------------------------------------------
class NaNBlockMask:
    """A MASK with a 10x10 NaN block (what a broken upstream node can hand over)."""
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"size": ("INT", {"default": 64})}}
    RETURN_TYPES = ("MASK",)
    FUNCTION = "make"
    CATEGORY = "tests"

    def make(self, size):
        mask = torch.ones(1, size, size)
        mask[:, :10, :10] = float("nan")
        return (mask,)


def _write_lora(path: Path, up_value: float, alpha: float):
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    up = torch.full((320, 4), 0.01)
    up[0, 0] = up_value
    safetensors.torch.save_file({f"{key}.lora_up.weight": up, f"{key}.lora_down.weight": torch.full((4, 320), 0.01),
                                 f"{key}.alpha": torch.tensor(alpha)}, str(path))


def lora_node_graph(fixtures, name):
    return {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures["checkpoint"]}},
            "lora": {"class_type": "SINE_LoraAsAdapter", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                                   "lora_name": name,
                                                                   "source_prompt": "photo of sks dog",
                                                                   "strength": 1.0}},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["lora", 3]}}}


def test_3_non_finite_guider_masks_and_lora_factors_are_refused(comfy, fixtures, monkeypatch):
    from test_guidance_sampling import adapter_nodes, guider_graph
    monkeypatch.setitem(comfy.nodes.NODE_CLASS_MAPPINGS, "TestNaNBlockMask", NaNBlockMask)
    g = guider_graph(fixtures, adapter_nodes(fixtures, steps=2), scheduler="normal", steps=2)
    g["nan_mask"] = {"class_type": "TestNaNBlockMask", "inputs": {"size": 64}}
    g["guider"]["inputs"]["mask"] = ["nan_mask", 0]  # before: passed the weight-sum check, the latent came out NaN
    expect_error(comfy, g, "SINE Guider", "input 'mask'", "NaN/Inf")

    folder = loras(comfy) / "hostile"
    folder.mkdir(parents=True, exist_ok=True)
    _write_lora(folder / "nan_up.safetensors", float("nan"), 4.0)
    _write_lora(folder / "inf_alpha.safetensors", 0.01, float("inf"))
    comfy.folder_paths.filename_list_cache.clear()
    expect_error(comfy, lora_node_graph(fixtures, "hostile/nan_up.safetensors"), "SINE LoRA as Fine-tuned Model",
                 "input 'lora_name'", "nan_up.safetensors", "lora_up", "NaN/Inf")
    expect_error(comfy, lora_node_graph(fixtures, "hostile/inf_alpha.safetensors"), "SINE LoRA as Fine-tuned Model",
                 "input 'lora_name'", "inf_alpha.safetensors", "alpha", "NaN/Inf")


# ---- 4 and 6: periodic saves: one rolling resume state, never in place of finished work, nowhere when off -----------
def test_4_save_every_keeps_one_resume_state_and_never_evicts_finished_entries(comfy, fixtures, monkeypatch):
    before = cache_files(comfy)
    comfy.run(graph(fixtures, steps=5, seed=2104, save_every=1))
    written = cache_files(comfy) - before
    assert [p.name.rsplit("-", 1)[1] for p in written] == ["5.safetensors"], written  # before: -1 .. -5

    disk_cache = comfy.pack_module("nodes.disk_cache")
    finished = written.pop()
    monkeypatch.setenv(disk_cache.LIMIT_ENV, str(1.5 * finished.stat().st_size / 1024 ** 3))
    comfy.interrupt_at = 3
    with pytest.raises(WorkflowError, match="interrupted|Interrupt"):
        comfy.run(graph(fixtures, steps=6, seed=2105, save_every=1))
    assert finished.exists(), "a finished fine-tune was evicted to make room for an unfinished run"
    resume = [p for p in cache_files(comfy) - before if p.name.endswith("-resume.safetensors")]
    assert len(resume) == 1
    comfy.run(graph(fixtures, steps=6, seed=2105, save_every=1))
    assert [v for v, t, _ in comfy.progress if t == 6][0] > 1, "the cancelled run's resume state was not used"
    assert not resume[0].exists()  # the finished run superseded it


def test_6_disk_cache_off_writes_nothing_to_the_cache_folder(comfy, fixtures):
    before = {p: p.stat().st_mtime_ns for p in cache_files(comfy)}
    comfy.run(graph(fixtures, steps=4, seed=2106, save_every=1, disk_cache=False))
    comfy.interrupt_at = 2
    with pytest.raises(WorkflowError, match="interrupted|Interrupt"):
        comfy.run(graph(fixtures, steps=5, seed=2107, save_every=1, disk_cache=False))
    assert {p: p.stat().st_mtime_ns for p in cache_files(comfy)} == before
    comfy.run(graph(fixtures, steps=5, seed=2107, save_every=1, disk_cache=False))
    assert [v for v, t, _ in comfy.progress if t == 5][0] > 1, "the cancelled run's state was not kept in memory"


# ---- 5: continue_from with settings that change what the weights mean ------------------------------------------------
@pytest.mark.parametrize("change,named", [({"lora_alpha": 1.0}, "lora_alpha 4.0 (this run: 1.0)"),
                                          ({"patch_grid_size": 32}, "patch grid_size 16 (this run: 32)")])
def test_5_continue_from_refuses_settings_that_change_what_the_weights_mean(comfy, fixtures, change, named):
    g = graph(fixtures, steps=2, seed=2108, disk_cache=False, patch={**PATCH, "crop_bank": 2})
    more = {**g["finetune"]["inputs"], "steps": 4, "continue_from": ["finetune", 3]}
    if "lora_alpha" in change:
        more["lora_alpha"] = change["lora_alpha"]
    else:
        g["patch_more"] = {"class_type": "SINE_PatchResolutionConfig",
                           "inputs": {**PATCH, "crop_bank": 2, "grid_size": change["patch_grid_size"]}}
        more["patch_config"] = ["patch_more", 0]
    g["more"] = {"class_type": "SINE_Finetune", "inputs": more}
    g["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["more", 3]}}
    expect_error(comfy, g, "SINE Finetune", "input 'continue_from'", named)


def test_5_continue_from_a_file_that_does_not_record_a_setting_is_refused(comfy, fixtures):
    """A SINE-trained file without lora_alpha (as an older save could be): what its weights mean is unknown, so it
    is refused rather than continued under this run's value."""
    from dataclasses import replace
    folder = loras(comfy) / "hostile"
    g = graph(fixtures, steps=2, seed=2113, disk_cache=False)
    g["save"] = {"class_type": "SINE_SaveAdapter", "inputs": {"sine_adapter": ["finetune", 3],
                                                              "filename": "hostile/alpha_source", "overwrite": True}}
    comfy.run(g)
    adapter_file = comfy.pack_module("sine_ops.adapter_file")
    adapter, _ = adapter_file.load_adapter_file(str(folder / "alpha_source.safetensors"))
    settings = {k: v for k, v in adapter.settings.items() if k != "lora_alpha"}
    adapter_file.save_adapter_file(replace(adapter, settings=settings), str(folder / "no_alpha.safetensors"))
    comfy.folder_paths.filename_list_cache.clear()
    cont = graph(fixtures, steps=4, seed=2114, disk_cache=False)
    cont["load"] = {"class_type": "SINE_LoadAdapter", "inputs": {"adapter_name": "hostile/no_alpha.safetensors"}}
    cont["finetune"]["inputs"]["continue_from"] = ["load", 0]
    expect_error(comfy, cont, "SINE Finetune", "input 'continue_from'", "lora_alpha 'not recorded'")


# ---- 7: the pack's own file loads cleanly everywhere it is offered --------------------------------------------------
def test_7_a_saved_adapter_loads_in_the_lora_node_and_the_stock_loraloader_and_keeps_its_optimizer_state(
        comfy, fixtures, caplog):
    g = graph(fixtures, steps=2, seed=2109, disk_cache=False)
    g["save"] = {"class_type": "SINE_SaveAdapter", "inputs": {"sine_adapter": ["finetune", 3],
                                                              "filename": "hostile/own", "overwrite": True}}
    comfy.run(g)
    path = loras(comfy) / "hostile" / "own.safetensors"
    with safetensors.safe_open(str(path), "pt") as f:
        assert not [k for k in f.keys() if k.startswith("sine.")]  # only LoRA keys
    assert (loras(comfy) / "hostile" / "own.sine-optimizer-state").exists()
    comfy.folder_paths.filename_list_cache.clear()
    comfy.run(lora_node_graph(fixtures, "hostile/own.safetensors"))  # before: "a LoRA for another model family"
    stock = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures["checkpoint"]}},
             "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                            "lora_name": "hostile/own.safetensors",
                                                            "strength_model": 1.0, "strength_clip": 1.0}},
             "show": {"class_type": "PreviewAny", "inputs": {"source": ["lora", 0]}}}
    with caplog.at_level(logging.WARNING):
        comfy.run(stock)
    assert "lora key not loaded" not in caplog.text
    load = {"load": {"class_type": "SINE_LoadAdapter", "inputs": {"adapter_name": "hostile/own.safetensors"}},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["load", 0]}}}
    comfy.run(load)
    loaded = comfy.node_output("load", 0)
    assert loaded.optimizer_state, "continue_from would restart AdamW: the sidecar was not read"
    # an older file with the optimizer state inline is still read, by both nodes
    adapter_file = comfy.pack_module("sine_ops.adapter_file")
    adapter_file.save_adapter_file(loaded, str(loras(comfy) / "hostile" / "inline.safetensors"))
    comfy.folder_paths.filename_list_cache.clear()
    comfy.run({**load, "load": {"class_type": "SINE_LoadAdapter",
                                "inputs": {"adapter_name": "hostile/inline.safetensors"}}})
    assert comfy.node_output("load", 0).optimizer_state
    comfy.run(lora_node_graph(fixtures, "hostile/inline.safetensors"))


# ---- 8: clear errors instead of raw ones ---------------------------------------------------------------------------
def test_8_damaged_files_malformed_optimizer_state_and_a_save_name_through_a_file_end_in_clear_errors(comfy,
                                                                                                    fixtures):
    folder = loras(comfy) / "hostile"
    folder.mkdir(parents=True, exist_ok=True)
    _write_lora(folder / "whole.safetensors", 0.01, 4.0)
    data = (folder / "whole.safetensors").read_bytes()
    (folder / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (folder / "pickle.safetensors").write_bytes(b"\x80\x04\x95" + b"\x00" * 64)  # a .ckpt renamed
    comfy.folder_paths.filename_list_cache.clear()
    for name in ("truncated", "pickle"):
        expect_error(comfy, lora_node_graph(fixtures, f"hostile/{name}.safetensors"), "SINE LoRA as Fine-tuned Model",
                     "input 'lora_name'", f"{name}.safetensors", "not a readable .safetensors file")

    g = graph(fixtures, steps=2, seed=2110, disk_cache=False)
    g["save"] = {"class_type": "SINE_SaveAdapter", "inputs": {"sine_adapter": ["finetune", 3],
                                                              "filename": "hostile/resumable", "overwrite": True}}
    comfy.run(g)
    adapter_file = comfy.pack_module("sine_ops.adapter_file")
    # each malformation in its own file: the check stops at the first bad parameter
    for label, corrupt, what in (("shape", lambda state: state.update(exp_avg=torch.zeros(3)), "exp_avg of the "
                                  "wrong shape"),  # before: a raw size-mismatch RuntimeError
                                 ("step", lambda state: state.pop("step"), "missing step")):  # before: KeyError
        adapter, _ = adapter_file.load_adapter_file(str(folder / "resumable.safetensors"))
        corrupt(next(iter(adapter.optimizer_state.values())))
        adapter_file.save_adapter_file(adapter, str(folder / f"malformed_{label}.safetensors"))
        comfy.folder_paths.filename_list_cache.clear()
        cont = graph(fixtures, steps=4, seed=2111, disk_cache=False)  # another run: continue_from is its start
        cont["load"] = {"class_type": "SINE_LoadAdapter",
                        "inputs": {"adapter_name": f"hostile/malformed_{label}.safetensors"}}
        cont["finetune"]["inputs"]["continue_from"] = ["load", 0]
        expect_error(comfy, cont, "SINE Finetune", "input 'continue_from'", "optimizer state", "malformed", what)

    (folder / "a_file").write_bytes(b"not a folder")
    through = graph(fixtures, steps=2, seed=2110, disk_cache=False)
    through["save"] = {"class_type": "SINE_SaveAdapter", "inputs": {"sine_adapter": ["finetune", 3],
                                                                    "filename": "hostile/a_file/x"}}
    expect_error(comfy, through, "Save SINE Adapter", "input 'filename'", "'hostile/a_file' is a file")


def test_8_the_loss_output_tooltip_says_the_core_loss_graph_needs_two_values(comfy):
    outputs = comfy.object_info("SINE_Finetune")["output_tooltips"]
    assert "at least two different values" in outputs[5] and "1-step" in outputs[5]


# ---- 9: previews follow ComfyUI's preview setting -------------------------------------------------------------------
def test_9_previews_follow_the_preview_method(comfy, fixtures, monkeypatch):
    from comfy.cli_args import LatentPreviewMethod, args
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.NoPreviews)
    comfy.run(graph(fixtures, steps=3, seed=2111, disk_cache=False))
    assert not comfy.previews, f"{len(comfy.previews)} preview frames with --preview-method none"
    monkeypatch.setattr(args, "preview_method", LatentPreviewMethod.Latent2RGB)
    comfy.run(graph(fixtures, steps=3, seed=2112, disk_cache=False))
    assert comfy.previews
