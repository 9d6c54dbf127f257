"""ComfyUI started in this process, headless, with this pack loaded; prompts run through ComfyUI's own executor.

Two parts: `Headless` does what ComfyUI's main.py does before its server starts (sys.path, settings, folders, the
custom-node loader, the progress hook), and `PromptRunner` drives ComfyUI's `validate_prompt` and `PromptExecutor`.
The executor's API changed after ComfyUI 0.3.64 (a125cd84, the release the tests run); PromptRunner follows both
forms by capability, each branch naming the ComfyUI file and commit it follows. The UI/API workflow rules and
overrides are workflows/workflow_graph.py; the command line is workflows/headless.py.
"""
from __future__ import annotations

import asyncio
import atexit
import inspect
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from workflow_graph import HeadlessError, PromptEditor, id_key, one_line

PACK_ROOT = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "sine_edit"  # the folder name a user's clone gets under custom_nodes/

# ComfyUI's classic node cache, in the form newer executors take it: what main.py passes for --cache-classic
# (main.py @ 4f8cf3e29518687b5ddd3b1f6203e4240a43f813, prompt_worker: ram = ram_inactive = 0 unless RAM-pressure).
CLASSIC_CACHE_ARGS = {"lru": 0, "ram": 0, "ram_inactive": 0}


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
        super().__init__(one_line("ComfyUI refused the workflow: " + "; ".join(parts)))


