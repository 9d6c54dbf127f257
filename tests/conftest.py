"""Two tiers: pure torch tests (always run) and tests inside real ComfyUI (tests/comfyui/, skipped without it).

With SINE_REQUIRE_COMFYUI_TIER=1 (set by .ci/run) the ComfyUI tier is required: no ComfyUI is a usage error before
any test runs, and a session in which no test of tests/comfyui/ ran fails.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# Appended, not prepended: ComfyUI's own top-level `nodes` module must win over this pack's `nodes/` folder.
if str(REPO_ROOT) not in sys.path:
    sys.path.append(str(REPO_ROOT))

FIXTURE_SEED = 1234
TIER_REQUIRED = os.environ.get("SINE_REQUIRE_COMFYUI_TIER") == "1"
_tier_tests_run: list[str] = []  # node ids of ComfyUI-tier tests that reached their call phase


def pytest_report_header(config):
    from comfyui_harness import SKIP_LINE, find_comfyui
    import device_moves
    root = find_comfyui()
    emulation = " (GPU weight copies emulated: tests/device_moves.py)" if device_moves.requested(config) else ""
    return f"ComfyUI tier: {root}{emulation}" if root else SKIP_LINE


COMFYUI_TIER = REPO_ROOT / "tests" / "comfyui"


def pytest_collection_modifyitems(config, items):
    """Everything under tests/comfyui/ is the ComfyUI tier: marked, and skipped with one line without ComfyUI."""
    from comfyui_harness import SKIP_LINE, find_comfyui
    skip = None if find_comfyui() else pytest.mark.skip(reason=SKIP_LINE)
    for item in items:
        if COMFYUI_TIER in Path(item.fspath).parents:
            item.add_marker(pytest.mark.comfyui)
            if skip:
                item.add_marker(skip)


def pytest_addoption(parser):
    parser.addoption("--emulate-device-moves", action="store_true", default=False,
                     help="run the ComfyUI tier with ComfyUI's load/offload devices as cpu:0 / cpu:1, so every model "
                          "move copies the weights as on a GPU (tests/device_moves.py; also SINE_EMULATE_DEVICE_MOVES=1)")


def pytest_configure(config):
    config.addinivalue_line("markers", "comfyui: runs inside real ComfyUI (skipped when ComfyUI is absent)")


def pytest_sessionstart(session):
    """Required tier, no ComfyUI: stop here with what was looked for (pytest exits with status 4)."""
    from comfyui_harness import find_comfyui
    if TIER_REQUIRED and find_comfyui() is None:
        raise pytest.UsageError(
            f"SINE_REQUIRE_COMFYUI_TIER=1 but no ComfyUI at $COMFYUI_PATH "
            f"({os.environ.get('COMFYUI_PATH') or 'not set'}) or ~/comfy/ComfyUI: the ComfyUI tier cannot run. "
            "Point COMFYUI_PATH at a ComfyUI checkout (.ci/run defaults it to ../shared/comfyui beside the clone).")


def pytest_runtest_logreport(report):
    if report.when == "call" and "comfyui" in report.keywords:
        _tier_tests_run.append(report.nodeid)


def pytest_sessionfinish(session, exitstatus):
    """Required tier, none of its tests ran (all skipped or deselected): the session fails."""
    if TIER_REQUIRED and not _tier_tests_run and session.exitstatus in (pytest.ExitCode.OK,
                                                                        pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def comfy(tmp_path_factory, request):
    """The headless ComfyUI of this test process, with this pack loaded and test folders for models/input/output."""
    from comfyui_harness import ComfySession, SKIP_LINE, find_comfyui
    root = find_comfyui()
    if root is None:
        pytest.skip(SKIP_LINE)
    session = ComfySession(root, tmp_path_factory.mktemp("comfyui"))
    import device_moves
    if device_moves.requested(request.config):
        device_moves.install()  # before any model is loaded: the whole process copies on every move
    return session


@pytest.fixture
def device_moves(comfy):
    """This test under the GPU-copy emulation (tests/device_moves.py), whatever the rest of the process runs."""
    import device_moves as emulation
    with emulation.emulated(comfy):
        yield


@pytest.fixture
def device_moves_lowvram(comfy):
    """This test under the GPU-copy emulation of a --lowvram GPU: every model that is not forced full loads in part."""
    import device_moves as emulation
    with emulation.emulated(comfy, lowvram=True):
        yield


@pytest.fixture(scope="session")
def fixtures(comfy):
    """Names of the random-weight SD1.5 checkpoint, ControlNet and images, as ComfyUI's loaders list them."""
    from comfyui_fixtures import ensure_fixtures
    import comfyui_version
    return ensure_fixtures(comfy.work / "models", comfy.work / "input", FIXTURE_SEED, comfyui_version.__version__)


def pytest_terminal_summary(terminalreporter):
    """The one line that says the ComfyUI tier was skipped and how to enable it, or that a required tier did not
    run (shown even with -q)."""
    from comfyui_harness import SKIP_LINE, find_comfyui
    if TIER_REQUIRED and not _tier_tests_run:
        terminalreporter.write_line("FAILED: SINE_REQUIRE_COMFYUI_TIER=1 but no test of tests/comfyui/ ran "
                                    "(skipped or not selected); the ComfyUI tier is required here.", red=True)
    elif find_comfyui() is None:
        terminalreporter.write_line(SKIP_LINE)
