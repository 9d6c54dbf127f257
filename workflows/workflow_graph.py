"""ComfyUI workflows as data: node-definition rules, UI -> API conversion, and overrides on an API prompt.

Nothing here imports ComfyUI. Node definitions come in as `object_info(node_type) -> dict` (what ComfyUI's
/object_info endpoint serves; KeyError for an unknown type) and file folders as ComfyUI's `folder_paths` module
(only for "not found" messages), so the same rules serve the headless runner (workflows/comfy_runtime.py) and
the workflow generator (tools/build_workflows.py).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Iterable

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}  # frontend-only: never sent to the server
# Combo inputs that name a model file: input name -> folder_paths kind (for "not found" messages).
FILE_INPUTS = {"ckpt_name": "checkpoints", "control_net_name": "controlnet", "lora_name": "loras",
               "adapter_name": "loras", "vae_name": "vae", "unet_name": "diffusion_models",
               "clip_name": "text_encoders"}
NOT_SAMPLING = {"SINE_Finetune"}  # its steps/seed are training settings: --steps/--seed leave them alone
MUTED, BYPASSED = 2, 4  # LiteGraph node modes


class HeadlessError(Exception):
    """A user-facing problem; str(e) is one line. `exit_code` is what the command line exits with."""
    exit_code = 2


def one_line(text) -> str:
    return " ".join(str(text).split())


# ---- node definitions: what the frontend builds a node from -----------------------------------------------------
def spec_type(spec) -> str | list:
    """The type of an input spec: a socket type name, a widget type name, or a list (V1 combo)."""
    t = spec[0]
    return t if isinstance(t, list) else str(getattr(t, "value", t))


def spec_options(spec) -> dict:
    return spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}


def is_widget(spec) -> bool:
    t = spec_type(spec)
    return (isinstance(t, list) or t in WIDGET_TYPES) and not spec_options(spec).get("forceInput", False)


def combo_options(spec) -> list | None:
    t = spec_type(spec)
    if isinstance(t, list):
        return t
    if t == "COMBO":
        return list(spec_options(spec).get("options", []))
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


def widget_specs(info: dict) -> dict:
    """{input name: spec} of the node's widget inputs."""
    return {n: s for n, s, _ in ordered_inputs(info) if is_widget(s)}


def widget_slots(info: dict) -> list[tuple[str, str]]:
    """The node's widgets_values layout: [(input name, "value" | "control" | "upload")].

    As the frontend builds widgets: one per widget input in order; an INT with `control_after_generate` (or,
    without that key, named seed / noise_seed: the frontend's legacy rule) gets a "control after generate"
    widget ("fixed", "randomize", ...) right after it; a combo with `image_upload` gets an upload button whose
    value ("image") is saved too. Neither extra widget is sent to the server.
    """
    slots = []
    for name, spec in widget_specs(info).items():
        opts = spec_options(spec)
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


def outputs_of(info: dict) -> list[tuple[str, str]]:
    """[(name, type)] of the node's outputs."""
    types = [str(getattr(t, "value", t)) if not isinstance(t, list) else "COMBO" for t in info.get("output", [])]
    names = info.get("output_name") or types
    return list(zip(names, types))


# ---- workflow files ---------------------------------------------------------------------------------------------
def is_ui_workflow(data: dict) -> bool:
    return isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data


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


# ---- UI workflow -> API prompt ------------------------------------------------------------------------------------
def ui_to_api(ui: dict, object_info: Callable[[str], dict]) -> dict:
    """An API-format prompt from a UI workflow, as the frontend's graphToPrompt makes it (widgets -> inputs).

    Supported: Note/MarkdownNote (dropped), Reroute (followed), PrimitiveNode (its value is used), muted nodes
    (mode 2: dropped). Bypassed nodes (mode 4), groups nodes and subgraphs are not supported.
    """
    if ui.get("definitions", {}).get("subgraphs"):
        raise HeadlessError("the workflow uses subgraphs, which the headless runner does not convert; export it "
                            "with ComfyUI's 'Export (API)' and run that file")
    links = _UILinks(ui)
    prompt = {}
    for node in sorted(ui["nodes"], key=lambda n: n["id"]):
        kind = node["type"]
        if kind in VIRTUAL_NODES or node.get("mode", 0) == MUTED:
            continue
        if node.get("mode", 0) == BYPASSED:
            raise HeadlessError(f"node {node['id']} ({kind}) is bypassed; the headless runner does not convert "
                                "bypassed nodes. Un-bypass or delete it, or export the workflow as API")
        try:
            info = object_info(kind)
        except KeyError:
            raise HeadlessError(f"node {node['id']}: unknown node type '{kind}' (a custom node pack that is not "
                                "loaded here?)") from None
        inputs = {**_widget_inputs(node, info), **links.inputs_of(node)}
        title = node.get("title") or info.get("display_name") or kind
        prompt[str(node["id"])] = {"inputs": inputs, "class_type": kind, "_meta": {"title": title}}
    return prompt


