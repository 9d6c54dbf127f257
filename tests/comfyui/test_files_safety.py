"""Never lose or confuse a user's files (issue 14 + 11.5/11.6): each test reproduces one original failure.

Save SINE Adapter numbers its files and never replaces a non-SINE file; a failed cache write keeps the trained
adapter; the cache key covers CLIP skip, the VAE, patch content and the training code; cache entries are bound to
their key; non-finite and damaged files end in clear errors (files) or a retrain (cache entries); the crop-bank
set-up shows progress and honours Cancel; absurd sizes are refused before starting; hostile save names end in clear
errors; a symlinked loras subfolder takes saves where the ComfyUI under test allows it, else a clear error.
"""
import importlib
import json
import logging
import os
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from comfyui_harness import WorkflowError
from workflows_api import finetune_graph, load_graph, sine_sample_graph

STEPS = 2


def ft(fixtures, **kw):
    kw.setdefault("steps", STEPS)
    kw.setdefault("resolution", 64)
    return finetune_graph(fixtures["checkpoint"], fixtures["source_image"], **kw)


def loras(comfy) -> Path:
    return Path(comfy.folder_paths.get_folder_paths("loras")[0])


def cache_dir(comfy) -> Path:
    return Path(comfy.folder_paths.models_dir) / "sine_cache"


def trained_steps(comfy, steps=STEPS):
    return [v for v, total, _ in comfy.progress if total == steps]


def save_graph(fixtures, filename, overwrite=None, seed=0):
    g = ft(fixtures, seed=seed)
    g["save"] = {"class_type": "SINE_SaveAdapter", "inputs": {"sine_adapter": ["finetune", 3], "filename": filename}}
    if overwrite is not None:
        g["save"]["inputs"]["overwrite"] = overwrite
    return g


def files_under(*roots) -> dict:
    return {p: p.read_bytes() for r in roots if r.exists() for p in r.rglob("*") if p.is_file()}


def expect_error(comfy, graph, *patterns):
    with pytest.raises(WorkflowError) as e:
        comfy.run(graph)
    for pat in patterns:
        assert pat in str(e.value), f"{pat!r} not in: {str(e.value)[:700]}"
    return str(e.value)


# ---- (1) Save never replaces a user's file; numbered names; the written name is listed ------------------------------
def test_save_numbers_files_and_never_replaces_a_non_sine_file(comfy, fixtures):
    user_lora = loras(comfy) / "files_safety" / "stock.safetensors"
    user_lora.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({"lora_unet_x.lora_up.weight": torch.ones(2, 2)}, str(user_lora))
    original = user_lora.read_bytes()
    names = []
    for seed in range(2):  # two adapters (ComfyUI does not re-run an output node whose inputs are unchanged)
        comfy.run(save_graph(fixtures, "files_safety/stock", seed=seed))
        names.append(comfy.node_output("save", 0))
    assert names == ["files_safety/stock_00001_.safetensors", "files_safety/stock_00002_.safetensors"]
    assert user_lora.read_bytes() == original
    comfy.validate(load_graph(fixtures, names[1]))  # Load SINE Adapter lists the new file without a restart
    expect_error(comfy, save_graph(fixtures, "files_safety/stock", overwrite=True), "Save SINE Adapter",
                 "'filename'", "is not a SINE adapter", "never replaced")
    assert user_lora.read_bytes() == original


def test_overwrite_replaces_only_a_sine_adapter(comfy, fixtures):
    comfy.run(save_graph(fixtures, "files_safety/mine", overwrite=True, seed=1))
    path = loras(comfy) / "files_safety" / "mine.safetensors"
    first = path.read_bytes()
    comfy.run(save_graph(fixtures, "files_safety/mine", overwrite=True, seed=2))
    assert comfy.node_output("save", 0) == "files_safety/mine.safetensors" and path.read_bytes() != first
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".partial")]


@pytest.mark.parametrize("filename,needle", [("", "is empty"), ("   ", "is empty"), ("sub/", "names a folder"),
                                             (".safetensors", "is empty"), ("a\0b", "NUL character")])
def test_empty_folder_only_and_nul_names_are_refused(comfy, fixtures, filename, needle):
    comfy.run(ft(fixtures))  # trained first: the failing run below only saves
    before = files_under(loras(comfy))
    expect_error(comfy, save_graph(fixtures, filename), "Save SINE Adapter", "'filename'", needle)
    assert files_under(loras(comfy)) == before


