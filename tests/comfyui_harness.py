"""Real ComfyUI, in process: find it, start it headless, load this pack as a custom node, run workflows.

The bootstrap and the executor driving are the pack's headless runner (workflows/comfy_runtime.py: ONE way to start
ComfyUI in process and run prompts); this module adapts it to the tests: a work folder per session, progress
recording, cancel at a given step, and ComfyUI's errors raised as WorkflowError. Nothing here imitates ComfyUI:
workflows go through ComfyUI's own `validate_prompt` and `PromptExecutor`, and the pack is loaded by ComfyUI's own
`init_extra_nodes` from a custom_nodes folder. The only stand-ins are (1) a minimal message sink in place of the
aiohttp PromptServer (the executor only calls `send_sync` and reads `client_id` / `last_node_id` on it) and (2)
import-only packages for torchvision / torchaudio / spandrel / kornia / av, used only where the real one is missing
(tools/import_standins/standin.py).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
for _folder in ("workflows", "tools"):  # the headless runner; the dev tools (generator, import stand-ins)
    if str(REPO_ROOT / _folder) not in sys.path:
        sys.path.append(str(REPO_ROOT / _folder))

import comfy_runtime  # noqa: E402
from comfy_runtime import PACK_DIR_NAME, ExecutionError, RunResult, ValidationError  # noqa: E402,F401
from import_standins import import_standin_paths  # noqa: E402,F401

SKIP_LINE = ("ComfyUI tier skipped: no ComfyUI at $COMFYUI_PATH or ~/comfy/ComfyUI. To enable it, put a ComfyUI "
             "checkout there (or set COMFYUI_PATH) and rerun `bash tests/run.sh`.")


def find_comfyui() -> Path | None:
    """$COMFYUI_PATH first, then ~/comfy/ComfyUI (comfy-cli's default install place)."""
    return comfy_runtime.find_comfyui()


def cached_outputs(executor, node_id: str):
    """The outputs (one list per output slot) of a node of the executor's last run, from its node cache."""
    # comfy_execution/caching.py @ dec8fb2b2143d0d183f4659b08ff45c243da7e31: get() is a coroutine returning
    # execution.CacheEntry(ui, outputs); @ a125cd84 (0.3.64) get() is plain and returns the outputs themselves.
    entry = comfy_runtime.resolve(executor.caches.outputs.get(node_id))
    return getattr(entry, "outputs", entry)


def cached_nodes(executor) -> list[str]:
    """Ids of the nodes whose outputs came from ComfyUI's cache in the executor's last run (its "execution_cached"
    status message; execution.py sends one per prompt, before running any node)."""
    cached: list[str] = []
    for event, data in executor.status_messages:
        if event == "execution_cached":
            cached = list(data["nodes"])
    return cached


class WorkflowError(AssertionError):
    """ComfyUI refused (validation) or failed (execution) a workflow; the message is ComfyUI's own text."""


@contextlib.contextmanager
def comfyui_errors_as_workflow_errors():
    """The runner's ValidationError / ExecutionError as WorkflowError, with ComfyUI's full data in the message."""
    try:
        yield
    except ValidationError as e:
        raise WorkflowError(f"ComfyUI validation failed: {e.error}\nnode errors: {e.node_errors}") from None
    except ExecutionError as e:
        raise WorkflowError(f"ComfyUI {e.event}: {e.data}") from None


class ComfySession:
    """One headless ComfyUI per test process (ComfyUI keeps global state; it cannot be started twice)."""

    def __init__(self, comfy_root: Path, work_dir: Path):
        self.root = comfy_root
        self.work = work_dir
        # (value, total, node id) of each progress update ComfyUI passed on. Newer ComfyUI throttles them
        # (comfy/utils.py @ b3be02d6e766a8d3743dcf99cc967118f3ec8e3e, ProgressBar: at most every 100 ms and 0.5 %):
        # only a bar's first and final updates are certain to be here.
        self.progress: list[tuple[int, int, str | None]] = []
        # (value, total, preview) of each progress update that carried a preview image (format, PIL image, size)
        self.previews: list[tuple[int, int, tuple]] = []
        # Press ComfyUI's cancel at the first update whose value reaches this (with throttling: maybe a later one,
        # at the latest the final update, which still runs inside the node).
        self.interrupt_at: int | None = None
        self._start()

    def _start(self):
        import torch

        self.standin_paths = import_standin_paths()
        for sub in ("input", "output", "temp", "models/checkpoints", "models/controlnet", "models/loras"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)

        def progress_hook(value, total, preview_image, prompt_id=None, node_id=None):
            import comfy.model_management
            if self.interrupt_at is not None and value >= self.interrupt_at:
                self.interrupt_at = None
                comfy.model_management.interrupt_current_processing(True)
            comfy.model_management.throw_exception_if_processing_interrupted()
            self.progress.append((value, total, node_id))
            if preview_image is not None:
                self.previews.append((value, total, preview_image))

        self.headless = comfy_runtime.Headless(
            self.root, models=self.work / "models", input=self.work / "input", output=self.work / "output",
            temp=self.work / "temp", extra_sys_path=self.standin_paths, cpu=not torch.cuda.is_available(),
            progress_hook=progress_hook)
        self.nodes = self.headless.nodes
        self.folder_paths = self.headless.folder_paths
        self.executor = self.headless.runner.executor

    def reset_node_cache(self) -> None:
        """Empty ComfyUI's node output cache (what the "free memory" of POST /free does: PromptExecutor.reset), so
        the next prompt runs every node again, loaders included."""
        self.headless.runner.executor.reset()

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
        return self.headless.object_info(node_id)

    def validate(self, prompt: dict) -> None:
        with comfyui_errors_as_workflow_errors():
            self.headless.runner.validate(prompt)

    def node_output(self, node_id: str, index: int = 0):
        """The Python object a node of the last run produced on output `index` (from the executor's cache)."""
        return cached_outputs(self.executor, node_id)[index][0]

    def cached_nodes(self) -> list[str]:
        """Ids of the nodes the last run took from ComfyUI's node cache instead of running them."""
        return cached_nodes(self.executor)

    def run(self, prompt: dict) -> RunResult:
        """Validate then execute an API-format workflow; raises WorkflowError with ComfyUI's error text."""
        with comfyui_errors_as_workflow_errors():
            prompt_id, outputs = self.headless.runner.validate(prompt)
            self.progress.clear()
            self.previews.clear()
            return self.headless.runner.execute(prompt, prompt_id, outputs)

    def output_path(self, image_entry: dict) -> Path:
        return self.headless.output_path(image_entry)