def _widget_inputs(node: dict, info: dict) -> dict:
    """A UI node's widget values as API inputs ({name: value}), checked against the node's widget layout."""
    values = node.get("widgets_values", [])
    slots = widget_slots(info)
    if isinstance(values, dict):
        return {k: v for k, v in values.items() if k in {n for n, _ in slots}}
    if len(values) != len(slots):
        layout = ", ".join(n if k == "value" else f"{n}:{k}" for n, k in slots)
        raise HeadlessError(f"node {node['id']} ({node['type']}) has {len(values)} widget values but its definition "
                            f"has {len(slots)} widgets ({layout}); was it saved with another version of the node?")
    return {name: value for (name, slot_kind), value in zip(slots, values) if slot_kind == "value"}


class _UILinks:
    """The links of a UI workflow, followed through Reroute nodes to the node that really produces a value."""
    MAX_REROUTES = 100  # a chain longer than this is a Reroute loop

    def __init__(self, ui: dict):
        self.nodes = {n["id"]: n for n in ui["nodes"]}
        self.links = {}
        for link in ui.get("links") or []:
            if isinstance(link, dict):
                self.links[link["id"]] = (link["origin_id"], link["origin_slot"])
            else:
                self.links[link[0]] = (link[1], link[2])

    def source(self, link_id, target: dict):
        """(origin node, output slot) of a link into `target`; None for a dangling Reroute chain."""
        for _ in range(self.MAX_REROUTES):
            if link_id not in self.links:
                raise HeadlessError(f"node {target['id']} refers to link {link_id}, which is not in the workflow")
            origin_id, slot = self.links[link_id]
            origin = self.nodes.get(origin_id)
            if origin is None:
                raise HeadlessError(f"node {target['id']} is linked to node {origin_id}, which is not in the workflow")
            if origin["type"] != "Reroute":
                return origin, slot
            link_id = (origin.get("inputs") or [{}])[0].get("link")
            if link_id is None:
                return None
        return None

    def inputs_of(self, node: dict) -> dict:
        """The node's linked inputs as API inputs: [origin id, slot], or a PrimitiveNode's value."""
        inputs = {}
        for inp in node.get("inputs") or []:
            if inp.get("link") is None:
                continue
            found = self.source(inp["link"], node)
            if found is None or found[0].get("mode", 0) == MUTED:
                continue
            origin, slot = found
            if origin["type"] == "PrimitiveNode":
                inputs[inp["name"]] = (origin.get("widgets_values") or [None])[0]
            else:
                inputs[inp["name"]] = [str(origin["id"]), slot]
        return inputs


# ---- values -------------------------------------------------------------------------------------------------------
def coerce(spec, value, what: str):
    """`value` as the input's type; strings (from the command line) are parsed, other values are checked."""
    options = combo_options(spec)
    if options is not None:
        return _combo_choice(options, value, what)
    t = spec_type(spec)
    try:
        return _scalar(t, value)
    except ValueError:
        raise HeadlessError(f"{what} expects {t}, got {value!r}") from None


def _combo_choice(options: list, value, what: str):
    if isinstance(value, str) or any(not isinstance(o, str) for o in options):
        for o in options:  # combos of numbers: match the option whose text is VALUE
            if value == o or (isinstance(value, str) and not isinstance(o, str) and str(o) == value):
                return o
        return value  # not a choice: reported with the available ones by PromptEditor.missing_files()
    raise HeadlessError(f"{what} expects one of its choices (text), got {value!r}")


