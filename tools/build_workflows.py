#!/usr/bin/env python3
"""Writes the pack's example workflows from ONE definition each, using ComfyUI's LIVE node definitions.

    python tools/build_workflows.py [--comfyui PATH] [--check]

For every workflow below it writes
  workflows/<name>.json      the UI (drag-and-drop) format ComfyUI's template browser lists for this pack,
  workflows/api/<name>.json  the API-format twin (ComfyUI's "Export (API)"; for workflows/headless.py or /prompt),
  workflows/<name>.jpg       a thumbnail: a drawing of the graph (the template browser shows it).
Widget order, which inputs are sockets and which are widgets, output names and unset widget defaults all come
from the node definitions of the ComfyUI this runs against (workflows/workflow_graph.py: widget_slots has the
frontend's rules), so a node whose inputs change makes the generated files change; tests/comfyui/test_workflows.py
checks that the committed files are what this script generates. --check only compares and exits 1 when a file is
stale. A development tool: it lives outside workflows/, which ComfyUI serves as the pack's templates.

The committed files are generated against ComfyUI GENERATED_WITH (the release CI runs). A newer ComfyUI writes
slightly different files (e.g. 0.33.0 gives PreviewImage / SaveImage an IMAGE output); the committed ones still
open there (tests/comfyui/test_browser.py, run against 0.33.0 and its frontend too).
"""
from __future__ import annotations

import json
import sys
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

GENERATED_WITH = "0.3.64"  # comfyui_version.__version__ of the ComfyUI the committed files are generated against
REPO_ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS_DIR = REPO_ROOT / "workflows"
for _folder in (WORKFLOWS_DIR, REPO_ROOT / "tools"):  # the headless runner's modules; the import stand-ins
    if str(_folder) not in sys.path:
        sys.path.append(str(_folder))
import comfy_runtime  # noqa: E402
from import_standins import import_standin_paths  # noqa: E402
from workflow_graph import combo_options, is_widget, ordered_inputs, outputs_of, spec_type, widget_slots  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
CONTROLNET = "control_v11p_sd15_canny.pth"
# ComfyUI ships input/example.png, so the workflows open without a missing-file error. It is a child's drawing of
# a girl in a pink dress on a green hill, and the prompts describe that picture (workflows/README.md, "Example").
IMAGE = "example.png"
SOURCE = "drawing of a sks girl"
EDIT = "drawing of a girl wearing a superhero cape"
# The explanation every workflow shares lives in ONE place; each note points to it with this line.
SHARED = (f"The settings the SINE workflows share (SINE Finetune, the guidance inputs, what to tune, the "
          f"example image) are explained in workflows/README.md in this pack's folder "
          f"(custom_nodes/{comfy_runtime.PACK_DIR_NAME}/workflows/README.md).")
EXAMPLE = (f"The defaults fit ComfyUI's example.png (a child's drawing of a girl): source_prompt '{SOURCE}'. "
           f"For your own image, describe it in both prompts (e.g. 'photo of a sks dog' and 'photo of a dog "
           f"wearing a superhero cape').")

# Group colours: the frontend's own group palette (LGraphCanvas.node_colors[...].groupcolor).
BLUE, GREEN, CYAN, PURPLE, YELLOW = "#88A", "#8A8", "#8AA", "#a1309b", "#b58b2a"


@dataclass
class N:
    """One node: `inputs` in API form, links as (node key, output index) tuples; unset widgets get defaults."""
    key: str
    type: str
    inputs: dict
    col: int
    title: str | None = None


@dataclass
class G:
    """A group: a titled frame around the nodes of one stage (the frontend moves them with it)."""
    title: str
    keys: list[str]
    color: str


@dataclass
class Workflow:
    name: str
    title: str
    nodes: list[N]
    note: str
    groups: list[G]
    zooms: dict[str, list[str]]  # close-up screenshots (tests/comfyui/test_browser.py): file suffix -> group titles
    note_col: int = 0


# ---- the workflows --------------------------------------------------------------------------------------------------
def _load(col: int = 1) -> list[N]:
    return [N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, col),
            N("image", "LoadImage", {"image": IMAGE}, col, "Image to edit")]


def _finetune(key="finetune", image="image", prompt=SOURCE, col=2, title=None, steps=400, patch=None) -> N:
    inputs = {"model": ("ckpt", 0), "clip": ("ckpt", 1), "vae": ("ckpt", 2), "image": (image, 0),
              "source_prompt": prompt, "preset": "custom", "steps": steps, "learning_rate": 1e-4, "seed": 0,
              "method": "lora", "lora_rank": 16, "lora_alpha": 16.0, "layers": "attention", "text_encoder": "off"}
    if patch:
        inputs["patch_config"] = (patch, 0)
    return N(key, "SINE_Finetune", inputs, col, title)


def _prompts(col: int, edit: str = EDIT, size=(512, 512), latent_title=None) -> list[N]:
    return [N("pos", "CLIPTextEncode", {"text": edit, "clip": ("ckpt", 1)}, col, "Edit prompt (base CLIP)"),
            N("neg", "CLIPTextEncode", {"text": "", "clip": ("ckpt", 1)}, col, "Negative prompt (base CLIP)"),
            N("latent", "EmptyLatentImage", {"width": size[0], "height": size[1], "batch_size": 1}, col,
              latent_title)]


