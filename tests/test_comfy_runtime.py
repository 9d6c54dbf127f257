"""The headless runner's own branching between ComfyUI executor APIs (workflows/comfy_runtime.py).

This checks the RUNNER's branching, not ComfyUI: the executor classes below are fakes shaped like the two
constructor/method forms the runner supports (execution.py @ a125cd84 = ComfyUI 0.3.64, and execution.py @
cb707e9c / comfy_execution/caching.py @ dec8fb2b / comfy/model_management.py @ a7631e35 of newer ComfyUI), each
doing only what the runner depends on. That the runner really works with ComfyUI is tests/comfyui/ (real ComfyUI,
no fakes).
"""
import sys
from collections import namedtuple
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parent.parent / "workflows"))

from comfy_runtime import (CLASSIC_CACHE_ARGS, ExecutionError, MessageSink, PromptRunner,  # noqa: E402
                           ValidationError, make_executor)
from comfyui_harness import cached_nodes, cached_outputs  # noqa: E402  (the tests' reading of the executor)

CacheEntry = namedtuple("CacheEntry", "ui outputs")  # the shape of newer ComfyUI's execution.CacheEntry


class Interrupt(BaseException):
    """Shaped like newer ComfyUI's InterruptProcessingException: a BaseException, not an Exception."""


class OldExecutor:
    """Constructor and sync cache of ComfyUI 0.3.64's PromptExecutor (execution.py @ a125cd84)."""

    def __init__(self, server, cache_type=False, cache_size=None):
        self.server, self.cache_size = server, cache_size
        self.caches = type("Caches", (), {"outputs": self})()
        self.outputs_by_node = {"ckpt": [["model"], ["clip"]]}
        self.outcome = "success"
        self.history_result, self.status_messages, self.success = {"outputs": {}}, [], True

    def get(self, node_id):
        return self.outputs_by_node.get(node_id)

    def execute(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):
        self.status_messages = [("execution_start", {}), ("execution_cached", {"nodes": ["ckpt"]})]
        if self.outcome == "success":
            self.history_result = {"outputs": {"save": {"images": [{"filename": "a.png", "type": "output"}]}}}
            self.server.send_sync("executed", {"node": "save"})
        elif self.outcome == "error":
            self.success = False
            self.status_messages.append(("execution_error", {"node_id": "save", "node_type": "SaveImage",
                                                             "exception_message": "boom\n"}))
        else:
            raise self.outcome


class NewExecutor(OldExecutor):
    """Constructor, coroutine execute path and async CacheEntry cache of newer ComfyUI's PromptExecutor."""

    def __init__(self, server, cache_type=False, cache_args=None):
        super().__init__(server, cache_type)
        self.cache_args = cache_args

    async def get(self, node_id):
        outputs = self.outputs_by_node.get(node_id)
        return None if outputs is None else CacheEntry(ui=None, outputs=outputs)

    def execute(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):
        return self.execute_async(prompt, prompt_id, extra_data, execute_outputs)

    async def execute_async(self, prompt, prompt_id, extra_data={}, execute_outputs=[]):
        int(self.cache_args["ram"] * 1024 ** 3), int(self.cache_args["ram_inactive"] * 1024 ** 3)  # as it reads them
        OldExecutor.execute(self, prompt, prompt_id, extra_data, execute_outputs)


def execution_module(executor_class, validate_is_async: bool, verdict=(True, None, ["save"], {})):
    """A stand-in `execution` module: the executor class and a validate_prompt of the given kind."""
    async def validate_async(prompt_id, prompt, partial_execution_list):
        return verdict

    def validate_sync(prompt_id, prompt, partial_execution_list):
        return verdict

    return type("Execution", (), {"PromptExecutor": executor_class,
                                  "validate_prompt": staticmethod(validate_async if validate_is_async
                                                                  else validate_sync)})


PROMPT = {"save": {"class_type": "SaveImage", "inputs": {}}}
FORMS = pytest.mark.parametrize("executor_class,validate_is_async", [(OldExecutor, True), (NewExecutor, True),
                                                                     (OldExecutor, False)])


class RecordingSink(MessageSink):
    """Keeps what the executor sends, to check that the runner hands its sink to the executor."""

    def __init__(self):
        super().__init__()
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))


def runner(executor_class, validate_is_async=True, **kw) -> PromptRunner:
    return PromptRunner(execution_module(executor_class, validate_is_async, **kw), RecordingSink(), Interrupt)


def test_executor_gets_cache_args_only_when_its_constructor_takes_them():
    old, new = make_executor(OldExecutor, MessageSink()), make_executor(NewExecutor, MessageSink())
    assert old.cache_size is None and not hasattr(old, "cache_args")
    assert new.cache_args == CLASSIC_CACHE_ARGS and new.cache_args is not CLASSIC_CACHE_ARGS


@FORMS
def test_validate_and_execute_on_each_api_form(executor_class, validate_is_async):
    r = runner(executor_class, validate_is_async)
    prompt_id, outputs = r.validate(PROMPT)
    assert outputs == ["save"] and prompt_id
    result = r.execute(PROMPT, prompt_id, outputs)
    assert result.outputs["save"]["images"][0]["filename"] == "a.png"
    assert cached_nodes(r.executor) == ["ckpt"] and r.server.messages == [("executed", {"node": "save"})]
    assert r.server.last_prompt_id == prompt_id


@FORMS
def test_refused_prompt_raises_validation_error(executor_class, validate_is_async):
    error = {"message": "Prompt has no outputs", "details": ""}
    r = runner(executor_class, validate_is_async, verdict=(False, error, [], {}))
    with pytest.raises(ValidationError, match="Prompt has no outputs") as e:
        r.validate(PROMPT)
    assert e.value.error == error and e.value.exit_code == 2


@pytest.mark.parametrize("executor_class", [OldExecutor, NewExecutor])
def test_cached_outputs_from_sync_lists_and_async_cache_entries(executor_class):
    r = runner(executor_class)
    assert cached_outputs(r.executor, "ckpt") == [["model"], ["clip"]]
    assert cached_outputs(r.executor, "missing") is None


@pytest.mark.parametrize("executor_class", [OldExecutor, NewExecutor])
def test_node_failure_is_an_execution_error_with_comfyuis_message(executor_class):
    r = runner(executor_class)
    r.executor.outcome = "error"
    with pytest.raises(ExecutionError, match=r"node save \(SaveImage\) failed: boom") as e:
        r.execute(PROMPT, "p1", ["save"])
    assert e.value.exit_code == 1 and e.value.event == "execution_error"


@pytest.mark.parametrize("executor_class", [OldExecutor, NewExecutor])
def test_a_base_exception_cancel_leaving_the_executor_is_reported_as_interrupted(executor_class):
    r = runner(executor_class)
    r.executor.outcome = Interrupt()
    assert not isinstance(r.executor.outcome, Exception)  # what `except Exception` would miss
    with pytest.raises(ExecutionError, match="ComfyUI interrupted") as e:
        r.execute(PROMPT, "p1", ["save"])
    assert e.value.event == "execution_interrupted" and e.value.exit_code == 1


@pytest.mark.parametrize("executor_class", [OldExecutor, NewExecutor])
def test_ctrl_c_is_not_swallowed(executor_class):
    r = runner(executor_class)
    r.executor.outcome = KeyboardInterrupt()
    with pytest.raises(KeyboardInterrupt):
        r.execute(PROMPT, "p1", ["save"])