def test_a_name_whose_temporary_name_would_be_too_long(comfy, fixtures):
    """250 bytes + '.safetensors' fits no file system name limit; the old temporary name (+'.partial') and the
    numbered name must not give a raw OSError either."""
    comfy.run(ft(fixtures))
    expect_error(comfy, save_graph(fixtures, "files_safety/" + "n" * 240), "Save SINE Adapter", "'filename'",
                 "bytes long", "shorter name")
    comfy.run(save_graph(fixtures, "files_safety/" + "n" * 225))  # + _00001_.safetensors = 244 bytes: fits
    assert comfy.node_output("save", 0).endswith("_00001_.safetensors")


def test_symlinked_loras_subfolder_follows_comfyuis_save_rule(comfy, fixtures, tmp_path):
    """ComfyUI 0.3.64 saves into a symlinked subfolder; newer ComfyUI (folder_paths.is_within_directory) refuses
    any save that resolves outside the root. Either way Load SINE Adapter reads from it, and `..` is refused."""
    target = tmp_path / "big_disk_loras"
    target.mkdir()
    link = loras(comfy) / "linked"
    if not link.exists():
        link.symlink_to(target, target_is_directory=True)
    if hasattr(comfy.folder_paths, "is_within_directory"):
        for overwrite in (False, True):
            expect_error(comfy, save_graph(fixtures, "linked/dog", overwrite=overwrite), "Save SINE Adapter",
                         "'filename'", "link to a folder outside the loras folder", "extra_model_paths.yaml")
        assert not any(target.iterdir())
        comfy.run(save_graph(fixtures, "files_safety/for_the_link"))  # a real subfolder takes it; then moved
        (loras(comfy) / comfy.node_output("save", 0)).rename(target / "dog_00001_.safetensors")
    else:
        comfy.run(save_graph(fixtures, "linked/dog"))
        assert comfy.node_output("save", 0) == "linked/dog_00001_.safetensors"
        assert (target / "dog_00001_.safetensors").is_file()
    comfy.run(load_graph(fixtures, "linked/dog_00001_.safetensors"))
    expect_error(comfy, save_graph(fixtures, "linked/../../escape"), "'filename'", "leave the loras folder")


# ---- (2) a failed cache write keeps the trained adapter ------------------------------------------------------------
def test_cache_write_failure_returns_the_adapter_and_warns_once(comfy, fixtures, caplog):
    blocker = cache_dir(comfy)
    moved = blocker.with_name("sine_cache_moved")
    if blocker.exists():
        blocker.rename(moved)
    blocker.write_text("not a folder: the cache cannot be written")  # root ignores chmod; this fails for anyone
    try:
        with caplog.at_level(logging.WARNING, logger="sine"):
            comfy.run(ft(fixtures, seed=1401))
        assert comfy.node_output("finetune", 3).unet and trained_steps(comfy)[-1] == STEPS
        warnings = [r.getMessage() for r in caplog.records if "could not write the disk cache" in r.getMessage()]
        assert len(warnings) == 1 and str(blocker) in warnings[0], warnings
    finally:
        blocker.unlink()
        if moved.exists():
            moved.rename(blocker)


# ---- (3) the key covers what changes the result ---------------------------------------------------------------------
def test_clip_skip_with_the_text_encoder_off_is_a_cache_miss(comfy, fixtures):
    for layer in (-1, -2):
        g = ft(fixtures, seed=1402)
        g["skip"] = {"class_type": "CLIPSetLastLayer", "inputs": {"clip": ["ckpt", 1], "stop_at_clip_layer": layer}}
        g["finetune"]["inputs"]["clip"] = ["skip", 0]
        comfy.run(g)
        assert trained_steps(comfy), f"CLIP layer {layer} reused an adapter trained with another layer"


def _write_lora(path: Path, value: float):
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    safetensors.torch.save_file({f"{key}.lora_up.weight": torch.full((320, 4), value),
                                 f"{key}.lora_down.weight": torch.full((4, 320), 0.01),
                                 f"{key}.alpha": torch.tensor(4.0)}, str(path))


def test_key_covers_lora_content_vae_and_training_code(comfy, fixtures, monkeypatch):
    cache_key = comfy.pack_module("nodes.cache_key")
    settings = comfy.pack_module("sine_ops.config").FinetuneSettings()
    folder = loras(comfy) / "files_safety"
    folder.mkdir(parents=True, exist_ok=True)
    _write_lora(folder / "style_a.safetensors", 0.01)
    _write_lora(folder / "style_b.safetensors", 0.02)  # same keys and strength, other content
    comfy.folder_paths.filename_list_cache.clear()
    g = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures["checkpoint"]}},
         "image": {"class_type": "LoadImage", "inputs": {"image": fixtures["source_image"]}}}
    for name in ("a", "b"):
        g[name] = {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                          "lora_name": f"files_safety/style_{name}.safetensors",
                                                          "strength_model": 1.0, "strength_clip": 1.0}}
        g[f"show_{name}"] = {"class_type": "PreviewAny", "inputs": {"source": [name, 0]}}
    g["show_img"] = {"class_type": "PreviewAny", "inputs": {"source": ["image", 0]}}
    comfy.run(g)
    model, clip, vae = (comfy.node_output("ckpt", i) for i in range(3))
    image = comfy.node_output("image", 0)

    def key(m=model, c=clip, v=vae):
        return cache_key.cache_key(m, c, image, "photo of a sks dog", settings, None, vae=v)
    base = key()
    assert key(m=comfy.node_output("a", 0)) != key(m=comfy.node_output("b", 0)) != base
    comfy_sd = importlib.import_module("comfy.sd")
    sd = {k: v.clone() for k, v in vae.first_stage_model.state_dict().items()}
    sd["encoder.conv_in.weight"] += 0.01
    other_vae = comfy_sd.VAE(sd=sd)
    assert key(v=other_vae) != base
    monkeypatch.setattr(cache_key, "_code_digest", "another version of the training code")
    assert key() != base


