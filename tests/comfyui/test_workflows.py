"""The pack's example workflows (workflows/) and the headless runner (workflows/headless.py) in real ComfyUI.

The runner is three files: workflow_graph.py (UI -> API conversion, overrides), comfy_runtime.py (ComfyUI in
process, its executor) and headless.py (the command line).

- Every UI workflow converts (with the live node definitions) to exactly its API twin, both validate in ComfyUI
  with the model/image names pointed at the random-weight fixtures, and the committed files are what
  tools/build_workflows.py generates from the live definitions.
- Every workflow executes at 64-96 px, 2 sampling steps, 2 training steps through the runner's API.
- The command line: one-line errors with exit status 2 (nothing run) or 1 (execution failed), and workflow (1)
  end to end writing a PNG.
"""
import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from comfyui_harness import REPO_ROOT

import build_workflows  # noqa: E402  (tools/ and workflows/ are on sys.path through comfyui_harness)
import workflow_graph  # noqa: E402
from comfy_runtime import ExecutionError, ValidationError  # noqa: E402

WORKFLOWS_DIR = REPO_ROOT / "workflows"
NAMES = ["sine_finetune_and_edit", "sine_patch_edit_resolution", "sine_edit_controlnet",
         "sine_two_models_content_style", "sine_masked_edit", "sine_lora_as_finetuned", "sine_sweep"]
HINT_TITLE = "ControlNet hint (canny edges of your image)"
TINY_TRAINING = ["SINE_Finetune.steps=2", "SINE_Finetune.resolution=64"]
TINY_PATCH = ["SINE_PatchResolutionConfig.working_size=128", "SINE_PatchResolutionConfig.train_resolution=64",
              "SINE_PatchResolutionConfig.grid_size=16", "SINE_PatchResolutionConfig.crop_bank=2"]
SIZES = {"sine_finetune_and_edit": (64, 64), "sine_patch_edit_resolution": (96, 64),
         "sine_edit_controlnet": (64, 64), "sine_two_models_content_style": (64, 64), "sine_masked_edit": (64, 64),
         "sine_lora_as_finetuned": (64, 64), "sine_sweep": (64, 64)}
GRID = {"sine_sweep": (4, 3)}  # workflows that save a labelled grid of (rows, columns) images instead of one image


def load(name: str, api: bool) -> dict:
    return json.loads((WORKFLOWS_DIR / ("api" if api else "") / f"{name}.json").read_text(encoding="utf-8"))


def fixture_names(name: str, fixtures: dict) -> dict:
    """prepare() overrides pointing every file name of a workflow at the fixtures."""
    sets = []
    if name == "sine_edit_controlnet":
        sets += [f"ControlNetLoader.control_net_name={fixtures['controlnet']}",
                 f"{HINT_TITLE}.image={fixtures['hint_image']}"]
    if name == "sine_two_models_content_style":
        sets.append(f"Style image.image={fixtures['source_image']}")
    if name == "sine_lora_as_finetuned":  # a LoRA file instead of an image to fine-tune on
        sets.append(f"SINE_LoraAsAdapter.lora_name={fixtures['lora']}")
        return {"checkpoint": fixtures["checkpoint"], "sets": sets}
    return {"checkpoint": fixtures["checkpoint"], "image": fixtures["source_image"], "sets": sets}


def tiny(name: str, fixtures: dict) -> dict:
    kw = fixture_names(name, fixtures)
    kw["sets"] += [] if name == "sine_lora_as_finetuned" else TINY_TRAINING  # the LoRA one has no SINE Finetune
    kw["sets"] += TINY_PATCH if name == "sine_patch_edit_resolution" else []
    w, h = SIZES[name]
    return dict(kw, size=f"{w}x{h}", steps=2)


@pytest.fixture(scope="module")
def headless(comfy):
    return comfy.headless