def _sampler(col: int, positive=("pos", 0), negative=("neg", 0)) -> N:
    return N("sample", "SINE_GuidedSampler", {
        "model": ("ckpt", 0), "seed": 0, "steps": 50, "cfg": 7.5, "sampler_name": "ddim",
        "scheduler": "ddim_uniform", "positive": positive, "negative": negative, "latent_image": ("latent", 0),
        "denoise": 1.0, "sine_adapter": ("finetune", 3), "source_conditioning": ("finetune", 2),
        "finetuned_weight": 0.3, "start_percent": 0.0, "end_percent": 0.6}, col)


def _decode_save(col: int, samples=("sample", 0), prefix="sine/edit") -> list[N]:
    return [N("decode", "VAEDecode", {"samples": samples, "vae": ("ckpt", 2)}, col),
            N("save", "SaveImage", {"images": ("decode", 0), "filename_prefix": prefix}, col + 1)]


def _prompts_group() -> G:
    return G("2  Edit prompt, size", ["pos", "neg", "latent"], GREEN)


def _save_group(number: int) -> G:
    return G(f"{number}  Decode & save", ["decode", "save"], YELLOW)


def _one_model(name: str, title: str, head: str, specific: str, *, patch: bool = False,
               size=(512, 512), prefix: str = "sine/edit", controlnet: bool = False) -> Workflow:
    """The single-image edit: fine-tune -> edit prompt -> (ControlNet) -> SINE Guided Sampler -> save."""
    nodes = _load()
    tune_keys = ["ckpt", "image"]
    if patch:
        nodes.append(N("patch", "SINE_PatchResolutionConfig", {}, 1))
        tune_keys.append("patch")
    nodes += [_finetune(steps=1000 if patch else 400, patch="patch" if patch else None),
              N("loss", "PreviewImage", {"images": ("finetune", 4)}, 2, "Loss curve"),
              *_prompts(3, size=size, latent_title="Output size (any aspect ratio)" if patch else None)]
    tune = G("1  Patch-based fine-tune" if patch else "1  Fine-tune on the source image",
             tune_keys + ["finetune", "loss"], BLUE)
    prompts = _prompts_group()
    groups, col, conditioning = [tune, prompts], 4, (("pos", 0), ("neg", 0))
    zooms = {"finetune": [tune.title]}
    if controlnet:
        nodes += [N("cnet", "ControlNetLoader", {"control_net_name": CONTROLNET}, 4),
                  N("hint", "LoadImage", {"image": IMAGE}, 4, "ControlNet hint (canny edges of your image)"),
                  N("apply", "ControlNetApplyAdvanced", {
                      "positive": ("pos", 0), "negative": ("neg", 0), "control_net": ("cnet", 0),
                      "image": ("hint", 0), "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}, 5)]
        groups.append(G("3  ControlNet on both prompts", ["cnet", "hint", "apply"], CYAN))
        col, conditioning = 6, (("apply", 0), ("apply", 1))
        zooms = {"controlnet": [groups[-1].title]}  # its fine-tune and sampler are the first workflow's
    nodes += [_sampler(col, *conditioning), *_decode_save(col + 1, prefix=prefix)]
    sampling = G(f"{len(groups) + 1}  SINE sampling", ["sample"], PURPLE)
    groups += [sampling, _save_group(len(groups) + 2)]
    if not controlnet:  # the ControlNet group sits between the prompts and the sampler: too wide for one shot
        zooms["sampling"] = [prompts.title, sampling.title]
    return Workflow(name, title, nodes, f"{head}\n\n{specific}\n\n{EXAMPLE}\n\n{SHARED}", groups, zooms)


def wf_finetune_and_edit() -> Workflow:
    return _one_model(
        "sine_finetune_and_edit", "SINE: fine-tune on one image, then edit it with a prompt",
        "SINE: edit ONE image with words (Zhang et al., CVPR 2023)",
        "Load your image, describe it in SINE Finetune's source_prompt, write the edited image in the edit "
        "prompt, queue. The groups are the stages:\n"
        "1 SINE Finetune learns the image (LoRA defaults, 400 steps; the loss curve should fall and flatten). It "
        "trains once per image and settings; later runs reuse it.\n"
        "2 The edit prompt goes through the BASE CLIP. Empty Latent Image: the output size, any multiple of 8; "
        "for sizes far from the training square use the sine_patch_edit_resolution workflow.\n"
        "3 SINE Guided Sampler: model = the BASE model; the fine-tuned one comes in through sine_adapter + "
        "source_conditioning. finetuned_weight 0.3, window 0.0-0.6: the paper's values.\n"
        "4 VAE Decode, Save Image (file prefix sine/edit).")


def wf_patch_edit_resolution() -> Workflow:
    return _one_model(
        "sine_patch_edit_resolution", "SINE: patch-based fine-tune, edit at 768x512",
        "SINE with patch-based fine-tuning: render the edit at another size / aspect ratio (here 768x512)",
        "SINE Patch Resolution Config turns SINE Finetune into patch-based training: it stretches the image to a "
        "working canvas (working_size 0 = 1024 for SD1.5, as the paper), trains on random crops of it resized to "
        "train_resolution (0 = 512), and adds a fixed positional grid (grid_size 128 cells, the paper's) after "
        "the UNet's first conv, so the model learns WHERE each crop lies. At sampling the whole grid is "
        "stretched over the latent: any width x height shows the whole image.\n"
        "- min/max_crop_frac 0.1-1.0: crop sizes (small crops teach detail, large ones layout).\n"
        "- crop_bank -1 (auto): a fresh crop every step on a GPU, 32 crops encoded once on the CPU or --lowvram.\n"
        "- interpolation: bilinear for photos, nearest for paintings.\n"
        "- Patch training wants more steps than whole-image training: 1000 here (LoRA); the paper trains 10,000 "
        "for full fine-tunes. Raise steps if the output loses detail.\n"
        "- Output size (Empty Latent Image): 768x512 here; any multiple of 8.",
        patch=True, size=(768, 512), prefix="sine/edit_768x512")


def wf_edit_controlnet() -> Workflow:
    return _one_model(
        "sine_edit_controlnet", "SINE edit guided by a ControlNet (canny)",
        "SINE + ControlNet: the edit follows the structure of a control image",
        "Apply ControlNet (Advanced) goes between the edit/negative prompts and the SINE Guided Sampler, as with "
        "KSampler. The control also steers the fine-tuned model's rows (one structure for the whole mix).\n"
        "- ControlNet hint: an edge map of your image for the canny model (a Canny node from the preprocessor "
        "nodes can make it from the image). It starts on example.png itself, which is not an edge map: replace "
        "it. Any SD1.5 ControlNet works with its own hint type.\n"
        "- strength 1.0 / start 0 / end 1: lower strength or end_percent if the control fights the edit.\n"
        "- The hint is resized to the latent size automatically.",
        prefix="sine/edit_controlnet", controlnet=True)


def wf_two_models_content_style() -> Workflow:
    nodes = [
        N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, 1),
        N("content", "LoadImage", {"image": IMAGE}, 1, "Content image"),
        N("style", "LoadImage", {"image": IMAGE}, 1, "Style image"),
        _finetune("ft_content", "content", SOURCE, 2, "SINE Finetune (content)"),
        _finetune("ft_style", "style", "drawing in sks style", 2, "SINE Finetune (style)"),
        *_prompts(3, "drawing of a girl"),
        N("add_style", "SINE_AddFinetunedModel", {
            "sine_adapter": ("ft_style", 3), "source_conditioning": ("ft_style", 2), "finetuned_weight": 0.4,
            "start_percent": 0.0, "end_percent": 0.6}, 4, "Style model (weight 0.4)"),
        N("guider", "SINE_Guider", {
            "model": ("ckpt", 0), "positive": ("pos", 0), "negative": ("neg", 0), "cfg": 7.5,
            "sine_adapter": ("ft_content", 3), "source_conditioning": ("ft_content", 2), "finetuned_weight": 0.4,
            "start_percent": 0.0, "end_percent": 0.6, "extra_models": ("add_style", 0)}, 4,
          "SINE Guider (content weight 0.4)"),
        N("noise", "RandomNoise", {"noise_seed": 0}, 5),
        N("ksampler", "KSamplerSelect", {"sampler_name": "ddim"}, 5),
        N("sigmas", "BasicScheduler", {"model": ("ckpt", 0), "scheduler": "ddim_uniform", "steps": 50,
                                       "denoise": 1.0}, 5),
        N("run", "SamplerCustomAdvanced", {"noise": ("noise", 0), "guider": ("guider", 0),
                                           "sampler": ("ksampler", 0), "sigmas": ("sigmas", 0),
                                           "latent_image": ("latent", 0)}, 6),
        *_decode_save(7, samples=("run", 0), prefix="sine/content_style"),
    ]
    tune = G("1  Fine-tune content and style", ["ckpt", "content", "style", "ft_content", "ft_style"], BLUE)
    prompts = _prompts_group()
    mix = G("3  SINE guidance", ["add_style", "guider"], PURPLE)
    groups = [tune, prompts, mix, G("4  Sampling", ["noise", "ksampler", "sigmas", "run"], CYAN), _save_group(5)]
    note = ("SINE with two fine-tuned models: content from one image, style from another (paper section 5)\n\n"
            "Each image gets its own SINE Finetune with its own caption. The SINE Guider mixes, during its "
            "window, the base model (edit prompt) with BOTH fine-tuned models:\n"
            "- SINE Guider finetuned_weight 0.4 = weight of the CONTENT model (its own sine_adapter input).\n"
            "- SINE Add Fine-tuned Model finetuned_weight 0.4 = weight of the STYLE model; it reaches the guider "
            "through extra_models. Chain more Add nodes for more models.\n"
            "- The base model gets 1 - 0.4 - 0.4 = 0.2; the weights must sum to at most 1.\n"
            "- Each model has its own window (start/end_percent; end 0.6 = paper K = 400).\n"
            "- SINE Guider is a GUIDER for SamplerCustomAdvanced: any noise, sampler (ddim here) and sigmas "
            "(BasicScheduler ddim_uniform, 50 steps). model of the guider and the scheduler = the BASE model.\n"
            "- More style: raise the style weight (and lower content); more content identity: the other way "
            "round. Add a Preview Image on each loss_curve output to watch training.\n\n"
            f"Both Load Image nodes start on ComfyUI's example.png (a child's drawing of a girl), so both models "
            f"learn the same picture: captions '{SOURCE}' and 'drawing in sks style', edit prompt 'drawing of a "
            f"girl'. Load a photo as content and a painting as style, and caption them (e.g. 'photo of a sks dog', "
            f"'painting in sks style', edit 'painting of a dog').\n\n{SHARED}")
    return Workflow("sine_two_models_content_style", "SINE: content from one image, style from another", nodes, note,
                    groups, {"finetune": [tune.title], "guidance": [prompts.title, mix.title]})


def wf_masked_edit() -> Workflow:
    nodes = [*_load(), _finetune(), N("loss", "PreviewImage", {"images": ("finetune", 4)}, 2, "Loss curve"),
             *_prompts(3),
             N("mask_bg", "SolidMask", {"value": 0.0, "width": 512, "height": 512}, 4, "Edit everywhere..."),
             N("mask_keep", "SolidMask", {"value": 1.0, "width": 256, "height": 512}, 4, "...but keep the left half"),
             N("mask", "MaskComposite", {"destination": ("mask_bg", 0), "source": ("mask_keep", 0), "x": 0, "y": 0,
                                         "operation": "add"}, 4, "Region to keep (white)")]
    sampler = _sampler(5)
    sampler.inputs.update(mask=("mask", 0), finetuned_weight=0.8, outside_weight=0.1, mask_feather=2)
    sampler.title = "SINE Guided Sampler (0.8 inside the mask, 0.1 outside)"
    nodes += [sampler, *_decode_save(6, prefix="sine/masked_edit")]
    tune = G("1  Fine-tune on the source image", ["ckpt", "image", "finetune", "loss"], BLUE)
    prompts = _prompts_group()
    region = G("3  Region to keep", ["mask_bg", "mask_keep", "mask"], CYAN)
    sampling = G("4  SINE with a mask", ["sample"], PURPLE)
    groups = [tune, prompts, region, sampling, _save_group(5)]
    note = ("SINE masked edit: keep one region of the source image, edit the rest\n\n"
            "A MASK on the SINE Guided Sampler turns the fine-tuned model's weight into a map: finetuned_weight "
            "inside the mask (white), outside_weight outside. Where the weight is high the fine-tuned model (the "
            "source image) steers the high-noise steps, so that region keeps its layout and look; where it is low "
            "the edit prompt is free.\n"
            "- Here: 0.8 inside (keep), 0.1 outside (edit). The mask is the left half of the canvas, built from two "
            "Solid Mask nodes. For your image, paint the region to keep on Load Image (right-click > Open in "
            "MaskEditor) and connect Load Image's MASK output instead, or use any mask node.\n"
            "- mask_feather 2: the edge blends over about 2 latent pixels (16 image pixels); 0 = a hard edge.\n"
            "- The mask is resized to the latent like a latent noise mask; any output size works.\n"
            "- The weights only act in the window (start/end_percent, paper 0.0-0.6); the last steps are plain "
            "CFG everywhere, so fine detail inside the kept region can still change. To freeze a region EXACTLY "
            "(pixels of an encoded image), add Set Latent Noise Mask on an encoded latent: both work together.\n"
            "- Several models: each SINE Add Fine-tuned Model has its own mask; all weights must sum to at most 1 "
            f"at every pixel (the sampler says where they do not).\n\n{EXAMPLE}\n\n{SHARED}")
    return Workflow("sine_masked_edit", "SINE: keep a region of the source, edit the rest", nodes, note, groups,
                    {"mask": [region.title, sampling.title]})


LORA_FILE = "your_character_lora.safetensors"  # a placeholder: pick your own LoRA in the node


def wf_lora_as_finetuned() -> Workflow:
    nodes = [N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, 1),
             N("lora", "SINE_LoraAsAdapter", {"model": ("ckpt", 0), "clip": ("ckpt", 1), "lora_name": LORA_FILE,
                                              "source_prompt": "photo of sks person", "strength": 1.0}, 2),
             *_prompts(3, "photo of a person wearing a superhero cape")]
    sampler = _sampler(4)
    sampler.inputs.update(sine_adapter=("lora", 3), source_conditioning=("lora", 2), finetuned_weight=0.4)
    nodes += [sampler, *_decode_save(5, prefix="sine/lora_edit")]
    source = G("1  Your LoRA as the fine-tuned model", ["ckpt", "lora"], BLUE)
    prompts = _prompts_group()
    sampling = G("3  SINE sampling", ["sample"], PURPLE)
    groups = [source, prompts, sampling, _save_group(4)]
    note = ("SINE with a LoRA you already have (DreamBooth, character LoRA) as the fine-tuned model\n\n"
            "No training here: SINE LoRA as Fine-tuned Model reads a LoRA from models/loras and gives the same "
            "outputs as SINE Finetune (model, clip, source_conditioning, sine_adapter).\n"
            f"- lora_name: '{LORA_FILE}' is a placeholder; pick your LoRA. Plain LoRA in kohya, diffusers or "
            "ComfyUI naming, UNet and optional text-encoder parts, any rank; made for the loaded checkpoint. "
            "LoHa, LoKr, DoRA and similar are refused (use them with the stock LoraLoader).\n"
            "- source_prompt: the LoRA's trigger prompt (e.g. 'photo of sks person').\n"
            "- strength: as LoraLoader's (1 = as trained).\n"
            "- What to expect: a LoRA trained on many images carries an IDENTITY (who or what), not the layout of "
            "one picture. The guided sampler then draws the edit prompt with that identity during the window; it "
            "does not reproduce a particular photo. For one image's layout, fine-tune on that image with SINE "
            "Finetune.\n"
            "- finetuned_weight 0.4: higher = more of the LoRA's subject, lower = more of the edit prompt.\n\n"
            f"{SHARED}")
    return Workflow("sine_lora_as_finetuned", "SINE: a stock LoRA as the fine-tuned model", nodes, note, groups,
                    {"lora": [source.title], "sampling": [prompts.title, sampling.title]})


def wf_sweep() -> Workflow:
    nodes = [*_load(), _finetune(), N("loss", "PreviewImage", {"images": ("finetune", 4)}, 2, "Loss curve"),
             *_prompts(3),
             N("guider", "SINE_Guider", {
                 "model": ("ckpt", 0), "positive": ("pos", 0), "negative": ("neg", 0), "cfg": 7.5,
                 "sine_adapter": ("finetune", 3), "source_conditioning": ("finetune", 2), "finetuned_weight": 0.3,
                 "start_percent": 0.0, "end_percent": 0.6}, 4, "SINE Guider (shared settings)"),
             N("sweep", "SINE_Sweep", {
                 "guider": ("guider", 0), "seed": 0, "steps": 50, "sampler_name": "ddim",
                 "scheduler": "ddim_uniform", "latent_image": ("latent", 0), "denoise": 1.0,
                 "finetuned_weights": "0.2, 0.3, 0.4, 0.5", "end_percents": "0.5, 0.6, 0.7", "vae": ("ckpt", 2)},
               5, "SINE Sweep (4 weights x 3 window ends)"),
             N("save", "SaveImage", {"images": ("sweep", 1), "filename_prefix": "sine/sweep_grid"}, 6,
               "Save the labelled grid")]
    tune = G("1  Fine-tune on the source image", ["ckpt", "image", "finetune", "loss"], BLUE)
    prompts = _prompts_group()
    sweep = G("3  SINE Sweep", ["guider", "sweep"], PURPLE)
    groups = [tune, prompts, sweep, G("4  Save the grid", ["save"], YELLOW)]
    note = ("SINE Sweep: try many fine-tuned weights and window ends in ONE sampling run, as a labelled grid\n\n"
            "Choosing finetuned_weight (how much of the source to keep) and end_percent (K: how long the fine-tuned "
            "model steers) is a search. SINE Sweep samples every combination as the rows of one batch, so on a GPU "
            "12 settings cost little more than one run.\n"
            "- SINE Guider holds what every row shares: the base model, the prompts, cfg, start_percent (and a mask "
            "or extra models if you add them). Its finetuned_weight and end_percent are replaced by the lists.\n"
            "- finetuned_weights '0.2, 0.3, 0.4, 0.5' and end_percents '0.5, 0.6, 0.7' give 12 rows. The grid's "
            "columns are the window ends (K 500, 400, 300), its rows the weights.\n"
            "- Every row starts from the seed's noise: a cell you like is reproduced by SINE Guided Sampler with "
            "that cell's finetuned_weight and end_percent, the same seed, steps, sampler and scheduler. The "
            "settings output lists each row's values.\n"
            "- prompts (one per line, with the base CLIP connected to clip) adds edit prompts as more grid rows.\n"
            "- rows_per_chunk 0 fits as many rows per run as free memory allows; lower it if the GPU runs out of "
            "memory. The latents output holds every row (VAE Decode it to save them one by one).\n\n"
            f"{EXAMPLE}\n\n{SHARED}")
    return Workflow("sine_sweep", "SINE Sweep: many weights and windows in one run, as a grid", nodes, note, groups,
                    {"sweep": [sweep.title]})


WORKFLOWS: list[Callable[[], Workflow]] = [wf_finetune_and_edit, wf_patch_edit_resolution, wf_edit_controlnet,
                                           wf_two_models_content_style, wf_masked_edit, wf_lora_as_finetuned,
                                           wf_sweep]


# ---- building both formats ------------------------------------------------------------------------------------------
COL_GAP, ROW_GAP, TITLE_H, SLOT_H, WIDGET_H = 70, 40, 30, 22, 24
WIDTHS = {"CLIPTextEncode": 400, "SINE_Finetune": 360, "SINE_GuidedSampler": 340, "SINE_Guider": 340,
          "SINE_Sweep": 360, "SINE_AddFinetunedModel": 330, "SINE_PatchResolutionConfig": 330, "SaveImage": 420,
          "PreviewImage": 360, "Note": 460}
GROUP_FONT, GROUP_PAD = 36, 16  # group title font (frontend 1.27's default is 24: too small in the overview)
GROUP_CHAR_W = 0.5  # a generous average character width of the title font, in font sizes (for the fit check)
GROUP_TITLE_H = round(GROUP_FONT * 1.4)  # the frontend's group title bar: font_size * 1.4 (LGraphGroup.titleHeight)
SINE_COLOR = {"color": "#223", "bgcolor": "#335"}
NOTE_COLOR = {"color": "#432", "bgcolor": "#653"}


def socket_inputs(info: dict) -> list[tuple[str, str, bool]]:
    """[(name, type, optional)] of the inputs that are connection sockets (not widgets), in order."""
    return [(n, spec_type(s), opt) for n, s, opt in ordered_inputs(info) if not is_widget(s)]


def _default(spec):
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    options = combo_options(spec)
    if options:
        return options[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(spec_type(spec))


def _node_size(kind: str, info: dict, n_widgets: int) -> list[int]:
    rows = max(len(socket_inputs(info)), len(outputs_of(info)), 1)
    h = rows * SLOT_H + 8 + n_widgets * WIDGET_H + 8
    if kind == "CLIPTextEncode":
        h += 110
    elif kind == "LoadImage":
        h += 250
    elif kind in ("SaveImage", "PreviewImage"):
        h = 300 if kind == "PreviewImage" else 380
    return [WIDTHS.get(kind, 320), h]


def _note_size(text: str) -> list[int]:
    lines = sum(max(1, len(textwrap.wrap(p, 62))) for p in text.split("\n"))
    return [WIDTHS["Note"], 40 + lines * 17]


def _groups(wf: Workflow, boxes: dict[str, list[int]]) -> list[dict]:
    """The UI groups: each frames its nodes (title bar included) with GROUP_PAD around and its own title bar above.

    Checked here: every node's centre lies in its own group only and the note's in none (the frontend's rule for
    which nodes a group holds), no two groups overlap, and each title fits its frame."""
    def rect(key):  # the frontend's node boundingRect: the title bar above pos, then the body
        x, y, w, h = boxes[key]
        return [x, y - TITLE_H, w, h + TITLE_H]

    out, member = [], {}
    for i, g in enumerate(wf.groups, 1):
        rects = [rect(k) for k in g.keys]
        x0 = min(r[0] for r in rects) - GROUP_PAD
        y0 = min(r[1] for r in rects) - GROUP_PAD - GROUP_TITLE_H
        x1 = max(r[0] + r[2] for r in rects) + GROUP_PAD
        y1 = max(r[1] + r[3] for r in rects) + GROUP_PAD
        out.append({"id": i, "title": g.title, "bounding": [x0, y0, x1 - x0, y1 - y0], "color": g.color,
                    "font_size": GROUP_FONT, "flags": {}})
        member.update({k: g.title for k in g.keys})
        if len(g.title) * GROUP_CHAR_W * GROUP_FONT > x1 - x0 - 8:  # it would run into the next group
            raise ValueError(f"{wf.name}: group title {g.title!r} is too long for its group (shorten it)")

    def inside(b, x, y):
        return b[0] <= x <= b[0] + b[2] and b[1] <= y <= b[1] + b[3]
    for key in boxes:
        x, y, w, h = rect(key)
        holders = [g["title"] for g in out if inside(g["bounding"], x + w / 2, y + h / 2)]
        expected = [member[key]] if key in member else []
        if holders != expected:
            raise ValueError(f"{wf.name}: node {key} lies in group(s) {holders}, not in {expected}")
    for a in out:
        for b in out[a["id"]:]:
            (ax, ay, aw, ah), (bx, by, bw, bh) = a["bounding"], b["bounding"]
            if ax < bx + bw and bx < ax + aw and ay < by + bh and by < ay + ah:
                raise ValueError(f"{wf.name}: groups {a['title']!r} and {b['title']!r} overlap")
    return out


def _api_prompt(wf: Workflow, ids: dict, infos: dict) -> tuple[dict, dict]:
    """(API prompt, node key -> its inputs) of a definition, every widget filled as the frontend sends it."""
    api, values = {}, {}
    for n in wf.nodes:
        info = infos[n.key]
        ordered = ordered_inputs(info)
        known = {name for name, _, _ in ordered}
        unknown = set(n.inputs) - known
        if unknown:
            raise ValueError(f"{wf.name}: {n.type} has no input(s) {sorted(unknown)}")
        inputs = {}
        for name, spec, optional in ordered:
            if name in n.inputs:
                v = n.inputs[name]
                inputs[name] = [str(ids[v[0]]), v[1]] if isinstance(v, tuple) else v
            elif is_widget(spec):  # the frontend sends every widget, optional ones too
                inputs[name] = _default(spec)
            elif not optional:
                raise ValueError(f"{wf.name}: {n.key} ({n.type}) needs input '{name}'")
        values[n.key] = inputs
        api[str(ids[n.key])] = {"inputs": inputs, "class_type": n.type,
                                "_meta": {"title": n.title or info.get("display_name") or n.type}}
    return api, values


def _layout(wf: Workflow, sizes: dict, note_size) -> dict:
    """Node key (and "__note__") -> [x, y]: columns left to right, nodes stacked in each column in definition
    order, the note first in its column."""
    cols = sorted({n.col for n in wf.nodes} | {wf.note_col})
    col_w = {c: max([sizes[n.key][0] for n in wf.nodes if n.col == c] +
                    ([note_size[0]] if c == wf.note_col else [0])) for c in cols}
    col_x, x = {}, 0
    for c in cols:
        col_x[c] = x
        x += col_w[c] + COL_GAP
    col_y = {c: 0 for c in cols}
    pos = {"__note__": [col_x[wf.note_col], col_y[wf.note_col]]}
    col_y[wf.note_col] += note_size[1] + TITLE_H + ROW_GAP
    for n in wf.nodes:
        pos[n.key] = [col_x[n.col], col_y[n.col]]
        col_y[n.col] += sizes[n.key][1] + TITLE_H + ROW_GAP
    return pos


def _sockets_and_links(wf: Workflow, ids: dict, infos: dict, values: dict):
    """(node key -> its input sockets, litegraph links, (source key, slot) -> link ids); links numbered from 1."""
    links: list[list] = []
    out_links: dict[tuple[str, int], list[int]] = {}
    ui_inputs: dict[str, list[dict]] = {}
    for n in wf.nodes:
        sockets = []
        for name, typ, optional in socket_inputs(infos[n.key]):
            entry = {"name": name, "type": typ, "link": None}
            if optional:
                entry["shape"] = 7
            v = values[n.key].get(name)
            if isinstance(v, list):
                link_id = len(links) + 1
                src_key = next(k for k, i in ids.items() if str(i) == v[0])
                src_type = outputs_of(infos[src_key])[v[1]][1]
                links.append([link_id, int(v[0]), v[1], ids[n.key], len(sockets), src_type])
                out_links.setdefault((src_key, v[1]), []).append(link_id)
                entry["link"] = link_id
            sockets.append(entry)
        ui_inputs[n.key] = sockets
    return ui_inputs, links, out_links


def build(wf: Workflow, object_info: Callable[[str], dict]) -> tuple[dict, dict]:
    """(UI workflow, API prompt) for one definition."""
    ids = {n.key: i + 1 for i, n in enumerate(wf.nodes)}
    infos = {n.key: object_info(n.type) for n in wf.nodes}
    api, values = _api_prompt(wf, ids, infos)

    # execution order (litegraph's "order"): a topological sort
    order, done = {}, set()

    def visit(key):
        if key in done:
            return
        done.add(key)
        for v in values[key].values():
            if isinstance(v, list) and len(v) == 2 and isinstance(v[1], int):
                visit(next(k for k, i in ids.items() if str(i) == v[0]))
        order[key] = len(order)
    for n in wf.nodes:
        visit(n.key)

    # sockets, links, widgets
    ui_nodes = []
    ui_inputs, links, out_links = _sockets_and_links(wf, ids, infos, values)
    link_id = len(links)

    sizes, widgets = {}, {}
    for n in wf.nodes:
        wv = []
        for name, kind in widget_slots(infos[n.key]):
            if kind == "value":
                wv.append(values[n.key][name])
            elif kind == "control":
                wv.append("fixed")
            else:
                wv.append("image")
        widgets[n.key] = wv
        sizes[n.key] = _node_size(n.type, infos[n.key], len(wv))

    note_size = _note_size(wf.note)
    pos = _layout(wf, sizes, note_size)
    groups = _groups(wf, {k: [*pos[k], *sizes[k]] for k in sizes} | {"__note__": [*pos["__note__"], *note_size]})

    for n in wf.nodes:
        info = infos[n.key]
        node = {"id": ids[n.key], "type": n.type, "pos": pos[n.key], "size": sizes[n.key], "flags": {},
                "order": order[n.key], "mode": 0, "inputs": ui_inputs[n.key], "outputs": []}
        for i, (name, typ) in enumerate(outputs_of(info)):
            node["outputs"].append({"name": name, "type": typ, "slot_index": i,
                                    "links": out_links.get((n.key, i)) or None})
        if n.title:
            node["title"] = n.title
        node["properties"] = {"Node name for S&R": n.type}
        node["widgets_values"] = widgets[n.key]
        if n.type.startswith("SINE_"):
            node.update(SINE_COLOR)
        ui_nodes.append(node)
    note_id = len(wf.nodes) + 1
    ui_nodes.append({"id": note_id, "type": "Note", "pos": pos["__note__"], "size": note_size, "flags": {},
                     "order": len(wf.nodes), "mode": 0, "inputs": [], "outputs": [], "title": "Read me: key settings",
                     "properties": {}, "widgets_values": [wf.note], **NOTE_COLOR})
    ui = {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"sine-edit/workflows/{wf.name}")), "revision": 0,
          "last_node_id": note_id, "last_link_id": link_id, "nodes": ui_nodes, "links": links, "groups": groups,
          "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [60, 80 - min(g["bounding"][1] for g in groups)]},
                                  "sine_edit": {"title": wf.title}},
          "version": 0.4}
    return ui, api