def _scalar(t: str, value):
    """`value` as an INT / FLOAT / BOOLEAN / STRING input (ValueError if it is not one); other types unchanged."""
    if t == "INT":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise ValueError
        return int(value, 10) if isinstance(value, str) else value
    if t == "FLOAT":
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
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
    if t == "STRING" and not isinstance(value, str):
        raise ValueError
    return value


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


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and not isinstance(value[1], bool)


def id_key(node_id: str):
    """Sort key of node ids: numeric ids in number order, then the others by name."""
    return (0, int(node_id), "") if str(node_id).isdigit() else (1, 0, str(node_id))


def _listing(options: list, limit: int = 12) -> str:
    if not options:
        return "none"
    shown = ", ".join(str(o) for o in options[:limit])
    return shown + (f", ... ({len(options) - limit} more)" if len(options) > limit else "")


# ---- overrides on an API prompt -----------------------------------------------------------------------------------
class PromptEditor:
    """Turns a workflow (either format) into the API prompt to run: overrides applied, every file name checked.

    object_info: node definitions (KeyError for a type ComfyUI does not have). folders: ComfyUI's folder_paths
    module, for the "not found in <folder>" messages.
    """

    def __init__(self, object_info: Callable[[str], dict], folders):
        self.object_info = object_info
        self.folders = folders

    def to_api(self, workflow: dict) -> dict:
        """API prompt from either format (a copy; the input is not modified)."""
        if is_ui_workflow(workflow):
            return ui_to_api(workflow, self.object_info)
        return json.loads(json.dumps(workflow))

    def prepare(self, workflow: dict, *, checkpoint: str | None = None, image: str | None = None,
                prompt: str | None = None, size: tuple[int, int] | str | None = None, steps: int | None = None,
                seed: int | None = None, sets: Iterable = ()) -> dict:
        """API prompt with the overrides applied and every file name checked (HeadlessError if something is off).

        The overrides are applied in the order of the command line's help. `sets`: "NODE.INPUT=VALUE" strings
        (VALUE converted to the input's type) or (node, input, value) tuples.
        """
        api = self.to_api(workflow)
        self._check_types(api)
        if checkpoint is not None:
            self._set_all(api, "--checkpoint", lambda n: "ckpt_name" in self._widgets(n), "ckpt_name", checkpoint)
        if image is not None:
            self._set_image(api, image)
        if prompt is not None:
            self._set_prompt(api, prompt)
        if size is not None:
            self._set_size(api, parse_size(size) if isinstance(size, str) else size)
        if steps is not None:
            self._set_all(api, "--steps", lambda n: n["class_type"] not in NOT_SAMPLING and
                          "steps" in self._widgets(n), "steps", steps)
        if seed is not None:
            self._set_seed(api, seed)
        for item in sets:
            node_ref, input_name, value = parse_set(item) if isinstance(item, str) else item
            for nid in self._find_nodes(api, str(node_ref)):
                self._assign(api, nid, input_name, value, what=f"--set {node_ref}.{input_name}")
        problems = self.missing_files(api)
        if problems:
            raise HeadlessError("; ".join(problems))
        return api

    def _check_types(self, api: dict):
        for node_id, node in api.items():
            try:
                self.object_info(node.get("class_type"))
            except KeyError:
                raise HeadlessError(f"node {node_id}: unknown node type '{node.get('class_type')}' (a custom node "
                                    "pack that is not loaded here?)") from None

    def _set_image(self, api: dict, image: str):
        loaders = sorted((nid for nid, n in api.items() if n["class_type"] == "LoadImage"), key=id_key)
        if not loaders:
            raise HeadlessError("--image: the workflow has no Load Image node")
        self._assign(api, loaders[0], "image", image)

    def _set_prompt(self, api: dict, text: str):
        targets = self._positive_text_nodes(api)
        if not targets:
            raise HeadlessError("--prompt: no CLIP Text Encode feeds a sampler's positive input; use "
                                "--set NODE.text=...")
        for nid in targets:
            self._assign(api, nid, "text", text)

    def _set_size(self, api: dict, size: tuple[int, int]):
        for name, value in zip(("width", "height"), size):
            self._set_all(api, "--size", lambda n: "EmptyLatent" in n["class_type"] and
                          {"width", "height"} <= set(self._widgets(n)), name, value)

    def _set_seed(self, api: dict, seed: int):
        found = False
        for name in ("seed", "noise_seed"):
            found |= self._set_all(api, "--seed", lambda n, name=name: n["class_type"] not in NOT_SAMPLING
                                   and name in self._widgets(n), name, seed, required=False)
        if not found:
            raise HeadlessError("--seed: the workflow has no sampling seed input")

    def _widgets(self, node: dict) -> dict:
        return widget_specs(self.object_info(node["class_type"]))

    @staticmethod
    def _title(nid: str, node: dict) -> str:
        return f"node {nid} ({node.get('_meta', {}).get('title') or node['class_type']})"

    def _set_all(self, api, flag, match, input_name, value, required=True) -> bool:
        hits = [nid for nid, n in api.items() if match(n)]
        if not hits and required:
            raise HeadlessError(f"{flag}: the workflow has no node with a '{input_name}' input it applies to")
        for nid in hits:
            self._assign(api, nid, input_name, value, what=flag)
        return bool(hits)

    def _find_nodes(self, api: dict, ref: str) -> list[str]:
        if ref in api:
            return [ref]
        for matches in (lambda n: n.get("_meta", {}).get("title") == ref, lambda n: n["class_type"] == ref):
            found = [nid for nid, n in api.items() if matches(n)]
            if found:
                return found
        known = ", ".join(f"{nid}={n.get('_meta', {}).get('title') or n['class_type']} ({n['class_type']})"
                          for nid, n in sorted(api.items(), key=lambda kv: id_key(kv[0])))
        raise HeadlessError(f"--set: no node '{ref}' in the workflow (give a node id, title or type; nodes: {known})")

    def _assign(self, api, nid, input_name, value, what=None):
        node = api[nid]
        what = what or f"{input_name}"
        specs = {n: s for n, s, _ in ordered_inputs(self.object_info(node["class_type"]))}
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
        """The CLIP Text Encode nodes that a final consumer's `positive` input comes from (through pass-throughs)."""
        found = []
        for node in api.values():
            link = node.get("inputs", {}).get("positive")
            if node["class_type"] == "CLIPTextEncode" or not is_link(link):
                continue
            if any(t == "CONDITIONING" for _, t in outputs_of(self.object_info(node["class_type"]))):
                continue  # a pass-through (Apply ControlNet, ...): only follow it from a final consumer
            origin = self._text_encoder_behind(api, link)
            if origin is not None and origin not in found:
                found.append(origin)
        return found

    @staticmethod
    def _text_encoder_behind(api: dict, link) -> str | None:
        for _ in range(32):  # a conditioning chain longer than this is a loop
            src = api.get(str(link[0]))
            if src is None:
                return None
            if src["class_type"] == "CLIPTextEncode":
                return str(link[0])
            ins = src.get("inputs", {})
            nxt = ins.get("positive") if link[1] == 0 else None
            if not is_link(nxt):
                nxt = ins.get("conditioning")
            if not is_link(nxt):
                return None
            link = nxt
        return None

    def missing_files(self, api: dict) -> list[str]:
        """One message per combo input whose value is not an available choice (model and image files above all)."""
        problems = []
        first_image = next((nid for nid in sorted(api, key=id_key) if api[nid]["class_type"] == "LoadImage"), None)
        for nid in sorted(api, key=id_key):
            node = api[nid]
            specs = self._widgets(node)
            for name, value in node.get("inputs", {}).items():
                if name not in specs or is_link(value):
                    continue
                options = combo_options(specs[name])
                if options is not None and value not in options:
                    problems.append(self._not_a_choice(nid, node, name, value, options, nid == first_image))
        return problems

    def _not_a_choice(self, nid, node, name, value, options, first_image: bool) -> str:
        listing = _listing(options)
        if node["class_type"] == "LoadImage" and name == "image":
            where = f"the input folder {self.folders.get_input_directory()}"
            hint = "use --image NAME or --input DIR" if first_image else f"use --set {nid}.image=NAME or --input DIR"
        elif name in FILE_INPUTS:
            kind = FILE_INPUTS[name]
            where = f"the {kind} folders ({', '.join(self.folders.get_folder_paths(kind))})"
            hint = "use --checkpoint NAME or --models DIR" if kind == "checkpoints" else \
                f"use --set {nid}.{name}=NAME or --models DIR"
        else:
            return f"{self._title(nid, node)} input '{name}': {value!r} is not one of: {listing}"
        return f"{self._title(nid, node)} input '{name}': {value!r} not found in {where}; available: {listing} ({hint})"
