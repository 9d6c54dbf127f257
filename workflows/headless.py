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
    prompt = h.editor.prepare(load_workflow(path), checkpoint="my.safetensors", sets=["SINE_Finetune.steps=200"])
    result = h.run(prompt); h.written_files(result)
This file is the command line; the workflow rules (load_workflow, PromptEditor) are workflows/workflow_graph.py
and the in-process ComfyUI (Headless, find_comfyui) is workflows/comfy_runtime.py.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from comfy_runtime import PACK_ROOT, Headless, find_comfyui
from workflow_graph import HeadlessError, load_workflow, one_line, parse_size


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


def start_comfyui(args: argparse.Namespace) -> Headless:
    """The in-process ComfyUI the command line asks for, with the pack loaded; HeadlessError if it cannot be."""
    root = find_comfyui(args.comfyui)
    if root is None:
        where = f"--comfyui {args.comfyui}" if args.comfyui else \
            f"$COMFYUI_PATH ({os.environ.get('COMFYUI_PATH') or 'not set'}) and ~/comfy/ComfyUI"
        raise HeadlessError(f"ComfyUI not found at {where}; pass --comfyui PATH (the folder with main.py)")
    for name in ("models", "input"):
        folder = getattr(args, name)
        if folder and not Path(folder).is_dir():
            raise HeadlessError(f"--{name}: {folder} is not a folder")
    output = Path(args.output) if args.output else root / "output"
    output.mkdir(parents=True, exist_ok=True)
    try:
        h = Headless(root, models=args.models, input=args.input, output=output, temp=output / "previews",
                     cpu=True if args.cpu else None, extra_model_paths=True, progress_hook=_progress_printer())
    except HeadlessError:
        raise
    except Exception as e:  # noqa: BLE001  (ComfyUI failing to import: missing dependency, wrong Python)
        raise HeadlessError(f"could not start ComfyUI from {root}: {type(e).__name__}: {e}") from None
    if not h.pack_load_ok:
        raise HeadlessError(f"ComfyUI could not import the SINE pack from {PACK_ROOT}; run with --verbose to see "
                            "ComfyUI's import error")
    return h


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.verbose:
        logging.disable(logging.CRITICAL)  # ComfyUI logs tracebacks; errors are reported here in one line
    else:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        workflow = load_workflow(args.workflow)
        size = parse_size(args.size) if args.size else None
        h = start_comfyui(args)
        prompt = h.editor.prepare(workflow, checkpoint=args.checkpoint, image=args.image, prompt=args.prompt,
                                  size=size, steps=args.steps, seed=args.seed, sets=args.set)
        files = h.written_files(h.run(prompt, strict=True))
    except HeadlessError as e:
        return _fail(e, e.exit_code)
    except KeyboardInterrupt:  # a BaseException: Ctrl-C while ComfyUI runs a node leaves its executor
        return _fail("interrupted", 1)
    for f in files:
        print(f)
    if not files:
        print("(the workflow ran; its output nodes reported no files)")
    return 0


def _fail(message, code: int) -> int:
    sys.stderr.write(f"headless.py: error: {one_line(message)}\n")
    return code


if __name__ == "__main__":
    sys.exit(main())
