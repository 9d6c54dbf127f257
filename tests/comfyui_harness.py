"""Real ComfyUI, in process: find it, start it headless, load this pack as a custom node, run workflows.

Nothing here imitates ComfyUI: workflows go through ComfyUI's own `validate_prompt` and `PromptExecutor`,
and the pack is loaded by ComfyUI's own `init_extra_nodes` from a custom_nodes folder. The only
stand-ins are (1) a minimal message sink in place of the aiohttp PromptServer (the executor only calls
`send_sync` and reads `client_id` / `last_node_id` on it) and (2) an import-only torchvision package,
used only when no torchvision that works with the installed torch exists (see tests/torchvision_standin).
"""
from __future__ import annotations

import asyncio
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "sine_edit"  # the folder name a user's clone gets under custom_nodes/

SKIP_LINE = ("ComfyUI tier skipped: no ComfyUI at $COMFYUI_PATH or ~/comfy/ComfyUI. To enable it, put a ComfyUI "
             "checkout there (or set COMFYUI_PATH) and rerun `bash tests/run.sh`.")


def find_comfyui() -> Path | None:
    """$COMFYUI_PATH first, then ~/comfy/ComfyUI (comfy-cli's default install place)."""
    candidates = [os.environ.get("COMFYUI_PATH"), os.path.expanduser("~/comfy/ComfyUI")]
    for c in candidates:
        if c and (Path(c) / "comfy" / "model_management.py").is_file():
            return Path(c).resolve()
    return None


class WorkflowError(AssertionError):
    """ComfyUI refused (validation) or failed (execution) a workflow; the message is ComfyUI's own text."""


class MessageSink:
    """Receives what ComfyUI's executor would send to the browser; keeps it for assertions."""

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


class ComfySession:
    """One headless ComfyUI per test process (ComfyUI keeps global state; it cannot be started twice)."""

    def __init__(self, comfy_root: Path, work_dir: Path):
        self.root = comfy_root
        self.work = work_dir
        self.progress: list[tuple[int, int, str | None]] = []   # (value, total, node id) from comfy.utils.ProgressBar
        self.interrupt_at: int | None = None  # press ComfyUI's cancel when a progress bar reaches this value
        self._start()

    def _start(self):
        import importlib.util
        import torch

        sys.path.insert(0, str(self.root))
        if importlib.util.find_spec("torchvision") is None:
            sys.path.append(str(Path(__file__).parent / "torchvision_standin"))
        from comfy.cli_args import args
        args.cpu = not torch.cuda.is_available()
        args.disable_api_nodes = True
        import utils.extra_config  # noqa: F401  (before `nodes`: nodes.py puts ComfyUI's utils in the way)
        import folder_paths

        for sub in ("input", "output", "temp", "custom_nodes", "models/checkpoints", "models/controlnet",
                    "models/loras"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        link = self.work / "custom_nodes" / PACK_DIR_NAME
        if not link.exists():
            link.symlink_to(REPO_ROOT, target_is_directory=True)
        folder_paths.models_dir = str(self.work / "models")  # where packs put their own model folders
        folder_paths.set_input_directory(str(self.work / "input"))
        folder_paths.set_output_directory(str(self.work / "output"))
        folder_paths.set_temp_directory(str(self.work / "temp"))
        folder_paths.folder_names_and_paths["custom_nodes"] = ([str(self.work / "custom_nodes")], set())
        for kind in ("checkpoints", "controlnet", "loras"):
            folder_paths.add_model_folder_path(kind, str(self.work / "models" / kind), is_default=True)

        import nodes
        import execution
        import comfy.utils
        import comfy.model_management

        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))

        def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
            if self.interrupt_at is not None and value >= self.interrupt_at:
                self.interrupt_at = None
                comfy.model_management.interrupt_current_processing(True)
            comfy.model_management.throw_exception_if_processing_interrupted()
            self.progress.append((value, total, node_id or self.sink.last_node_id))

        comfy.utils.set_progress_bar_global_hook(progress_hook)
        self.nodes = nodes
        self.execution = execution
        self.folder_paths = folder_paths
        self.sink = MessageSink()
        self.executor = execution.PromptExecutor(self.sink)

    @property
    def pack_load_ok(self) -> bool:
        """Whether ComfyUI's loader imported the pack (it logs and carries on when an import fails)."""
        return str(self.work / "custom_nodes" / PACK_DIR_NAME) in self.nodes.LOADED_MODULE_DIRS.values() or \
            PACK_DIR_NAME in self.nodes.LOADED_MODULE_DIRS

    def node_ids(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.nodes.NODE_CLASS_MAPPINGS if k.startswith(prefix))

    def object_info(self, node_id: str) -> dict:
        """The node definition exactly as the /object_info endpoint serves it to the frontend."""
        cls = self.nodes.NODE_CLASS_MAPPINGS[node_id]
        return cls.GET_NODE_INFO_V1() if hasattr(cls, "GET_NODE_INFO_V1") else {"input": cls.INPUT_TYPES()}

    def validate(self, prompt: dict) -> None:
        valid = asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        if not valid[0]:
            raise WorkflowError(f"ComfyUI validation failed: {valid[1]}\nnode errors: {valid[3]}")

    def node_output(self, node_id: str, index: int = 0):
        """The Python object a node of the last run produced on output `index` (from the executor's cache)."""
        return self.executor.caches.outputs.get(node_id)[index][0]

    def run(self, prompt: dict) -> RunResult:
        """Validate then execute an API-format workflow; raises WorkflowError with ComfyUI's error text."""
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0]:
            raise WorkflowError(f"ComfyUI validation failed: {valid[1]}\nnode errors: {valid[3]}")
        self.sink.messages.clear()
        self.progress.clear()
        self.sink.last_prompt_id = prompt_id
        self.executor.execute(prompt, prompt_id, {}, valid[2])
        result = RunResult(outputs=self.executor.history_result["outputs"], messages=list(self.sink.messages))
        for event, data in self.executor.status_messages:
            if event == "execution_cached":
                result.cached = list(data["nodes"])
        if not self.executor.success:
            err = [(e, d) for e, d in self.executor.status_messages if e in ("execution_error", "execution_interrupted")]
            event, data = err[-1] if err else ("execution_failed", self.executor.status_messages)
            raise WorkflowError(f"ComfyUI {event}: {data}")
        return result

    def output_path(self, image_entry: dict) -> Path:
        base = Path(self.folder_paths.get_directory_by_type(image_entry["type"]))
        return base / image_entry.get("subfolder", "") / image_entry["filename"]

