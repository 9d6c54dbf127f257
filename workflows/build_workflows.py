#!/usr/bin/env python3
"""Writes the pack's example workflows from ONE definition each, using ComfyUI's LIVE node definitions.

    python workflows/build_workflows.py [--comfyui PATH] [--check]

For every workflow below it writes
  workflows/<name>.json      the UI (drag-and-drop) format ComfyUI's template browser lists for this pack,
  workflows/api/<name>.json  the API-format twin (ComfyUI's "Export (API)"; for workflows/headless.py or /prompt),
  workflows/<name>.jpg       a thumbnail: a drawing of the graph (the template browser shows it).
Widget order, which inputs are sockets and which are widgets, output names and unset widget defaults all come
from the node definitions of the ComfyUI this runs against (headless.widget_slots has the frontend's rules), so
a node whose inputs change makes the generated files change; tests/comfyui/test_workflows.py checks that the
committed files are what this script generates. --check only compares and exits 1 when a file is stale.
"""
from __future__ import annotations

import json
import sys
import textwrap
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))
import headless  # noqa: E402

CHECKPOINT = "v1-5-pruned-emaonly.safetensors"
CONTROLNET = "control_v11p_sd15_canny.pth"
IMAGE = "example.png"  # ComfyUI ships input/example.png: the workflows load without a missing-file error
EDIT = "photo of a dog wearing a superhero cape"


@dataclass
class N:
    """One node: `inputs` in API form, links as (node key, output index) tuples; unset widgets get defaults."""
    key: str
    type: str
    inputs: dict
    col: int
    title: str | None = None


@dataclass
class Workflow:
    name: str
    title: str
    nodes: list[N]
    note: str
    note_col: int = 0
    extra: dict = field(default_factory=dict)


# ---- the workflows --------------------------------------------------------------------------------------------------
def _load(col: int = 1) -> list[N]:
    return [N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, col),
            N("image", "LoadImage", {"image": IMAGE}, col, "Image to edit")]


def _finetune(key="finetune", image="image", prompt="photo of a sks dog", col=2, title=None, steps=400,
              patch=None) -> N:
    inputs = {"model": ("ckpt", 0), "clip": ("ckpt", 1), "vae": ("ckpt", 2), "image": (image, 0),
              "source_prompt": prompt, "preset": "custom", "steps": steps, "learning_rate": 1e-4, "seed": 0,
              "method": "lora", "lora_rank": 16, "lora_alpha": 16.0, "layers": "attention", "text_encoder": "off"}
    if patch:
        inputs["patch_config"] = (patch, 0)
    return N(key, "SINE_Finetune", inputs, col, title)


def _prompts(col: int, edit: str = EDIT) -> list[N]:
    return [N("pos", "CLIPTextEncode", {"text": edit, "clip": ("ckpt", 1)}, col, "Edit prompt (base CLIP)"),
            N("neg", "CLIPTextEncode", {"text": "", "clip": ("ckpt", 1)}, col, "Negative prompt (base CLIP)")]


def _sampler(col: int, positive=("pos", 0), negative=("neg", 0)) -> N:
    return N("sample", "SINE_GuidedSampler", {
        "model": ("ckpt", 0), "seed": 0, "steps": 50, "cfg": 7.5, "sampler_name": "ddim",
        "scheduler": "ddim_uniform", "positive": positive, "negative": negative, "latent_image": ("latent", 0),
        "denoise": 1.0, "sine_adapter": ("finetune", 3), "source_conditioning": ("finetune", 2),
        "finetuned_weight": 0.3, "start_percent": 0.0, "end_percent": 0.6}, col)


def _decode_save(col: int, samples=("sample", 0), prefix="sine/edit") -> list[N]:
    return [N("decode", "VAEDecode", {"samples": samples, "vae": ("ckpt", 2)}, col),
            N("save", "SaveImage", {"images": ("decode", 0), "filename_prefix": prefix}, col + 1)]


_GUIDANCE_NOTE = """\
SINE Guided Sampler (step 2)
- model = the BASE model from Load Checkpoint, not SINE Finetune's model output; positive/negative = your edit \
prompt through the BASE CLIP. The fine-tuned side comes in through sine_adapter + source_conditioning.
- finetuned_weight 0.3 is the weight of the FINE-TUNED model's prediction; the base model (edit prompt) gets \
0.7 (the paper's v = 0.7). Higher keeps more of the source image, lower follows the edit more.
- start_percent 0.0 / end_percent 0.6 = the guidance window in noise-level percent: end 0.6 is the paper's \
K = 400 of 1000 timesteps (the fine-tuned model steers the first, noisy 60%; later steps are plain CFG). It \
does not depend on sampler, scheduler or step count. Raise end_percent to keep more source detail.
- steps 50, ddim + ddim_uniform, cfg 7.5: close to the paper (DDIM 100)."""