def build_all(object_info: Callable[[str], dict]) -> dict[str, tuple[dict, dict, str]]:
    """{name: (UI workflow, API prompt, title)} for every workflow."""
    out = {}
    for make in WORKFLOWS:
        wf = make()
        ui, api = build(wf, object_info)
        out[wf.name] = (ui, api, wf.title)
    return out


def dumps(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"


# ---- thumbnails -----------------------------------------------------------------------------------------------------
def render_thumbnail(ui: dict, title: str, path: Path, display: Callable[[str], str] = lambda t: t,
                     size=(960, 540)) -> None:
    """A drawing of the graph: stage groups, node boxes with titles, links as curves with arrowheads (PIL only)."""
    from PIL import Image, ImageDraw, ImageFont

    def font(px):
        try:
            return ImageFont.load_default(size=px)
        except TypeError:  # Pillow < 10.1
            return ImageFont.load_default()

    W, H = size
    img = Image.new("RGB", size, (32, 33, 36))
    d = ImageDraw.Draw(img)
    d.text((20, 14), title, fill=(235, 235, 235), font=font(24))
    nodes = {n["id"]: n for n in ui["nodes"] if n["type"] != "Note"}  # the graph, not the read-me
    boxes = [[n["pos"][0], n["pos"][1] - TITLE_H, n["size"][0], n["size"][1] + TITLE_H] for n in nodes.values()]
    boxes += [g["bounding"] for g in ui["groups"]]
    x0, y0 = min(b[0] for b in boxes), min(b[1] for b in boxes)
    x1, y1 = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    top, pad = 56, 18
    s = min((W - 2 * pad) / (x1 - x0), (H - top - pad) / (y1 - y0))
    ox = pad + ((W - 2 * pad) - (x1 - x0) * s) / 2
    oy = top + ((H - top - pad) - (y1 - y0) * s) / 2

    def P(x, y):
        return ox + (x - x0) * s, oy + (y - y0) * s

    def slot_y(node, i):
        return node["pos"][1] + 14 + i * SLOT_H

    group_font = font(15)
    for g in ui["groups"]:  # as the frontend draws them: a translucent frame with a title bar of its colour
        x, y, w, h = g["bounding"]
        rgb = _rgb(g["color"])
        (gx, gy), (gx1, gy1) = P(x, y), P(x + w, y + h)
        d.rectangle([gx, gy, gx1, gy1], fill=tuple(int(0.25 * c + 0.75 * b) for c, b in zip(rgb, (32, 33, 36))),
                    outline=rgb)
        bar = max(20, GROUP_TITLE_H * s)
        d.rectangle([gx, gy, gx1, gy + bar], fill=tuple(int(0.6 * c) for c in rgb))
        d.text((gx + 5, gy + 3), _fit(d, g["title"], group_font, gx1 - gx - 8), fill=(250, 250, 250), font=group_font)

    for _, src, src_slot, dst, dst_slot, _t in ui["links"]:
        if src not in nodes or dst not in nodes:
            continue
        a, b = nodes[src], nodes[dst]
        (ax, ay), (bx, by) = P(a["pos"][0] + a["size"][0], slot_y(a, src_slot)), P(b["pos"][0], slot_y(b, dst_slot))
        dx = max(30.0, (bx - ax) / 2)
        pts = []
        for k in range(33):
            t = k / 32
            c = [(ax, ay), (ax + dx, ay), (bx - dx, by), (bx, by)]
            x = sum(w * p[0] for w, p in zip(((1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t * t * (1 - t), t ** 3), c))
            y = sum(w * p[1] for w, p in zip(((1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t * t * (1 - t), t ** 3), c))
            pts.append((x, y))
        d.line(pts, fill=(150, 190, 230), width=2)
        d.polygon([(bx, by), (bx - 8, by - 4), (bx - 8, by + 4)], fill=(150, 190, 230))

    title_font, body_font = font(13), font(11)
    for n in nodes.values():
        (nx, ny) = P(n["pos"][0], n["pos"][1] - TITLE_H)
        (mx, my) = P(n["pos"][0] + n["size"][0], n["pos"][1] + n["size"][1])
        is_sine = n["type"].startswith("SINE_")
        body = (51, 51, 85) if is_sine else (53, 53, 53)
        head = (34, 34, 60) if is_sine else (30, 30, 30)
        d.rounded_rectangle([nx, ny, mx, my], radius=5, fill=body, outline=(95, 95, 95))
        d.rounded_rectangle([nx, ny, mx, ny + max(18, TITLE_H * s)], radius=5, fill=head)
        label = _fit(d, n.get("title") or display(n["type"]), title_font, mx - nx - 8)
        d.text((nx + 5, ny + 3), label, fill=(245, 245, 245), font=title_font)
        wv = [v for v in n.get("widgets_values", []) if isinstance(v, (str, int, float)) and v not in
              ("fixed", "image", "")]
        yy = ny + max(18, TITLE_H * s) + 4
        for v in wv[:4]:
            if yy + 13 > my:
                break
            d.text((nx + 5, yy), _fit(d, str(v), body_font, mx - nx - 8), fill=(200, 200, 200), font=body_font)
            yy += 13
    img.save(path, "JPEG", quality=88)


def _rgb(color: str) -> tuple[int, int, int]:
    """'#8A8' or '#a1309b' -> (r, g, b)."""
    h = color.lstrip("#")
    if len(h) == 3:
        h = "".join(c * 2 for c in h)
    return tuple(int(h[i:i + 2], 16) for i in (0, 2, 4))


def _fit(draw, text: str, font, width: float) -> str:
    """`text` cut (with an ellipsis) to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


# ---- command line ---------------------------------------------------------------------------------------------------
def write_all(h: comfy_runtime.Headless, out_dir: Path = WORKFLOWS_DIR, check: bool = False) -> list[Path]:
    """Writes (or with check=True, lists the stale) files; returns the paths written or stale."""
    changed = []
    (out_dir / "api").mkdir(parents=True, exist_ok=True)
    for name, (ui, api, title) in build_all(h.object_info).items():
        for path, text in ((out_dir / f"{name}.json", dumps(ui)), (out_dir / "api" / f"{name}.json", dumps(api))):
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                changed.append(path)
                if not check:
                    path.write_text(text, encoding="utf-8")
        thumb = out_dir / f"{name}.jpg"
        if not check:
            render_thumbnail(ui, title, thumb, lambda t: h.object_info(t).get("display_name") or t)
        elif not thumb.exists():
            changed.append(thumb)
    return changed


def main(argv=None) -> int:
    import argparse
    import tempfile
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, then ~/comfy/ComfyUI)")
    p.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = p.parse_args(argv)
    root = comfy_runtime.find_comfyui(args.comfyui)
    if root is None:
        print("build_workflows.py: error: ComfyUI not found; pass --comfyui PATH", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="sine_build_workflows_"))
    # import-only stand-ins for the packages ComfyUI imports but this machine lacks, as the tests use them
    h = comfy_runtime.Headless(root, models=work / "models", input=work / "input", output=work / "output",
                          temp=work / "temp", extra_sys_path=import_standin_paths(), cpu=True)
    if not h.pack_load_ok:
        print("build_workflows.py: error: ComfyUI could not import the pack", file=sys.stderr)
        return 2
    import comfyui_version
    if comfyui_version.__version__ != GENERATED_WITH:
        print(f"build_workflows.py: warning: the committed files are generated against ComfyUI {GENERATED_WITH}; "
              f"this is {comfyui_version.__version__}, whose files differ", file=sys.stderr)
    changed = write_all(h, check=args.check)
    for path in changed:
        print(("stale: " if args.check else "wrote: ") + str(path.relative_to(REPO_ROOT)))
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