# ---- (4) cache entries are bound to their key; (9) damaged ones are retrained --------------------------------------
def _entry_of_last_run(comfy, before: set) -> Path:
    new = set(cache_dir(comfy).glob("*.safetensors")) - before
    assert len(new) == 1, new
    return new.pop()


def test_a_swapped_cache_entry_is_detected_and_retrained(comfy, fixtures):
    before = set(cache_dir(comfy).glob("*.safetensors"))
    comfy.run(ft(fixtures, seed=1404))
    entry_a = _entry_of_last_run(comfy, before)
    comfy.run(ft(fixtures, seed=1405))
    entry_b = _entry_of_last_run(comfy, before | {entry_a})
    entry_a.write_bytes(entry_b.read_bytes())  # another valid adapter copied over the entry
    comfy.executor.reset()
    comfy.run(ft(fixtures, seed=1404))
    assert trained_steps(comfy)[-1] == STEPS, "the foreign entry was trusted"
    with safetensors.safe_open(str(entry_a), "pt") as f:
        assert f.metadata()["sine_cache_key"] == entry_a.stem


def test_cache_entry_with_damaged_metadata_is_evicted_and_retrained(comfy, fixtures):
    adapter_file = comfy.pack_module("sine_ops.adapter_file")
    before = set(cache_dir(comfy).glob("*.safetensors"))
    comfy.run(ft(fixtures, seed=1409))
    entry = _entry_of_last_run(comfy, before)
    sd = safetensors.torch.load_file(str(entry))
    with safetensors.safe_open(str(entry), "pt") as f:
        meta = f.metadata()
    info = json.loads(meta["sine"])
    del info["family"]
    meta["sine"] = json.dumps(info)
    meta["sine_metadata_checksum"] = adapter_file.metadata_checksum(meta)  # consistent checksums, bad content
    safetensors.torch.save_file(sd, str(entry), metadata=meta)
    for _ in range(2):  # the old code failed on every run with a KeyError
        comfy.executor.reset()
        comfy.run(ft(fixtures, seed=1409))
    assert not trained_steps(comfy), "the second run should hit the freshly written entry"
    with safetensors.safe_open(str(entry), "pt") as f:
        assert "family" in json.loads(f.metadata()["sine"])


# ---- (5) non-finite adapters ---------------------------------------------------------------------------------------
def test_non_finite_adapter_file_is_refused_even_with_a_recomputed_checksum(comfy, fixtures):
    adapter_file = comfy.pack_module("sine_ops.adapter_file")
    comfy.run(save_graph(fixtures, "files_safety/finite", overwrite=True))
    src = loras(comfy) / "files_safety" / "finite.safetensors"
    sd = safetensors.torch.load_file(str(src))
    with safetensors.safe_open(str(src), "pt") as f:
        meta = f.metadata()
    k = next(k for k in sd if k.endswith(".alpha"))
    sd[k] = torch.tensor(float("inf"))
    meta["sine_checksum"] = adapter_file.checksum(sd)
    safetensors.torch.save_file(sd, str(src.with_name("inf.safetensors")), metadata=meta)
    comfy.folder_paths.filename_list_cache.clear()
    expect_error(comfy, load_graph(fixtures, "files_safety/inf.safetensors"), "Load SINE Adapter",
                 "inf.safetensors", "NaN/Inf")


def test_non_finite_weights_after_training_are_refused_and_not_cached(comfy, fixtures, monkeypatch):
    glue = comfy.pack_module("nodes.adapter_glue")
    real = glue.run_finetune

    def diverged(*args, **kw):
        adapter, losses = real(*args, **kw)
        next(iter(adapter.unet.values())).up.data.fill_(float("nan"))
        return adapter, losses
    monkeypatch.setattr(glue, "run_finetune", diverged)
    before = set(cache_dir(comfy).glob("*.safetensors"))
    expect_error(comfy, ft(fixtures, seed=1410), "SINE Finetune", "'learning_rate'", "NaN/Inf")
    assert set(cache_dir(comfy).glob("*.safetensors")) == before