class ExecutionError(HeadlessError):
    """ComfyUI's executor failed or was interrupted; `event` / `data` are its status message."""
    exit_code = 1

    def __init__(self, event: str, data):
        self.event, self.data = event, data
        if event == "execution_error":
            text = (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_message', '').strip()}")
        elif event == "execution_interrupted":
            where = f" at node {data['node_id']} ({data.get('node_type')})" if data.get("node_id") else ""
            text = "interrupted" + where
        else:
            text = f"execution failed ({event})"
        super().__init__(one_line("ComfyUI " + text))


def find_comfyui(explicit: str | os.PathLike | None = None) -> Path | None:
    """`explicit` if given (no fallback), else $COMFYUI_PATH, else ~/comfy/ComfyUI (comfy-cli's default place)."""
    candidates = [explicit] if explicit else [os.environ.get("COMFYUI_PATH"), os.path.expanduser("~/comfy/ComfyUI")]
    for c in candidates:
        if c and (Path(c) / "comfy" / "model_management.py").is_file():
            return Path(c).resolve()
    return None


class MessageSink:
    """Stands in for the aiohttp PromptServer: what ComfyUI's executor would send to the browser goes nowhere."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None

    def send_sync(self, event, data, sid=None):
        pass

    def queue_updated(self):
        pass


@dataclass
class RunResult:
    outputs: dict  # node id -> ui output dict (e.g. {"images": [...]})


# ---- ComfyUI's executor, old and new --------------------------------------------------------------------------------
def resolve(value):
    """`value`, or its result when a ComfyUI API returned a coroutine (run to completion here)."""
    return asyncio.run(value) if inspect.iscoroutine(value) else value


def make_executor(executor_class, server):
    """A PromptExecutor with ComfyUI's classic node cache, whichever constructor this ComfyUI has."""
    if "cache_args" in inspect.signature(executor_class).parameters:
        # execution.py @ cb707e9c29a8f2f1be76ebcde134cb8c69842180: PromptExecutor(server, cache_type=False,
        # cache_args=None), and execute_async reads cache_args["ram"] / ["ram_inactive"] unconditionally.
        return executor_class(server, cache_args=dict(CLASSIC_CACHE_ARGS))
    # execution.py @ a125cd84 (ComfyUI 0.3.64): PromptExecutor(server, cache_type=False, cache_size=None); the
    # defaults are the classic cache.
    return executor_class(server)


class PromptRunner:
    """ComfyUI's validate_prompt + PromptExecutor for one prompt at a time, as ComfyUI's prompt worker runs them.

    execution: ComfyUI's `execution` module (validate_prompt, PromptExecutor). server: the MessageSink.
    interrupt_type: comfy.model_management.InterruptProcessingException.
    """

    def __init__(self, execution, server: MessageSink, interrupt_type: type[BaseException]):
        self.execution = execution
        self.server = server
        self.interrupt_type = interrupt_type
        self.executor = make_executor(execution.PromptExecutor, server)

    def validate(self, prompt: dict, strict: bool = False) -> tuple[str, list]:
        """(prompt id, output node ids) from ComfyUI's validate_prompt; ValidationError with its message if refused.

        strict: also refuse when ComfyUI would run only some outputs (others failed validation).
        """
        prompt_id = str(uuid.uuid4())
        # validate_prompt is a coroutine in execution.py @ a125cd84 (0.3.64) and @ cb707e9c; resolve() also takes
        # the plain function of earlier releases.
        valid = resolve(self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid[0] or (strict and valid[3]):
            raise ValidationError(valid[1], valid[3])
        return prompt_id, valid[2]

    def execute(self, prompt: dict, prompt_id: str, outputs: list) -> RunResult:
        """Run a validated prompt; ExecutionError with ComfyUI's message if it failed or was interrupted."""
        self.server.last_prompt_id = prompt_id
        try:
            resolve(self.executor.execute(prompt, prompt_id, {}, outputs))
        except self.interrupt_type:
            # comfy/model_management.py @ a7631e351dc26cb8cb6aaf0fa7d9223b4aaa33fc: InterruptProcessingException is
            # a BaseException. execution.py @ cb707e9c turns it into "execution_interrupted" only around a node's
            # own code; a cancel outside that (IS_CHANGED, cache lookups) leaves execute(). Same outcome here.
            node_id = self.server.last_node_id
            raise ExecutionError("execution_interrupted", {
                "node_id": node_id, "node_type": prompt.get(node_id, {}).get("class_type")}) from None
        return self._result()

    def _result(self) -> RunResult:
        ex = self.executor
        result = RunResult(outputs=ex.history_result["outputs"])
        failures = [(e, d) for e, d in ex.status_messages if e in ("execution_error", "execution_interrupted")]
        if failures or not ex.success:
            raise ExecutionError(*(failures[-1] if failures else ("execution_failed", ex.status_messages)))
        return result


# ---- starting ComfyUI ---------------------------------------------------------------------------------------------
_STARTED = False


class Headless:
    """ComfyUI started in this process, headless, with this pack loaded by ComfyUI's custom-node loader.

    models / input / output / temp: folders to use instead of ComfyUI's own (models: DIR/<kind> is registered as
    the default folder of every model kind). The link to this pack is made in a temporary custom_nodes folder,
    removed at exit. extra_sys_path: appended to sys.path before ComfyUI is imported (e.g. an import-only
    stand-in for a missing package). cpu: None = CPU only when no CUDA/MPS/XPU device exists. extra_model_paths:
    also read ComfyUI's extra_model_paths.yaml. progress_hook: comfy.utils' global progress hook (value, total,
    preview, prompt_id, node_id), called with the executing node's ids filled in; default: only honours ComfyUI's
    cancel.

    Prompts: `editor.prepare(workflow, **overrides)` (workflow_graph.PromptEditor) gives the API prompt to `run`;
    `runner` (PromptRunner) validates and executes separately.
    """

    def __init__(self, comfy_root: str | os.PathLike, *, models=None, input=None, output=None, temp=None,
                 extra_sys_path: Iterable[str] = (), cpu: bool | None = None, extra_model_paths: bool = False,
                 progress_hook: Callable | None = None):
        if _STARTED:
            raise HeadlessError("ComfyUI is already started in this process (it keeps global state; start it once)")
        self.root = Path(comfy_root)
        self.custom_nodes = Path(tempfile.mkdtemp(prefix="sine_headless_nodes_"))
        atexit.register(self._cleanup)
        self.folder_paths = _import_settings(self.root, extra_sys_path, cpu)
        if extra_model_paths:
            _load_extra_model_paths(self.root)
        if models is not None:
            _use_models_folder(self.folder_paths, Path(models))
        for folder, setter in ((input, self.folder_paths.set_input_directory),
                               (output, self.folder_paths.set_output_directory),
                               (temp, self.folder_paths.set_temp_directory)):
            if folder is not None:
                Path(folder).mkdir(parents=True, exist_ok=True)
                setter(str(folder))
        self._link_pack()
        self._load_nodes(progress_hook)
        self.editor = PromptEditor(self.object_info, self.folder_paths)

    def _link_pack(self):
        """custom_nodes/<PACK_DIR_NAME> -> this pack, and that folder as ComfyUI's only custom_nodes folder."""
        try:
            (self.custom_nodes / PACK_DIR_NAME).symlink_to(PACK_ROOT, target_is_directory=True)
        except OSError as e:
            raise HeadlessError(f"cannot link the pack into {self.custom_nodes} ({e})") from None
        self.folder_paths.folder_names_and_paths["custom_nodes"] = ([str(self.custom_nodes)], set())

    def _load_nodes(self, progress_hook: Callable | None):
        """ComfyUI's nodes (built-in and this pack, by its own loader), progress hook and executor."""
        global _STARTED
        import nodes
        import execution
        import comfy.utils
        import comfy.model_management

        _STARTED = True
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))

        def honour_cancel(value, total, preview_image, prompt_id=None, node_id=None):
            comfy.model_management.throw_exception_if_processing_interrupted()

        comfy.utils.set_progress_bar_global_hook(_with_executing_ids(progress_hook or honour_cancel))
        self.nodes = nodes
        self.runner = PromptRunner(execution, MessageSink(), comfy.model_management.InterruptProcessingException)

    def _cleanup(self):
        link = self.custom_nodes / PACK_DIR_NAME
        if link.is_symlink():
            link.unlink()
        shutil.rmtree(self.custom_nodes, ignore_errors=True)

    @property
    def pack_load_ok(self) -> bool:
        """Whether ComfyUI's loader imported the pack (it logs and carries on when an import fails)."""
        return str(self.custom_nodes / PACK_DIR_NAME) in self.nodes.LOADED_MODULE_DIRS.values() or \
            PACK_DIR_NAME in self.nodes.LOADED_MODULE_DIRS

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

    # ---- running prompts ----------------------------------------------------------------------------------------
    def run(self, prompt: dict, strict: bool = False) -> RunResult:
        """Validate then execute an API prompt (from `editor.prepare`); strict: see PromptRunner.validate."""
        prompt_id, outputs = self.runner.validate(prompt, strict)
        return self.runner.execute(prompt, prompt_id, outputs)

    def output_path(self, image_entry: dict) -> Path:
        base = Path(self.folder_paths.get_directory_by_type(image_entry["type"]))
        return base / image_entry.get("subfolder", "") / image_entry["filename"]

    def written_files(self, result: RunResult) -> list[Path]:
        """Every file the run's output nodes reported (images, and paths a node returned as text, e.g. adapters)."""
        files = []
        for node_id in sorted(result.outputs, key=id_key):
            for key, entries in result.outputs[node_id].items():
                for e in entries or []:
                    if isinstance(e, dict) and "filename" in e and "type" in e:
                        files.append(self.output_path(e))
                    elif key == "text" and isinstance(e, str) and os.path.isfile(e):
                        files.append(Path(e))
        return files


