#!/usr/bin/env python3
"""Run a ComfyUI workflow headless, in process, through ComfyUI's own executor, with this pack loaded.

    python workflows/headless.py WORKFLOW.json [--comfyui PATH] [--checkpoint NAME] [--image NAME]
        [--prompt TEXT] [--size WxH] [--steps N] [--seed N] [--set NODE.INPUT=VALUE ...]
        [--output DIR] [--models DIR] [--input DIR] [--cpu] [--verbose]

WORKFLOW is an API-format workflow (ComfyUI's "Export (API)") or a UI workflow (the drag-and-drop .json, e.g.
workflows/sine_finetune_and_edit.json); a UI workflow's widget values are mapped back to inputs with the live
node definitions, as the ComfyUI frontend does when it queues a prompt.

ComfyUI is found at --comfyui, else $COMFYUI_PATH, else ~/comfy/ComfyUI. It runs in this Python process (use
the Python environment ComfyUI runs in). This pack is loaded by ComfyUI's own custom-node loader from a temporary
custom_nodes folder that links to it (other custom node packs are not loaded). Models come from ComfyUI's models
folder (plus its extra_model_paths.yaml), or from --models DIR (DIR/checkpoints, DIR/controlnet, DIR/loras, ...);
images from ComfyUI's input folder or --input DIR. Outputs go to ComfyUI's output folder or --output DIR, and
Preview Image results (e.g. SINE Finetune's loss curve) to OUTPUT/previews. Written files are printed, one per line.

Overrides (applied in this order; each must match at least one node):
  --checkpoint NAME   ckpt_name of every node that has one (Load Checkpoint).
  --image NAME        image of the FIRST Load Image node (lowest node id: in the pack's workflows, the image to
                      edit). Other images: --set "TITLE.image=NAME".
  --prompt TEXT       text of the CLIP Text Encode node(s) feeding a sampler's or guider's `positive` input
                      (through Apply ControlNet and other conditioning nodes): the edit prompt.
  --size WxH          width/height of every Empty Latent Image.
  --steps N           sampling steps: every `steps` input except SINE Finetune's (training steps: --set).
  --seed N            every sampling `seed` / `noise_seed` except SINE Finetune's (its seed would retrain).
  --set NODE.INPUT=VALUE   any widget input. NODE is a node id, a node title, or a node type (then every node
                      of that type), e.g. --set SINE_Finetune.steps=200 --set "Style image.image=style.png".
                      VALUE is converted to the input's type (INT, FLOAT, BOOLEAN true/false, STRING, a combo choice).

Exit status: 0 = ran and wrote its outputs; 1 = ComfyUI failed while executing (its exception message is
printed); 2 = nothing was run: ComfyUI or the pack not found, bad workflow file or override, missing model or
image file (the available ones are listed), or ComfyUI refused the workflow (its validation message is printed).

Library use (one ComfyUI per process; ComfyUI keeps global state):
    h = Headless(find_comfyui(), models=..., input=..., output=...)
    prompt = h.prepare(load_workflow(path), checkpoint="my.safetensors", sets=["SINE_Finetune.steps=200"])
    result = h.run(prompt); h.written_files(result)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "sine_edit"  # the folder name a user's clone gets under custom_nodes/

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only: never sent to the server
# Combo inputs that name a model file: input name -> folder_paths kind (for "not found" messages).
FILE_INPUTS = {"ckpt_name": "checkpoints", "control_net_name": "controlnet", "lora_name": "loras",
               "adapter_name": "loras", "vae_name": "vae", "unet_name": "diffusion_models",
               "clip_name": "text_encoders"}
NOT_SAMPLING = {"SINE_Finetune"}  # its steps/seed are training settings: --steps/--seed leave them alone


class HeadlessError(Exception):
    """A user-facing problem; str(e) is one line. `exit_code` is what the CLI exits with."""
    exit_code = 2


class ValidationError(HeadlessError):
    """ComfyUI's validate_prompt refused the prompt; `error` and `node_errors` are ComfyUI's own data."""

    def __init__(self, error: dict, node_errors: dict):
        self.error, self.node_errors = error, node_errors
        parts = []
        for node_id, entry in (node_errors or {}).items():
            for e in entry.get("errors", []):
                parts.append(f"node {node_id} ({entry.get('class_type')}): {e.get('message')}: {e.get('details')}")
        if not parts and error:
            parts.append(f"{error.get('message')}: {error.get('details')}" if error.get("details")
                         else str(error.get("message")))
        super().__init__(_one_line("ComfyUI refused the workflow: " + "; ".join(parts)))


class ExecutionError(HeadlessError):
    """ComfyUI's executor failed or was interrupted; `event` / `data` are its status message."""
    exit_code = 1

    def __init__(self, event: str, data):
        self.event, self.data = event, data
        if event == "execution_error":
            text = (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_message', '').strip()}")
        elif event == "execution_interrupted":
            text = f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
        else:
            text = f"execution failed ({event})"
        super().__init__(_one_line("ComfyUI " + text))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path | None:
    """`explicit` if given (no fallback), else $COMFYUI_PATH, else ~/comfy/ComfyUI (comfy-cli's default place)."""
    candidates = [explicit] if explicit else [os.environ.get("COMFYUI_PATH"), os.path.expanduser("~/comfy/ComfyUI")]
    for c in candidates:
        if c and (Path(c) / "comfy" / "model_management.py").is_file():
            return Path(c).resolve()
    return None


class MessageSink:
    """Receives what ComfyUI's executor would send to the browser (stands in for the aiohttp PromptServer)."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.messages: list[tuple[str, dict]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@dataclass
class RunResult:
    outputs: dict                      # node id -> ui output dict (e.g. {"images": [...]})
    messages: list                     # (event, data) sent by the executor
    executed: set = field(default_factory=set)
    cached: list = field(default_factory=list)

    def node_events(self, event: str) -> list[dict]:
        return [d for e, d in self.messages if e == event]


# ---- node definitions: what the frontend builds a node from -----------------------------------------------------
def spec_type(spec) -> str | list:
    """The type of an input spec: a socket type name, a widget type name, or a list (V1 combo)."""
    t = spec[0]
    return t if isinstance(t, list) else str(getattr(t, "value", t))


def is_widget(spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    t = spec_type(spec)
    return (isinstance(t, list) or t in WIDGET_TYPES) and not opts.get("forceInput", False)


def combo_options(spec) -> list | None:
    t = spec_type(spec)
    if isinstance(t, list):
        return t
    if t == "COMBO":
        return list((spec[1] if len(spec) > 1 else {}).get("options", []))
    return None


def ordered_inputs(info: dict) -> list[tuple[str, tuple, bool]]:
    """[(name, spec, optional)] in the frontend's order: required then optional, each in `input_order`."""
    out = []
    order = info.get("input_order") or {}
    for section, optional in (("required", False), ("optional", True)):
        specs = info.get("input", {}).get(section, {}) or {}
        names = [n for n in order.get(section, []) if n in specs] or list(specs)
        names += [n for n in specs if n not in names]
        out += [(n, tuple(specs[n]), optional) for n in names]
    return out


def widget_slots(info: dict) -> list[tuple[str, str]]:
    """The node's widgets_values layout: [(input name, "value" | "control" | "upload")].

    As the frontend builds widgets: one per widget input in order; an INT with `control_after_generate` (or,
    without that key, named seed / noise_seed: the frontend's legacy rule) gets a "control after generate"
    widget ("fixed", "randomize", ...) right after it; a combo with `image_upload` gets an upload button whose
    value ("image") is saved too. Neither extra widget is sent to the server.
    """
    slots = []
    for name, spec, _ in ordered_inputs(info):
        if not is_widget(spec):
            continue
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        slots.append((name, "value"))
        t = spec_type(spec)
        control = opts.get("control_after_generate")
        if t == "INT" and control is None:
            control = name in ("seed", "noise_seed")
        if control and (t == "INT" or combo_options(spec) is not None):
            slots.append((name, "control"))
        if opts.get("image_upload"):
            slots.append((name, "upload"))
    return slots


def socket_inputs(info: dict) -> list[tuple[str, str, bool]]:
    """[(name, type, optional)] of the inputs that are connection sockets (not widgets), in order."""
    return [(n, spec_type(s), opt) for n, s, opt in ordered_inputs(info) if not is_widget(s)]


def outputs_of(info: dict) -> list[tuple[str, str]]:
    """[(name, type)] of the node's outputs."""
    types = [str(getattr(t, "value", t)) if not isinstance(t, list) else "COMBO" for t in info.get("output", [])]
    names = info.get("output_name") or types
    return list(zip(names, types))


# ---- UI workflow -> API prompt ------------------------------------------------------------------------------------
def is_ui_workflow(data: dict) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


def ui_to_api(ui: dict, object_info: Callable[[str], dict]) -> dict:
    """An API-format prompt from a UI workflow, as the frontend's graphToPrompt makes it (widgets -> inputs).

    Supported: Note/MarkdownNote (dropped), Reroute (followed), PrimitiveNode (its value is used), muted nodes
    (mode 2: dropped). Bypassed nodes (mode 4), groups nodes and subgraphs are not supported.
    """
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {}
    for link in ui.get("links") or []:
        if isinstance(link, dict):
            links[link["id"]] = (link["origin_id"], link["origin_slot"])
        else:
            links[link[0]] = (link[1], link[2])
    if ui.get("definitions", {}).get("subgraphs"):
        raise HeadlessError("the workflow uses subgraphs, which the headless runner does not convert; export it "
                            "with ComfyUI's 'Export (API)' and run that file")

    def source(link_id, target):
        seen = 0
        while True:
            if link_id not in links:
                raise HeadlessError(f"node {target['id']} refers to link {link_id}, which is not in the workflow")
            origin_id, slot = links[link_id]
            origin = nodes.get(origin_id)
            if origin is None:
                raise HeadlessError(f"node {target['id']} is linked to node {origin_id}, which is not in the workflow")
            if origin["type"] == "Reroute":
                link_id = (origin.get("inputs") or [{}])[0].get("link")
                seen += 1
                if link_id is None or seen > 100:
                    return None
                continue
            return origin, slot

    prompt = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise HeadlessError(f"node {node['id']} ({kind}) is bypassed; the headless runner does not convert "
                                "bypassed nodes. Un-bypass or delete it, or export the workflow as API")
        try:
            info = object_info(kind)
        except KeyError:
            raise HeadlessError(f"node {node['id']}: unknown node type '{kind}' (a custom node pack that is not "
                                "loaded here?)") from None
        inputs = {}
        values = node.get("widgets_values", [])
        slots = widget_slots(info)
        if isinstance(values, dict):
            inputs.update({k: v for k, v in values.items() if k in {n for n, _ in slots}})
        else:
            if len(values) != len(slots):
                layout = ", ".join(n if k == "value" else f"{n}:{k}" for n, k in slots)
                raise HeadlessError(f"node {node['id']} ({kind}) has {len(values)} widget values but its definition "
                                    f"has {len(slots)} widgets ({layout}); was it saved with another version of "
                                    "the node?")
            for (name, slot_kind), value in zip(slots, values):
                if slot_kind == "value":
                    inputs[name] = value
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            found = source(inp["link"], node)
            if found is None:
                continue
            origin, slot = found
            if origin.get("mode", 0) == 2:
                continue
            if origin["type"] == "PrimitiveNode":
                inputs[inp["name"]] = (origin.get("widgets_values") or [None])[0]
            else:
                inputs[inp["name"]] = [str(origin["id"]), slot]
        title = node.get("title") or info.get("display_name") or kind
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    return prompt


def load_workflow(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise HeadlessError(f"workflow file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HeadlessError(f"{path} is not a JSON workflow ({e})") from None
    if not isinstance(data, dict) or not data:
        raise HeadlessError(f"{path} is not a ComfyUI workflow (expected a JSON object)")
    if not is_ui_workflow(data) and not all(isinstance(v, dict) and "class_type" in v for v in data.values()):
        raise HeadlessError(f"{path} is neither a UI workflow (nodes + links) nor an API-format prompt")
    return data


# ---- the in-process ComfyUI --------------------------------------------------------------------------------------
_STARTED = False


class Headless:
    """ComfyUI started in this process, headless, with this pack loaded by ComfyUI's custom-node loader.

    models / input / output / temp: folders to use instead of ComfyUI's own (models: DIR/<kind> is registered as
    the default folder of every model kind, or only of `model_kinds`). custom_nodes: where the link to this pack
    is made (default: a temporary folder, removed at exit). extra_sys_path: appended to sys.path before ComfyUI is
    imported (e.g. an import-only stand-in for a missing package). cpu: None = CPU only when no CUDA/MPS/XPU
    device exists. progress_hook: comfy.utils' global progress hook (value, total, preview, prompt_id, node_id);
    default: only honours ComfyUI's cancel.
    """

    def __init__(self, comfy_root: str | os.PathLike, *, models=None, input=None, output=None, temp=None,
                 custom_nodes=None, extra_sys_path: Iterable[str] = (), cpu: bool | None = None,
                 model_kinds: Iterable[str] | None = None, extra_model_paths: bool = False,
                 progress_hook: Callable | None = None, pack_dir=PACK_ROOT, pack_name: str = PACK_DIR_NAME):
        global _STARTED
        if _STARTED:
            raise HeadlessError("ComfyUI is already started in this process (it keeps global state; start it once)")
        self.root = Path(comfy_root)
        self.pack_name = pack_name
        self._tmp_custom_nodes = None
        if custom_nodes is None:
            custom_nodes = self._tmp_custom_nodes = Path(tempfile.mkdtemp(prefix="sine_headless_nodes_"))
            import atexit
            atexit.register(self._cleanup)
        self.custom_nodes = Path(custom_nodes)

        import torch
        sys.path.insert(0, str(self.root))
        for p in extra_sys_path:
            if str(p) not in sys.path:
                sys.path.append(str(p))
        from comfy.cli_args import args
        if cpu is None:
            mps = getattr(torch.backends, "mps", None)
            xpu = getattr(torch, "xpu", None)
            cpu = not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                       or (xpu is not None and xpu.is_available()))
        args.cpu = cpu
        args.disable_api_nodes = True
        import utils.extra_config  # noqa: F401  (before `nodes`: nodes.py puts ComfyUI's utils in the way)
        import folder_paths

        if extra_model_paths:
            yaml_path = self.root / "extra_model_paths.yaml"
            if yaml_path.is_file():
                utils.extra_config.load_extra_path_config(str(yaml_path))
        if models is not None:
            models = Path(models)
            default_models = folder_paths.models_dir
            folder_paths.models_dir = str(models)  # where packs put their own model folders (sine_cache)
            if model_kinds is not None:
                for kind in model_kinds:
                    folder_paths.add_model_folder_path(kind, str(models / kind), is_default=True)
            else:
                for kind, (paths, _) in list(folder_paths.folder_names_and_paths.items()):
                    if kind == "custom_nodes":
                        continue
                    subs = [os.path.basename(p) for p in paths
                            if os.path.dirname(os.path.abspath(p)) == os.path.abspath(default_models)] or [kind]
                    for sub in reversed(subs):  # the first one ends up the default
                        folder_paths.add_model_folder_path(kind, str(models / sub), is_default=True)
        for folder, setter in ((input, folder_paths.set_input_directory),
                               (output, folder_paths.set_output_directory),
                               (temp, folder_paths.set_temp_directory)):
            if folder is not None:
                Path(folder).mkdir(parents=True, exist_ok=True)
                setter(str(folder))

        self.custom_nodes.mkdir(parents=True, exist_ok=True)
        link = self.custom_nodes / pack_name
        if not link.exists():
            try:
                link.symlink_to(Path(pack_dir), target_is_directory=True)
            except OSError as e:
                raise HeadlessError(f"cannot link the pack into {self.custom_nodes} ({e}); pass a custom_nodes "
                                    "folder that already contains it") from None
        folder_paths.folder_names_and_paths["custom_nodes"] = ([str(self.custom_nodes)], set())

        import nodes
        import execution
        import comfy.utils
        import comfy.model_management

        _STARTED = True
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))

        def default_hook(value, total, preview_image, prompt_id=None, node_id=None):
            comfy.model_management.throw_exception_if_processing_interrupted()

        comfy.utils.set_progress_bar_global_hook(progress_hook or default_hook)
        self.nodes = nodes
        self.execution = execution
        self.folder_paths = folder_paths
        self.sink = MessageSink()
        self.executor = execution.PromptExecutor(self.sink)

    def _cleanup(self):
        d = self._tmp_custom_nodes
        if d is not None and d.exists():
            link = d / self.pack_name
            if link.is_symlink():
                link.unlink()
            shutil.rmtree(d, ignore_errors=True)

    @property
    def pack_load_ok(self) -> bool:
        """Whether ComfyUI's loader imported the pack (it logs and carries on when an import fails)."""
        return str(self.custom_nodes / self.pack_name) in self.nodes.LOADED_MODULE_DIRS.values() or \
            self.pack_name in self.nodes.LOADED_MODULE_DIRS

    # ---- node definitions ----------------------------------------------------------------------------------------
    def object_info(self, node_type: str) -> dict:
        """The node definition as ComfyUI's /object_info endpoint serves it (KeyError for an unknown type)."""
        cls = self.nodes.NODE_CLASS_MAPPINGS[node_type]
        if hasattr(cls, "GET_NODE_INFO_V1"):
            return cls.GET_NODE_INFO_V1()
        types = cls.INPUT_TYPES()
        return {
            "input": types, "input_order": {k: list(v.keys()) for k, v in types.items()},
            "output": list(cls.RETURN_TYPES),
            "output_name": list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES),
            "output_is_list": list(getattr(cls, "OUTPUT_IS_LIST", [False] * len(cls.RETURN_TYPES))),
            "name": node_type, "display_name": self.nodes.NODE_DISPLAY_NAME_MAPPINGS.get(node_type, node_type),
            "description": getattr(cls, "DESCRIPTION", ""), "category": getattr(cls, "CATEGORY", "sd"),
            "output_node": getattr(cls, "OUTPUT_NODE", False) is True,
        }

    # ---- preparing a prompt --------------------------------------------------------------------------------------
    def to_api(self, workflow: dict) -> dict:
        """API prompt from either format (a copy; the input is not modified)."""
        if is_ui_workflow(workflow):
            return ui_to_api(workflow, self.object_info)
        return json.loads(json.dumps(workflow))

    def prepare(self, workflow: dict, *, checkpoint: str | None = None, image: str | None = None,
                prompt: str | None = None, size: tuple[int, int] | str | None = None, steps: int | None = None,
                seed: int | None = None, sets: Iterable = ()) -> dict:
        """API prompt with the overrides applied and every file name checked (HeadlessError if something is off).

        `sets`: "NODE.INPUT=VALUE" strings (VALUE converted to the input's type) or (node, input, value) tuples.
        """
        api = self.to_api(workflow)
        for node_id, node in api.items():
            if node.get("class_type") not in self.nodes.NODE_CLASS_MAPPINGS:
                raise HeadlessError(f"node {node_id}: unknown node type '{node.get('class_type')}' (a custom node "
                                    "pack that is not loaded here?)")
        if checkpoint is not None:
            self._set_all(api, "--checkpoint", lambda nid, n: "ckpt_name" in self._widget_specs(n), "ckpt_name",
                          checkpoint)
        if image is not None:
            loaders = sorted((nid for nid, n in api.items() if n["class_type"] == "LoadImage"), key=_id_key)
            if not loaders:
                raise HeadlessError("--image: the workflow has no Load Image node")
            self._assign(api, loaders[0], "image", image)
        if prompt is not None:
            targets = self._positive_text_nodes(api)
            if not targets:
                raise HeadlessError("--prompt: no CLIP Text Encode feeds a sampler's positive input; use "
                                    "--set NODE.text=...")
            for nid in targets:
                self._assign(api, nid, "text", prompt)
        if size is not None:
            w, h = parse_size(size) if isinstance(size, str) else size
            for name, value in (("width", w), ("height", h)):
                self._set_all(api, "--size", lambda nid, n: "EmptyLatent" in n["class_type"] and
                              {"width", "height"} <= set(self._widget_specs(n)), name, value)
        if steps is not None:
            self._set_all(api, "--steps", lambda nid, n: n["class_type"] not in NOT_SAMPLING and
                          "steps" in self._widget_specs(n), "steps", steps)
        if seed is not None:
            found = False
            for name in ("seed", "noise_seed"):
                found |= self._set_all(api, "--seed", lambda nid, n, name=name: n["class_type"] not in NOT_SAMPLING
                                       and name in self._widget_specs(n), name, seed, required=False)
            if not found:
                raise HeadlessError("--seed: the workflow has no sampling seed input")
        for item in sets:
            if isinstance(item, str):
                node_ref, input_name, value = parse_set(item)
            else:
                node_ref, input_name, value = item
            targets = self._find_nodes(api, str(node_ref))
            for nid in targets:
                self._assign(api, nid, input_name, value, what=f"--set {node_ref}.{input_name}")
        problems = self.missing_files(api)
        if problems:
            raise HeadlessError("; ".join(problems))
        return api

    def _widget_specs(self, node: dict) -> dict:
        info = self.object_info(node["class_type"])
        return {n: s for n, s, _ in ordered_inputs(info) if is_widget(s)}

    def _title(self, nid: str, node: dict) -> str:
        return f"node {nid} ({node.get('_meta', {}).get('title') or node['class_type']})"

    def _set_all(self, api, flag, match, input_name, value, required=True) -> bool:
        hits = [nid for nid, n in api.items() if match(nid, n)]
        if not hits and required:
            raise HeadlessError(f"{flag}: the workflow has no node with a '{input_name}' input it applies to")
        for nid in hits:
            self._assign(api, nid, input_name, value, what=flag)
        return bool(hits)

    def _find_nodes(self, api: dict, ref: str) -> list[str]:
        if ref in api:
            return [ref]
        by_title = [nid for nid, n in api.items() if n.get("_meta", {}).get("title") == ref]
        if by_title:
            return by_title
        by_type = [nid for nid, n in api.items() if n["class_type"] == ref]
        if by_type:
            return by_type
        known = ", ".join(f"{nid}={n.get('_meta', {}).get('title') or n['class_type']} ({n['class_type']})"
                          for nid, n in sorted(api.items(), key=lambda kv: _id_key(kv[0])))
        raise HeadlessError(f"--set: no node '{ref}' in the workflow (give a node id, title or type; nodes: {known})")

    def _assign(self, api, nid, input_name, value, what=None):
        node = api[nid]
        what = what or f"{input_name}"
        info = self.object_info(node["class_type"])
        specs = {n: s for n, s, _ in ordered_inputs(info)}
        if input_name not in specs:
            raise HeadlessError(f"{what}: {self._title(nid, node)} has no input '{input_name}' "
                                f"(its inputs: {', '.join(specs) or 'none'})")
        spec = specs[input_name]
        if not is_widget(spec):
            raise HeadlessError(f"{what}: input '{input_name}' of {self._title(nid, node)} is a {spec_type(spec)} "
                                "connection, not a value")
        node.setdefault("inputs", {})[input_name] = coerce(spec, value, f"{what}: {self._title(nid, node)} input "
                                                                          f"'{input_name}'")

    def _positive_text_nodes(self, api: dict) -> list[str]:
        found = []
        for nid, node in api.items():
            if node["class_type"] == "CLIPTextEncode":
                continue
            link = node.get("inputs", {}).get("positive")
            if not _is_link(link):
                continue
            consumer_outputs = outputs_of(self.object_info(node["class_type"]))
            if any(t == "CONDITIONING" for _, t in consumer_outputs):
                continue  # a pass-through (Apply ControlNet, ...): only follow it from a final consumer
            for _ in range(32):
                src = api.get(str(link[0]))
                if src is None:
                    break
                if src["class_type"] == "CLIPTextEncode":
                    if str(link[0]) not in found:
                        found.append(str(link[0]))
                    break
                ins = src.get("inputs", {})
                nxt = ins.get("positive") if link[1] == 0 else None
                if not _is_link(nxt):
                    nxt = ins.get("conditioning")
                if not _is_link(nxt):
                    break
                link = nxt
        return found

    def missing_files(self, api: dict) -> list[str]:
        """One message per combo input whose value is not an available choice (model and image files above all)."""
        problems = []
        first_image = next((nid for nid in sorted(api, key=_id_key) if api[nid]["class_type"] == "LoadImage"), None)
        for nid in sorted(api, key=_id_key):
            node = api[nid]
            specs = self._widget_specs(node)
            for name, value in node.get("inputs", {}).items():
                if name not in specs or _is_link(value):
                    continue
                options = combo_options(specs[name])
                if options is None or value in options:
                    continue
                listing = _listing(options)
                if node["class_type"] == "LoadImage" and name == "image":
                    where = f"the input folder {self.folder_paths.get_input_directory()}"
                    hint = "use --image NAME or --input DIR" if nid == first_image else \
                        f"use --set {nid}.image=NAME or --input DIR"
                elif name in FILE_INPUTS:
                    kind = FILE_INPUTS[name]
                    where = f"the {kind} folders ({', '.join(self.folder_paths.get_folder_paths(kind))})"
                    hint = "use --checkpoint NAME or --models DIR" if kind == "checkpoints" else \
                        f"use --set {nid}.{name}=NAME or --models DIR"
                else:
                    problems.append(f"{self._title(nid, node)} input '{name}': {value!r} is not one of: {listing}")
                    continue
                problems.append(f"{self._title(nid, node)} input '{name}': {value!r} not found in {where}; "
                                f"available: {listing} ({hint})")
        return problems

    # ---- running -------------------------------------------------------------------------------------------------
    def validate(self, prompt: dict, strict: bool = False) -> tuple[str, list]:
        """(prompt id, output node ids) from ComfyUI's validate_prompt; ValidationError with its message if refused.

        strict: also refuse when ComfyUI would run only some outputs (others failed validation).
        """
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0] or (strict and valid[3]):
            raise ValidationError(valid[1], valid[3])
        return prompt_id, valid[2]

    def execute(self, prompt: dict, prompt_id: str, outputs: list) -> RunResult:
        """Run a validated prompt through ComfyUI's PromptExecutor; ExecutionError with its message on failure."""
        self.sink.messages.clear()
        self.sink.last_prompt_id = prompt_id
        self.executor.execute(prompt, prompt_id, {}, outputs)
        result = RunResult(outputs=self.executor.history_result["outputs"], messages=list(self.sink.messages))
        for event, data in self.executor.status_messages:
            if event == "execution_cached":
                result.cached = list(data["nodes"])
        if not self.executor.success:
            err = [(e, d) for e, d in self.executor.status_messages
                   if e in ("execution_error", "execution_interrupted")]
            event, data = err[-1] if err else ("execution_failed", self.executor.status_messages)
            raise ExecutionError(event, data)
        return result

    def run(self, prompt: dict, strict: bool = False) -> RunResult:
        prompt_id, outputs = self.validate(prompt, strict)
        return self.execute(prompt, prompt_id, outputs)

    def run_workflow(self, workflow: dict | str | os.PathLike, strict: bool = True, **overrides) -> RunResult:
        """load (path) -> prepare(**overrides) -> run."""
        data = workflow if isinstance(workflow, dict) else load_workflow(workflow)
        return self.run(self.prepare(data, **overrides), strict=strict)

    def output_path(self, image_entry: dict) -> Path:
        base = Path(self.folder_paths.get_directory_by_type(image_entry["type"]))
        return base / image_entry.get("subfolder", "") / image_entry["filename"]

    def written_files(self, result: RunResult) -> list[Path]:
        """Every file the run's output nodes reported (images, and paths a node returned as text, e.g. adapters)."""
        files = []
        for node_id in sorted(result.outputs, key=_id_key):
            out = result.outputs[node_id]
            for key, entries in out.items():
                for e in entries or []:
                    if isinstance(e, dict) and "filename" in e and "type" in e:
                        files.append(self.output_path(e))
                    elif key == "text" and isinstance(e, str) and os.path.isfile(e):
                        files.append(Path(e))
        return files


