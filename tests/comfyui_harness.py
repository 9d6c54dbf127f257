"""Real ComfyUI, in process: find it, start it headless, load this pack as a custom node, run workflows.

The bootstrap itself is workflows/headless.py (the pack's headless runner: ONE way to start ComfyUI in process);
this module adapts it to the tests: a work folder per session, progress recording, cancel at a given step, and
ComfyUI's errors raised as WorkflowError. Nothing here imitates ComfyUI: workflows go through ComfyUI's own
`validate_prompt` and `PromptExecutor`, and the pack is loaded by ComfyUI's own `init_extra_nodes` from a
custom_nodes folder. The only stand-ins are (1) a minimal message sink in place of the aiohttp PromptServer (the
executor only calls `send_sync` and reads `client_id` / `last_node_id` on it) and (2) an import-only torchvision
package, used only when no torchvision that works with the installed torch exists (see tests/torchvision_standin).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT / "workflows") not in sys.path:
    sys.path.append(str(REPO_ROOT / "workflows"))

import headless  # noqa: E402
from headless import MessageSink, RunResult  # noqa: E402,F401  (re-exported: tests import them from here)

PACK_DIR_NAME = headless.PACK_DIR_NAME  # the folder name a user's clone gets under custom_nodes/

SKIP_LINE = ("ComfyUI tier skipped: no ComfyUI at $COMFYUI_PATH or ~/comfy/ComfyUI. To enable it, put a ComfyUI "
             "checkout there (or set COMFYUI_PATH) and rerun `bash tests/run.sh`.")


def find_comfyui() -> Path | None:
    """$COMFYUI_PATH first, then ~/comfy/ComfyUI (comfy-cli's default install place)."""
    return headless.find_comfyui()


class WorkflowError(AssertionError):
    """ComfyUI refused (validation) or failed (execution) a workflow; the message is ComfyUI's own text."""


class ComfySession:
    """One headless ComfyUI per test process (ComfyUI keeps global state; it cannot be started twice)."""

    def __init__(self, comfy_root: Path, work_dir: Path):
        self.root = comfy_root
        self.work = work_dir
        self.progress: list[tuple[int, int, str | None]] = []   # (value, total, node id) from comfy.utils.ProgressBar
        self.interrupt_at: int | None = None  # press ComfyUI's cancel when a progress bar reaches this value
        self._start()

    def _start(self):
        import torch

        standin = [] if importlib.util.find_spec("torchvision") is not None else \
            [str(Path(__file__).parent / "torchvision_standin")]
        for sub in ("input", "output", "temp", "custom_nodes", "models/checkpoints", "models/controlnet",
                    "models/loras"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)

        def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
            import comfy.model_management
            if self.interrupt_at is not None and value >= self.interrupt_at:
                self.interrupt_at = None
                comfy.model_management.interrupt_current_processing(True)
            comfy.model_management.throw_exception_if_processing_interrupted()
            self.progress.append((value, total, node_id or self.sink.last_node_id))

        self.headless = headless.Headless(
            self.root, models=self.work / "models", input=self.work / "input", output=self.work / "output",
            temp=self.work / "temp", custom_nodes=self.work / "custom_nodes", extra_sys_path=standin,
            cpu=not torch.cuda.is_available(), model_kinds=("checkpoints", "controlnet", "loras"),
            progress_hook=progress_hook, pack_dir=REPO_ROOT, pack_name=PACK_DIR_NAME)
        self.nodes = self.headless.nodes
        self.execution = self.headless.execution
        self.folder_paths = self.headless.folder_paths
        self.sink = self.headless.sink
        self.executor = self.headless.executor

    def pack_module(self, dotted: str):
        """A module of this pack as ComfyUI imported it (its name starts with the pack's folder path),
        e.g. "nodes.glue" or "sine_ops.adapters"."""
        root = self.nodes.NODE_CLASS_MAPPINGS["SINE_Guider"].__module__.rsplit(".nodes.", 1)[0]
        return sys.modules[f"{root}.{dotted}"]

    @property
    def pack_load_ok(self) -> bool:
        """Whether ComfyUI's loader imported the pack (it logs and carries on when an import fails)."""
        return self.headless.pack_load_ok

    def node_ids(self, prefix: str = "") -> list[str]:
        return sorted(k for k in self.nodes.NODE_CLASS_MAPPINGS if k.startswith(prefix))

    def object_info(self, node_id: str) -> dict:
        """The node definition exactly as the /object_info endpoint serves it to the frontend."""
        cls = self.nodes.NODE_CLASS_MAPPINGS[node_id]
        return cls.GET_NODE_INFO_V1() if hasattr(cls, "GET_NODE_INFO_V1") else {"input": cls.INPUT_TYPES()}

    def validate(self, prompt: dict) -> None:
        try:
            self.headless.validate(prompt)
        except headless.ValidationError as e:
            raise WorkflowError(f"ComfyUI validation failed: {e.error}\nnode errors: {e.node_errors}") from None

    def node_output(self, node_id: str, index: int = 0):
        """The Python object a node of the last run produced on output `index` (from the executor's cache)."""
        return self.executor.caches.outputs.get(node_id)[index][0]

    def run(self, prompt: dict) -> RunResult:
        """Validate then execute an API-format workflow; raises WorkflowError with ComfyUI's error text."""
        try:
            prompt_id, outputs = self.headless.validate(prompt)
        except headless.ValidationError as e:
            raise WorkflowError(f"ComfyUI validation failed: {e.error}\nnode errors: {e.node_errors}") from None
        self.progress.clear()
        try:
            return self.headless.execute(prompt, prompt_id, outputs)
        except headless.ExecutionError as e:
            raise WorkflowError(f"ComfyUI {e.event}: {e.data}") from None

    def output_path(self, image_entry: dict) -> Path:
        return self.headless.output_path(image_entry)