# ---- the files -------------------------------------------------------------------------------------------------
def test_widget_layout_follows_the_frontend_rules(headless):
    slots = workflow_graph.widget_slots
    assert slots(headless.object_info("KSampler")) == [
        ("seed", "value"), ("seed", "control"), ("steps", "value"), ("cfg", "value"), ("sampler_name", "value"),
        ("scheduler", "value"), ("denoise", "value")]  # as ComfyUI's own templates: [seed, "randomize", 20, ...]
    assert slots(headless.object_info("LoadImage")) == [("image", "value"), ("image", "upload")]  # [name, "image"]
    assert slots(headless.object_info("RandomNoise")) == [("noise_seed", "value"), ("noise_seed", "control")]
    finetune = [n for n, _ in slots(headless.object_info("SINE_Finetune"))]
    assert finetune[finetune.index("seed") + 1] == "seed"  # an INT named seed gets a control widget (legacy rule)
    assert [n for n, k in slots(headless.object_info("SINE_GuidedSampler")) if k == "value"] == [
        "seed", "steps", "cfg", "sampler_name", "scheduler", "denoise", "finetuned_weight", "start_percent",
        "end_percent", "outside_weight", "mask_feather"]
    guider_sockets = build_workflows.socket_inputs(headless.object_info("SINE_Guider"))
    assert guider_sockets[-1] == ("extra_models", "SINE_GUIDANCE_STACK", True)


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_converts_to_its_api_twin_and_both_validate(headless, fixtures, name):
    ui, api = load(name, api=False), load(name, api=True)
    assert workflow_graph.ui_to_api(ui, headless.object_info) == api
    assert any(n["type"] == "Note" and len(n["widgets_values"][0]) > 200 for n in ui["nodes"])
    ids = [n["id"] for n in ui["nodes"]]
    assert len(set(ids)) == len(ids) and ui["last_node_id"] == max(ids)
    assert ui["last_link_id"] == max(link[0] for link in ui["links"])
    for node in ui["nodes"]:  # every link is recorded on both ends
        for slot, inp in enumerate(node["inputs"]):
            if inp["link"] is not None:
                link = next(lk for lk in ui["links"] if lk[0] == inp["link"])
                assert link[3:5] == [node["id"], slot]
                src = next(n for n in ui["nodes"] if n["id"] == link[1])
                assert inp["link"] in src["outputs"][link[2]]["links"]
    for workflow in (ui, api):
        prompt = headless.editor.prepare(workflow, **fixture_names(name, fixtures))
        headless.runner.validate(prompt, strict=True)


def test_committed_files_are_what_the_generator_writes(headless):
    import comfyui_version
    if comfyui_version.__version__ != build_workflows.GENERATED_WITH:
        pytest.skip(f"the committed workflows are generated against ComfyUI {build_workflows.GENERATED_WITH}; this is "
                    f"{comfyui_version.__version__} (test_browser.py checks that they open here)")
    built = build_workflows.build_all(headless.object_info)
    assert sorted(built) == sorted(NAMES)
    for name, (ui, api, _title) in built.items():
        assert load(name, api=False) == ui, f"workflows/{name}.json is stale: run tools/build_workflows.py"
        assert load(name, api=True) == api, f"workflows/api/{name}.json is stale: run tools/build_workflows.py"
        thumb = Image.open(WORKFLOWS_DIR / f"{name}.jpg")
        assert thumb.format == "JPEG" and thumb.size == (960, 540)


def test_comfyui_lists_the_workflows_as_templates_of_the_pack(comfy):
    """ComfyUI's own /workflow_templates handler (app/custom_node_manager.py) finds workflows/*.json."""
    pytest.importorskip("aiohttp")
    from aiohttp import web
    from app.custom_node_manager import CustomNodeManager
    routes = web.RouteTableDef()
    CustomNodeManager().add_routes(routes, web.Application(), comfy.nodes.LOADED_MODULE_DIRS.items())
    handler = next(r.handler for r in routes if getattr(r, "path", None) == "/workflow_templates")
    listed = json.loads(asyncio.run(handler(None)).text)
    assert sorted(listed.get("sine_edit", [])) == sorted(NAMES)