# ---- (6) crop-bank set-up: progress and cancel ---------------------------------------------------------------------
def test_cancel_during_the_crop_bank_stops_before_training(comfy, fixtures):
    patch = {"working_size": 256, "train_resolution": 64, "min_crop_frac": 0.3, "max_crop_frac": 1.0,
             "whole_image_prob": 0.0, "grid_size": 32, "interpolation": "bilinear", "grid_gate": False,
             "crop_bank": 12}
    comfy.interrupt_at = 3
    with pytest.raises(WorkflowError, match="interrupted|Interrupt"):
        comfy.run(ft(fixtures, seed=1406, steps=40, patch=patch))
    bank = [v for v, total, _ in comfy.progress if total == 12]
    assert bank and bank[-1] < 12, comfy.progress  # the bank showed progress and stopped part-way
    assert not trained_steps(comfy, 40), "training started after Cancel"


# ---- (7) memory guard ----------------------------------------------------------------------------------------------
def test_a_training_size_beyond_the_device_is_refused_before_starting(comfy, fixtures, monkeypatch):
    guard = comfy.pack_module("nodes.memory_guard")
    comfy.run(ft(fixtures, seed=1407, resolution=64))  # fits: not refused
    model = comfy.node_output("ckpt", 0)
    need_2048 = guard.needed_bytes(model, (1, 4, 256, 256), full_model=True)
    monkeypatch.setattr(guard.comfy.model_management, "get_total_memory", lambda *a, **k: need_2048 - 1)
    expect_error(comfy, ft(fixtures, seed=1407, resolution=2048), "SINE Finetune", "'resolution'", "2048x2048",
                 "lower resolution")
    assert not trained_steps(comfy)


def test_an_absurd_sampling_size_is_refused_with_the_real_memory(comfy, fixtures):
    errors = comfy.pack_module("nodes.errors")
    memory_guard = comfy.pack_module("nodes.memory_guard")
    comfy.run(ft(fixtures))
    model = comfy.node_output("ckpt", 0)
    memory_guard.check_sampling(model, (1, 4, 64, 64), 3, "latent_image")  # 512 px: fits anywhere
    with pytest.raises(errors.InputError, match="8192x8192 px needs at least .* lower latent_image"):
        memory_guard.check_sampling(model, (1, 4, 1024, 1024), 3, "latent_image")
    trained = ft(fixtures)
    g = sine_sample_graph(fixtures["checkpoint"], {"image": trained["image"], "finetune": trained["finetune"]},
                          edit="a dog", size=(8192, 8192))
    expect_error(comfy, g, "SINE Guided Sampler", "'latent_image'", "8192x8192", "lower latent_image")


# ---- 11.6: the disk cache switch and its size limit ----------------------------------------------------------------
def test_disk_cache_off_neither_reads_nor_writes(comfy, fixtures):
    before = files_under(cache_dir(comfy))
    g = ft(fixtures, seed=1408)
    g["finetune"]["inputs"]["disk_cache"] = False
    comfy.run(g)
    assert files_under(cache_dir(comfy)) == before and trained_steps(comfy)


def test_size_limit_evicts_least_recently_used(comfy, tmp_path, monkeypatch):
    disk_cache = comfy.pack_module("nodes.disk_cache")
    LoRA = comfy.pack_module("sine_ops.adapters").LoRA
    SineAdapter = comfy.pack_module("sine_ops.sine_adapter").SineAdapter
    monkeypatch.setattr(comfy.folder_paths, "models_dir", str(tmp_path))

    def adapter(i):
        lora = LoRA((64, 64), 8, 8.0, generator=torch.Generator().manual_seed(i))
        return SineAdapter(unet={"diffusion_model.a": lora}, text_encoder={}, family="sd1", source_prompt="p")
    size = None
    for i in range(3):
        assert disk_cache.store(f"k{i}", adapter(i), [1.0])
        size = size or (tmp_path / "sine_cache" / "k0.safetensors").stat().st_size
        os.utime(tmp_path / "sine_cache" / f"k{i}.safetensors", (1000 + i, 1000 + i))
    assert disk_cache.load_cached("k0") is not None  # a hit: k0 becomes the most recently used
    monkeypatch.setenv(disk_cache.LIMIT_ENV, str(2.5 * size / 1024 ** 3))
    assert disk_cache.store("k3", adapter(3), [1.0])
    assert sorted(p.stem for p in (tmp_path / "sine_cache").glob("*.safetensors")) == ["k0", "k3"]