def _is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool)


def _id_key(node_id: str):
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def _listing(options: list, limit: int = 12) -> str:
    if not options:
        return "none"
    shown = ", ".join(str(o) for o in options[:limit])
    return shown + (f", ... ({len(options) - limit} more)" if len(options) > limit else "")


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise HeadlessError(f"--size: '{text}' is not WIDTHxHEIGHT (e.g. 768x512)") from None
    if w <= 0 or h <= 0:
        raise HeadlessError(f"--size: '{text}' must be positive")
    return w, h


def parse_set(text: str) -> tuple[str, str, str]:
    left, sep, value = text.partition("=")
    node_ref, dot, input_name = left.rpartition(".")
    if not sep or not dot or not node_ref or not input_name:
        raise HeadlessError(f"--set: '{text}' is not NODE.INPUT=VALUE (e.g. SINE_Finetune.steps=200)")
    return node_ref, input_name, value


def coerce(spec, value, what: str):
    """`value` as the input's type; strings (from the command line) are parsed, other values are checked."""
    t = spec_type(spec)
    options = combo_options(spec)
    if options is not None:
        if isinstance(value, str) or any(not isinstance(o, str) for o in options):
            for o in options:  # combos of numbers: match the option whose text is VALUE
                if value == o or (isinstance(value, str) and not isinstance(o, str) and str(o) == value):
                    return o
            return value  # not a choice: reported with the available ones by missing_files()
        raise HeadlessError(f"{what} expects one of its choices (text), got {value!r}")
    try:
        if t == "INT":
            if isinstance(value, bool) or (not isinstance(value, (int, str))):
                raise ValueError
            return int(value, 10) if isinstance(value, str) else value
        if t == "FLOAT":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if t == "BOOLEAN":
            if isinstance(value, bool):
                return value
            low = str(value).strip().lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if t == "STRING":
            if not isinstance(value, str):
                raise ValueError
            return value
    except ValueError:
        raise HeadlessError(f"{what} expects {t}, got {value!r}") from None
    return value