# ---- running them ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_workflow_executes_on_the_fixtures(headless, fixtures, name):
    prompt = headless.editor.prepare(load(name, api=True), **tiny(name, fixtures))
    assert all(n["inputs"]["steps"] == 2 for n in prompt.values() if n["class_type"] == "SINE_Finetune")
    result = headless.run(prompt, strict=True)
    saved = [headless.output_path(e) for out in result.outputs.values() for e in out.get("images", [])
             if e["type"] == "output"]
    assert len(saved) == 1 and saved[0].is_file()
    pixels = np.asarray(Image.open(saved[0]))
    w, h = SIZES[name]
    if name in GRID:  # the images plus a label row and column
        rows, cols = GRID[name]
        assert pixels.shape[0] > rows * h and pixels.shape[1] > cols * w and pixels.shape[2] == 3
    else:
        assert pixels.shape == (h, w, 3)
    assert np.isfinite(pixels.astype(np.float32)).all()


def test_overrides_map_onto_the_right_nodes(headless, fixtures):
    prompt = headless.editor.prepare(load("sine_edit_controlnet", api=True), prompt="photo of a cat", seed=9,
                                     steps=3, size=(80, 72), **fixture_names("sine_edit_controlnet", fixtures))
    by_title = {n["_meta"]["title"]: n["inputs"] for n in prompt.values()}
    assert by_title["Edit prompt (base CLIP)"]["text"] == "photo of a cat"  # through Apply ControlNet
    assert by_title["Negative prompt (base CLIP)"]["text"] == ""
    assert by_title["SINE Guided Sampler"]["seed"] == 9 and by_title["SINE Guided Sampler"]["steps"] == 3
    assert by_title["SINE Finetune"]["seed"] == 0 and by_title["SINE Finetune"]["steps"] == 400  # training untouched
    assert (by_title["Empty Latent Image"]["width"], by_title["Empty Latent Image"]["height"]) == (80, 72)
    assert by_title["Image to edit"]["image"] == fixtures["source_image"]  # --image: the first Load Image
    assert by_title[HINT_TITLE]["image"] == fixtures["hint_image"]
    two = headless.editor.prepare(load("sine_two_models_content_style", api=True), seed=4, prompt="x",
                                  **fixture_names("sine_two_models_content_style", fixtures))
    inputs = {n["class_type"]: n["inputs"] for n in two.values()}
    assert inputs["RandomNoise"]["noise_seed"] == 4
    assert [n["inputs"]["text"] for n in two.values() if n["class_type"] == "CLIPTextEncode"] == ["x", ""]