_TUNE_NOTE = """\
What to tune
- The edit ignores the prompt: lower finetuned_weight (0.2) or end_percent (0.5).
- The subject changes identity: raise finetuned_weight (0.4) or end_percent (0.7), or train more steps.
- The loss curve should fall and flatten; if it explodes, lower learning_rate.
- Seeds are 'fixed'. Changing SINE Finetune's seed (or any of its inputs) retrains; changing only the prompt, \
weight, window or sampler re-samples in seconds."""

_FINETUNE_NOTE = """\
SINE Finetune (step 1; runs once per image, then cached in memory and in models/sine_cache)
- source_prompt 'photo of a sks dog': 'sks' is a rare word the model binds to THIS image; replace 'dog' with \
what your image shows ('painting of a sks castle' for a painting).
- preset 'custom' uses the inputs shown, which are the LoRA defaults: rank 16 on attention layers, lr 1e-4, \
400 steps, text encoder off (fits a consumer GPU, minutes). 'paper' = the paper's full fine-tune of UNet + text \
encoder (lr 1e-6, 800 steps, fp32; about 20 GB VRAM)."""


def wf_finetune_and_edit() -> Workflow:
    nodes = _load() + [
        _finetune(),
        N("loss", "PreviewImage", {"images": ("finetune", 4)}, 2, "Loss curve"),
        *_prompts(3),
        N("latent", "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, 3),
        _sampler(4),
        *_decode_save(5),
    ]
    note = ("SINE: edit ONE image with words (Zhang et al., CVPR 2023)\n\n"
            "Load your image, write what should change in the edit prompt, queue.\n\n"
            f"{_FINETUNE_NOTE}\n\n{_GUIDANCE_NOTE}\n- Empty Latent Image: any size (multiple of 8). For sizes or "
            f"aspect ratios far from the training square, use patch-based fine-tuning (the "
            f"sine_patch_edit_resolution workflow).\n\n{_TUNE_NOTE}")
    return Workflow("sine_finetune_and_edit", "SINE: fine-tune on one image, then edit it with a prompt",
                    nodes, note)


def wf_patch_edit_resolution() -> Workflow:
    nodes = _load() + [
        N("patch", "SINE_PatchResolutionConfig", {}, 1),
        _finetune(steps=1000, patch="patch"),
        N("loss", "PreviewImage", {"images": ("finetune", 4)}, 2, "Loss curve"),
        *_prompts(3),
        N("latent", "EmptyLatentImage", {"width": 768, "height": 512, "batch_size": 1}, 3,
          "Output size (any aspect ratio)"),
        _sampler(4),
        *_decode_save(5, prefix="sine/edit_768x512"),
    ]
    note = ("SINE with patch-based fine-tuning: render the edit at another size / aspect ratio (here 768x512)\n\n"
            "SINE Patch Resolution Config turns SINE Finetune into patch-based training: it stretches the image to "
            "a working canvas (working_size 0 = 1024 for SD1.5, as the paper), trains on random crops of it "
            "resized to train_resolution (0 = 512), and adds a fixed positional grid (grid_size 128 cells, the "
            "paper's) after the UNet's first conv, so the model learns WHERE each crop lies. At sampling the whole "
            "grid is stretched over the latent: any width x height shows the whole image.\n"
            "- min/max_crop_frac 0.1-1.0: crop sizes (small crops teach detail, large ones layout).\n"
            "- crop_bank 32: distinct crops encoded once before training (more = more variety, longer set-up).\n"
            "- interpolation: bilinear for photos, nearest for paintings.\n"
            "- Patch training wants more steps than whole-image training: 1000 here (LoRA); the paper trains "
            "10,000 for full fine-tunes. Raise steps if the output loses detail.\n\n"
            f"{_FINETUNE_NOTE}\n\n{_GUIDANCE_NOTE}\n\n{_TUNE_NOTE}")
    return Workflow("sine_patch_edit_resolution", "SINE: patch-based fine-tune, edit at 768x512", nodes, note)


def wf_edit_controlnet() -> Workflow:
    nodes = _load() + [
        _finetune(),
        N("loss", "PreviewImage", {"images": ("finetune", 4)}, 2, "Loss curve"),
        *_prompts(3),
        N("cnet", "ControlNetLoader", {"control_net_name": CONTROLNET}, 3),
        N("hint", "LoadImage", {"image": IMAGE}, 3, "ControlNet hint (canny edges of your image)"),
        N("apply", "ControlNetApplyAdvanced", {
            "positive": ("pos", 0), "negative": ("neg", 0), "control_net": ("cnet", 0), "image": ("hint", 0),
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}, 4),
        N("latent", "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, 4),
        _sampler(5, positive=("apply", 0), negative=("apply", 1)),
        *_decode_save(6, prefix="sine/edit_controlnet"),
    ]
    note = ("SINE + ControlNet: the edit follows the structure of a control image\n\n"
            "Apply ControlNet (Advanced) goes between the edit/negative prompts and the SINE Guided Sampler, as "
            "with KSampler. The control also steers the fine-tuned model's rows (one structure for the whole mix).\n"
            "- ControlNet hint: an edge map of your image for the canny model (a Canny node from the "
            "preprocessor nodes can make it from the image). Any SD1.5 ControlNet works with its own hint type.\n"
            "- strength 1.0 / start 0 / end 1: lower strength or end_percent if the control fights the edit.\n"
            "- The hint is resized to the latent size automatically.\n\n"
            f"{_FINETUNE_NOTE}\n\n{_GUIDANCE_NOTE}\n\n{_TUNE_NOTE}")
    return Workflow("sine_edit_controlnet", "SINE edit guided by a ControlNet (canny)", nodes, note)


def wf_two_models_content_style() -> Workflow:
    nodes = [
        N("ckpt", "CheckpointLoaderSimple", {"ckpt_name": CHECKPOINT}, 1),
        N("content", "LoadImage", {"image": IMAGE}, 1, "Content image"),
        N("style", "LoadImage", {"image": IMAGE}, 1, "Style image"),
        _finetune("ft_content", "content", "photo of a sks dog", 2, "SINE Finetune (content)"),
        _finetune("ft_style", "style", "painting in sks style", 2, "SINE Finetune (style)"),
        N("add_style", "SINE_AddFinetunedModel", {
            "sine_adapter": ("ft_style", 3), "source_conditioning": ("ft_style", 2), "finetuned_weight": 0.4,
            "start_percent": 0.0, "end_percent": 0.6}, 3, "Style model (weight 0.4)"),
        *_prompts(3, "painting of a dog"),
        N("guider", "SINE_Guider", {
            "model": ("ckpt", 0), "positive": ("pos", 0), "negative": ("neg", 0), "cfg": 7.5,
            "sine_adapter": ("ft_content", 3), "source_conditioning": ("ft_content", 2), "finetuned_weight": 0.4,
            "start_percent": 0.0, "end_percent": 0.6, "extra_models": ("add_style", 0)}, 4,
          "SINE Guider (content weight 0.4)"),
        N("noise", "RandomNoise", {"noise_seed": 0}, 4),
        N("ksampler", "KSamplerSelect", {"sampler_name": "ddim"}, 4),
        N("sigmas", "BasicScheduler", {"model": ("ckpt", 0), "scheduler": "ddim_uniform", "steps": 50,
                                       "denoise": 1.0}, 4),
        N("latent", "EmptyLatentImage", {"width": 512, "height": 512, "batch_size": 1}, 4),
        N("run", "SamplerCustomAdvanced", {"noise": ("noise", 0), "guider": ("guider", 0),
                                           "sampler": ("ksampler", 0), "sigmas": ("sigmas", 0),
                                           "latent_image": ("latent", 0)}, 5),
        *_decode_save(6, samples=("run", 0), prefix="sine/content_style"),
    ]
    note = ("SINE with two fine-tuned models: content from one image, style from another (paper section 5)\n\n"
            "Each image gets its own SINE Finetune: the content image with 'photo of a sks dog', the style image "
            "with 'painting in sks style'. The SINE Guider mixes, during its window, the base model (edit prompt "
            "'painting of a dog') with BOTH fine-tuned models:\n"
            "- SINE Guider finetuned_weight 0.4 = weight of the CONTENT model (its own sine_adapter input).\n"
            "- SINE Add Fine-tuned Model finetuned_weight 0.4 = weight of the STYLE model; it reaches the guider "
            "through extra_models. Chain more Add nodes for more models.\n"
            "- The base model gets 1 - 0.4 - 0.4 = 0.2; the weights must sum to at most 1.\n"
            "- Each model has its own window (start/end_percent; end 0.6 = paper K = 400).\n"
            "- SINE Guider is a GUIDER for SamplerCustomAdvanced: any noise, sampler (ddim here) and sigmas "
            "(BasicScheduler ddim_uniform, 50 steps). model of the guider and the scheduler = the BASE model.\n\n"
            "What to tune: more style -> raise the style weight (and lower content); more content identity -> the "
            "other way round. Train both with the LoRA defaults (preset custom, 400 steps). Add a Preview Image "
            "on each loss_curve output to watch training.")
    return Workflow("sine_two_models_content_style", "SINE: content from one image, style from another", nodes, note)


WORKFLOWS: list[Callable[[], Workflow]] = [wf_finetune_and_edit, wf_patch_edit_resolution, wf_edit_controlnet,
                                           wf_two_models_content_style]


# ---- building both formats ------------------------------------------------------------------------------------------
COL_GAP, ROW_GAP, TITLE_H, SLOT_H, WIDGET_H = 70, 40, 30, 22, 24
WIDTHS = {"CLIPTextEncode": 400, "SINE_Finetune": 360, "SINE_GuidedSampler": 340, "SINE_Guider": 340,
          "SINE_AddFinetunedModel": 330, "SINE_PatchResolutionConfig": 330, "SaveImage": 420, "PreviewImage": 360,
          "Note": 460}
SINE_COLOR = {"color": "#223", "bgcolor": "#335"}
NOTE_COLOR = {"color": "#432", "bgcolor": "#653"}


def _default(spec):
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    options = headless.combo_options(spec)
    if options:
        return options[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(headless.spec_type(spec))


def _node_size(kind: str, info: dict, n_widgets: int) -> list[int]:
    rows = max(len(headless.socket_inputs(info)), len(headless.outputs_of(info)), 1)
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


def build(wf: Workflow, object_info: Callable[[str], dict]) -> tuple[dict, dict]:
    """(UI workflow, API prompt) for one definition."""
    ids = {n.key: i + 1 for i, n in enumerate(wf.nodes)}
    infos = {n.key: object_info(n.type) for n in wf.nodes}
    api, values = {}, {}
    for n in wf.nodes:
        info = infos[n.key]
        ordered = headless.ordered_inputs(info)
        known = {name for name, _, _ in ordered}
        unknown = set(n.inputs) - known
        if unknown:
            raise ValueError(f"{wf.name}: {n.type} has no input(s) {sorted(unknown)}")
        inputs = {}
        for name, spec, optional in ordered:
            if name in n.inputs:
                v = n.inputs[name]
                inputs[name] = [str(ids[v[0]]), v[1]] if isinstance(v, tuple) else v
            elif headless.is_widget(spec):  # the frontend sends every widget, optional ones too
                inputs[name] = _default(spec)
            elif not optional:
                raise ValueError(f"{wf.name}: {n.key} ({n.type}) needs input '{name}'")
        values[n.key] = inputs
        api[str(ids[n.key])] = {"inputs": inputs, "class_type": n.type,
                                "_meta": {"title": n.title or info.get("display_name") or n.type}}

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
    ui_nodes, links, link_id = [], [], 0
    out_links: dict[tuple[str, int], list[int]] = {}
    ui_inputs: dict[str, list[dict]] = {}
    for n in wf.nodes:
        sockets = []
        for name, typ, optional in headless.socket_inputs(infos[n.key]):
            entry = {"name": name, "type": typ, "link": None}
            if optional:
                entry["shape"] = 7
            v = values[n.key].get(name)
            if isinstance(v, list):
                link_id += 1
                src_key = next(k for k, i in ids.items() if str(i) == v[0])
                src_type = headless.outputs_of(infos[src_key])[v[1]][1]
                links.append([link_id, int(v[0]), v[1], ids[n.key], len(sockets), src_type])
                out_links.setdefault((src_key, v[1]), []).append(link_id)
                entry["link"] = link_id
            sockets.append(entry)
        ui_inputs[n.key] = sockets

    sizes, widgets = {}, {}
    for n in wf.nodes:
        wv = []
        for name, kind in headless.widget_slots(infos[n.key]):
            if kind == "value":
                wv.append(values[n.key][name])
            elif kind == "control":
                wv.append("fixed")
            else:
                wv.append("image")
        widgets[n.key] = wv
        sizes[n.key] = _node_size(n.type, infos[n.key], len(wv))

    # layout: columns left to right, nodes stacked in each column in definition order
    note_size = _note_size(wf.note)
    cols = sorted({n.col for n in wf.nodes} | {wf.note_col})
    col_w = {c: max([sizes[n.key][0] for n in wf.nodes if n.col == c] +
                    ([note_size[0]] if c == wf.note_col else [0])) for c in cols}
    col_x, x = {}, 0
    for c in cols:
        col_x[c] = x
        x += col_w[c] + COL_GAP
    col_y = {c: 0 for c in cols}
    pos = {"__note__": [col_x[wf.note_col], col_y[wf.note_col]]}  # the note first in its column
    col_y[wf.note_col] += note_size[1] + TITLE_H + ROW_GAP
    for n in wf.nodes:
        pos[n.key] = [col_x[n.col], col_y[n.col]]
        col_y[n.col] += sizes[n.key][1] + TITLE_H + ROW_GAP

    for n in wf.nodes:
        info = infos[n.key]
        node = {"id": ids[n.key], "type": n.type, "pos": pos[n.key], "size": sizes[n.key], "flags": {},
                "order": order[n.key], "mode": 0, "inputs": ui_inputs[n.key], "outputs": []}
        for i, (name, typ) in enumerate(headless.outputs_of(info)):
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
          "last_node_id": note_id, "last_link_id": link_id, "nodes": ui_nodes, "links": links, "groups": [],
          "config": {}, "extra": {"ds": {"scale": 0.7, "offset": [60, 80]}, "sine_edit": {"title": wf.title}},
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
    """A drawing of the graph: node boxes with titles, links as curves with arrowheads (PIL only)."""
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
    x0 = min(n["pos"][0] for n in nodes.values())
    y0 = min(n["pos"][1] - TITLE_H for n in nodes.values())
    x1 = max(n["pos"][0] + n["size"][0] for n in nodes.values())
    y1 = max(n["pos"][1] + n["size"][1] for n in nodes.values())
    top, pad = 56, 18
    s = min((W - 2 * pad) / (x1 - x0), (H - top - pad) / (y1 - y0))
    ox = pad + ((W - 2 * pad) - (x1 - x0) * s) / 2
    oy = top + ((H - top - pad) - (y1 - y0) * s) / 2

    def P(x, y):
        return ox + (x - x0) * s, oy + (y - y0) * s

    def slot_y(node, i):
        return node["pos"][1] + 14 + i * SLOT_H

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


def _fit(draw, text: str, font, width: float) -> str:
    """`text` cut (with an ellipsis) to fit `width` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


# ---- command line ---------------------------------------------------------------------------------------------------
def write_all(h: headless.Headless, out_dir: Path = HERE, check: bool = False) -> list[Path]:
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
            render_thumbnail(ui, title, thumb, lambda t: h.object_info(t).get("display_name", t))
        elif not thumb.exists():
            changed.append(thumb)
    return changed


def main(argv=None) -> int:
    import argparse
    import importlib.util
    import tempfile
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, then ~/comfy/ComfyUI)")
    p.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = p.parse_args(argv)
    root = headless.find_comfyui(args.comfyui)
    if root is None:
        print("build_workflows.py: error: ComfyUI not found; pass --comfyui PATH", file=sys.stderr)
        return 2
    # Dev tool: where torchvision is missing, use the tests' import-only stand-in, as the test harness does.
    standin = [] if importlib.util.find_spec("torchvision") else [str(HERE.parent / "tests" / "torchvision_standin")]
    work = Path(tempfile.mkdtemp(prefix="sine_build_workflows_"))
    h = headless.Headless(root, models=work / "models", input=work / "input", output=work / "output",
                          temp=work / "temp", extra_sys_path=standin, cpu=True)
    if not h.pack_load_ok:
        print("build_workflows.py: error: ComfyUI could not import the pack", file=sys.stderr)
        return 2
    changed = write_all(h, check=args.check)
    for path in changed:
        print(("stale: " if args.check else "wrote: ") + str(path.relative_to(HERE.parent)))
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