def _import_settings(root: Path, extra_sys_path: Iterable[str], cpu: bool | None):
    """ComfyUI on sys.path, its settings (CPU or not, no API nodes) set, and its folder_paths module."""
    import torch
    sys.path.insert(0, str(root))
    for p in extra_sys_path:
        if str(p) not in sys.path:
            sys.path.append(str(p))
    from comfy.cli_args import args  # parsed from an empty command line: comfy.options leaves parsing off
    if cpu is None:
        mps = getattr(torch.backends, "mps", None)
        xpu = getattr(torch, "xpu", None)
        cpu = not (torch.cuda.is_available() or (mps is not None and mps.is_available())
                   or (xpu is not None and xpu.is_available()))
    args.cpu = cpu
    args.disable_api_nodes = True
    import utils.extra_config  # noqa: F401  (before `nodes`: nodes.py puts ComfyUI's utils in the way)
    import folder_paths
    return folder_paths


def _load_extra_model_paths(root: Path):
    import utils.extra_config
    yaml_path = root / "extra_model_paths.yaml"
    if yaml_path.is_file():
        utils.extra_config.load_extra_path_config(str(yaml_path))


def _use_models_folder(folder_paths, models: Path):
    """models/<kind> as the default folder of every model kind, as ComfyUI lays them out."""
    default_models = folder_paths.models_dir
    folder_paths.models_dir = str(models)  # where packs put their own model folders (sine_cache)
    for kind, (paths, _) in list(folder_paths.folder_names_and_paths.items()):
        if kind == "custom_nodes":
            continue
        subs = [os.path.basename(p) for p in paths
                if os.path.dirname(os.path.abspath(p)) == os.path.abspath(default_models)] or [kind]
        for sub in reversed(subs):  # the first one ends up the default
            folder_paths.add_model_folder_path(kind, str(models / sub), is_default=True)


def _with_executing_ids(hook: Callable) -> Callable:
    """`hook` called with the prompt and node ids of the executing node filled in, as main.py's hijack_progress
    does (ComfyUI's ProgressBar passes node_id only when a node gave one)."""
    from comfy_execution.utils import get_executing_context

    def with_ids(value, total, preview_image, prompt_id=None, node_id=None):
        context = get_executing_context()
        if context is not None:
            prompt_id = prompt_id if prompt_id is not None else context.prompt_id
            node_id = node_id if node_id is not None else context.node_id
        return hook(value, total, preview_image, prompt_id=prompt_id, node_id=node_id)
    return with_ids