# ---- command line -----------------------------------------------------------------------------------------------
def _progress_printer():
    """Progress hook for the command line: honours cancel, shows `node N: step/total` on a terminal."""
    tty = sys.stderr.isatty()

    def hook(value, total, preview_image, prompt_id=None, node_id=None):
        import comfy.model_management  # imported by now: hooks run only while ComfyUI executes
        comfy.model_management.throw_exception_if_processing_interrupted()
        if tty:
            sys.stderr.write(f"\r  node {node_id}: {value}/{total}" + ("\n" if value >= total else ""))
            sys.stderr.flush()
    return hook


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="headless.py", formatter_class=argparse.RawDescriptionHelpFormatter,
                                description=__doc__.split("\nLibrary use")[0])
    p.add_argument("workflow", help="workflow .json (API format or the UI drag-and-drop format)")
    p.add_argument("--comfyui", help="ComfyUI folder (default: $COMFYUI_PATH, then ~/comfy/ComfyUI)")
    p.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE",
                   help="set a widget input; NODE = node id, title or type (repeatable)")
    p.add_argument("--checkpoint", help="ckpt_name of every Load Checkpoint")
    p.add_argument("--image", help="image of the first Load Image (the image to edit)")
    p.add_argument("--prompt", help="text of the CLIP Text Encode feeding the sampler's positive input")
    p.add_argument("--size", help="WIDTHxHEIGHT of every Empty Latent Image, e.g. 768x512")
    p.add_argument("--steps", type=int, help="sampling steps (not SINE Finetune's training steps)")
    p.add_argument("--seed", type=int, help="sampling seed (not SINE Finetune's seed)")
    p.add_argument("--output", help="output folder (default: ComfyUI's); previews go to OUTPUT/previews")
    p.add_argument("--models", help="models folder with checkpoints/, controlnet/, loras/, ... (default: ComfyUI's)")
    p.add_argument("--input", help="input folder Load Image reads from (default: ComfyUI's)")
    p.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU exists")
    p.add_argument("--verbose", action="store_true", help="show ComfyUI's log")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def fail(e: HeadlessError | str, code: int | None = None) -> int:
        sys.stderr.write(f"headless.py: error: {_one_line(e)}\n")
        return code if code is not None else getattr(e, "exit_code", 2)

    if not args.verbose:
        logging.disable(logging.CRITICAL)  # ComfyUI logs tracebacks; errors are reported here in one line
    else:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        workflow = load_workflow(args.workflow)
        size = parse_size(args.size) if args.size else None
        root = find_comfyui(args.comfyui)
        if root is None:
            where = f"--comfyui {args.comfyui}" if args.comfyui else \
                f"$COMFYUI_PATH ({os.environ.get('COMFYUI_PATH') or 'not set'}) and ~/comfy/ComfyUI"
            return fail(f"ComfyUI not found at {where}; pass --comfyui PATH (the folder with main.py)")
        for name in ("models", "input"):
            folder = getattr(args, name)
            if folder and not Path(folder).is_dir():
                return fail(f"--{name}: {folder} is not a folder")
        output = Path(args.output) if args.output else None
        if output is None:
            output = root / "output"
        output.mkdir(parents=True, exist_ok=True)
        try:
            h = Headless(root, models=args.models, input=args.input, output=output, temp=output / "previews",
                         cpu=True if args.cpu else None, extra_model_paths=True, progress_hook=_progress_printer())
        except HeadlessError:
            raise
        except Exception as e:  # noqa: BLE001  (ComfyUI failing to import: missing dependency, wrong Python)
            return fail(f"could not start ComfyUI from {root}: {type(e).__name__}: {e}")
        if not h.pack_load_ok:
            return fail(f"ComfyUI could not import the SINE pack from {PACK_ROOT}; run with --verbose to see "
                        "ComfyUI's import error")
        prompt = h.prepare(workflow, checkpoint=args.checkpoint, image=args.image, prompt=args.prompt, size=size,
                           steps=args.steps, seed=args.seed, sets=args.set)
        result = h.run(prompt, strict=True)
    except HeadlessError as e:
        return fail(e)
    except KeyboardInterrupt:
        return fail("interrupted", 1)
    files = h.written_files(result)
    for f in files:
        print(f)
    if not files:
        print("(the workflow ran; its output nodes reported no files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