@pytest.mark.parametrize("sets,message", [
    (["Nope.steps=3"], "no node 'Nope'"),
    (["SINE_Finetune.stepz=3"], "has no input 'stepz'"),
    (["SINE_Finetune.steps=many"], "expects INT, got 'many'"),
    (["SINE_Finetune.model=3"], "is a MODEL connection, not a value"),
    (["SINE_Finetune.preset=fastest"], "'fastest' is not one of: custom, lora_default, paper"),
    (["steps=3"], "is not NODE.INPUT=VALUE"),
])
def test_bad_overrides_are_refused_in_one_line(headless, fixtures, sets, message):
    kw = fixture_names("sine_finetune_and_edit", fixtures)
    with pytest.raises(workflow_graph.HeadlessError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        headless.editor.prepare(load("sine_finetune_and_edit", api=True), **dict(kw, sets=kw["sets"] + sets))
    assert "\n" not in str(e.value) and e.value.exit_code == 2


def test_missing_files_list_what_is_available(headless, fixtures):
    with pytest.raises(workflow_graph.HeadlessError) as e:
        headless.editor.prepare(load("sine_edit_controlnet", api=False))  # the UI file with its own names
    text = str(e.value)
    assert "'v1-5-pruned-emaonly.safetensors' not found in the checkpoints folders" in text
    assert fixtures["checkpoint"] in text and fixtures["controlnet"] in text and fixtures["source_image"] in text
    assert "control_v11p_sd15_canny.pth" in text and "\n" not in text


def test_validation_and_execution_errors_carry_comfyuis_message(headless, fixtures):
    kw = tiny("sine_finetune_and_edit", fixtures)
    bad = headless.editor.prepare(load("sine_finetune_and_edit", api=True), **dict(kw, sets=kw["sets"] + [
        "SINE_GuidedSampler.finetuned_weight=1.5"]))
    with pytest.raises(ValidationError, match="bigger than max.*finetuned_weight") as e:
        headless.run(bad, strict=True)
    assert e.value.exit_code == 2 and "\n" not in str(e.value)
    failing = headless.editor.prepare(load("sine_finetune_and_edit", api=True), **dict(kw, sets=kw["sets"] + [
        "SINE_GuidedSampler.start_percent=0.8"]))
    with pytest.raises(ExecutionError, match="SINE_GuidedSampler.*is after 'end_percent'") as e:
        headless.run(failing, strict=True)
    assert e.value.exit_code == 1 and "\n" not in str(e.value)


# ---- the command line ------------------------------------------------------------------------------------------
def cli(comfy, *args, timeout=900):
    env = dict(os.environ)
    if comfy.standin_paths:  # the harness needed import stand-ins in this process: the CLI needs them too
        env["PYTHONPATH"] = os.pathsep.join([p for p in (env.get("PYTHONPATH"), *comfy.standin_paths) if p])
    cmd = [sys.executable, str(WORKFLOWS_DIR / "headless.py"), *map(str, args)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(comfy.work))


def error_lines(proc) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("headless.py: error:")]


def common_args(comfy, tmp_path):
    return ["--comfyui", comfy.root, "--models", comfy.work / "models", "--input", comfy.work / "input",
            "--output", tmp_path / "out"]


def test_cli_without_comfyui_says_where_it_looked(comfy, tmp_path):
    proc = cli(comfy, WORKFLOWS_DIR / "api" / "sine_finetune_and_edit.json", "--comfyui", tmp_path / "nowhere")
    assert proc.returncode == 2
    [line] = error_lines(proc)
    assert "ComfyUI not found" in line and "nowhere" in line


@pytest.mark.parametrize("extra,message", [
    (["--checkpoint", "missing.safetensors"], "'missing.safetensors' not found in the checkpoints folders"),
    (["--set", "SINE_Finetune.stepz=2"], "has no input 'stepz'"),
])
def test_cli_refuses_bad_input_with_one_line_and_status_2(comfy, fixtures, tmp_path, extra, message):
    args = [WORKFLOWS_DIR / "sine_finetune_and_edit.json", *common_args(comfy, tmp_path),
            "--checkpoint", fixtures["checkpoint"], "--image", fixtures["source_image"], *extra]
    proc = cli(comfy, *args, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = error_lines(proc)
    assert message in line
    if "checkpoint" in message:
        assert fixtures["checkpoint"] in line  # lists what is available
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.png"))


def test_cli_runs_workflow_1_end_to_end(comfy, fixtures, tmp_path):
    args = [WORKFLOWS_DIR / "sine_finetune_and_edit.json", *common_args(comfy, tmp_path),
            "--checkpoint", fixtures["checkpoint"], "--image", fixtures["source_image"], "--size", "64x64",
            "--steps", "2", "--seed", "5", "--prompt", "photo of a dog wearing a superhero cape"]
    for s in TINY_TRAINING:
        args += ["--set", s]
    proc = cli(comfy, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    written = [Path(line) for line in proc.stdout.splitlines() if line.strip()]
    pngs = [p for p in written if p.suffix == ".png" and p.is_file()]
    outputs = [p for p in pngs if "previews" not in p.parts]
    assert len(outputs) == 1 and outputs[0].is_relative_to(tmp_path / "out")
    assert np.asarray(Image.open(outputs[0])).shape == (64, 64, 3)
    assert any("previews" in p.parts for p in pngs)  # the loss curve (Preview Image) is kept too
