"""The four UI workflows in a real browser: ComfyUI's server + its own frontend, opened in headless Chromium.

- ComfyUI's real server (`main.py`, a subprocess on a free localhost port) serves the frontend from its pip
  package (comfyui-frontend-package) and loads this pack from a custom_nodes folder that links to the repo, as a
  user's install does. Model folders (an extra_model_paths.yaml) hold the random-weight fixtures under the file
  names the workflows use, so every model/image choice in them exists; nothing is queued.
- Each workflows/*.json is loaded into the canvas with the frontend's own `app.loadGraphData` (what a drag-and-
  drop or the template browser does). Checked: no dialog (missing nodes, missing models, load error) and no toast
  (workflow validation, link fixes); every node's type is registered and no node is marked with errors; every
  widget keeps the value saved in the file (so the frontend lays the widgets out as the file expects) and every
  combo value is one of its choices; the prompt the frontend would queue (`app.graphToPrompt`) is exactly the
  workflow's API twin in workflows/api/; no console error or exception while loading.
- A screenshot of each (a 1280x800 window at pixel ratio 2, whole graph in view) is written to
  workflows/screenshots/<name>.png (workflows/README.md shows them).

Chromium is Debian's `chromium` package (/usr/bin/chromium or `chromium` on PATH), run headless with background
networking, component updates and sync disabled (no internet needed), driven over the DevTools protocol with
aiohttp (a ComfyUI dependency). Without Chromium the module is skipped with one line.
"""
from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from comfyui_harness import PACK_DIR_NAME, REPO_ROOT, SKIP_LINE, find_comfyui

WORKFLOWS_DIR = REPO_ROOT / "workflows"
SCREENSHOTS_DIR = WORKFLOWS_DIR / "screenshots"
NAMES = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
VIEWPORT = (1280, 800)  # CSS pixels of the page
PIXEL_RATIO = 2  # screenshots at 2560x1600: the whole graph in view with legible text when opened full size
SERVER_START_TIMEOUT = 300  # s; ComfyUI imports torch and every node module, slow on a loaded CPU machine


def find_chromium() -> str | None:
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


CHROMIUM = find_chromium()
if find_comfyui() is None:
    pytest.skip(SKIP_LINE, allow_module_level=True)
if CHROMIUM is None:
    pytest.skip("Browser test skipped: no Chromium at /usr/bin/chromium or `chromium` on PATH. To enable it, "
                "install Debian's chromium package (apt-get install chromium) and rerun `bash tests/run.sh`.",
                allow_module_level=True)
aiohttp = pytest.importorskip("aiohttp", reason="Browser test skipped: aiohttp (a ComfyUI dependency) is missing")

# Frontend settings of the test user: no first-run template browser; no restore of the previous page's tabs;
# screenshots without the minimap / render-info overlays and with full-detail nodes at any zoom (no low-quality
# LOD boxes); the missing-node/model warnings and workflow validation on (their defaults, pinned here).
USER_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.Persist": False,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "LiteGraph.Canvas.MinFontSizeForLOD": 0,
    "Comfy.Workflow.ShowMissingNodesWarning": True,
    "Comfy.Workflow.ShowMissingModelsWarning": True,
    "Comfy.Validation.Workflows": True,
}


def load_workflow(name: str, api: bool = False) -> dict:
    return json.loads((WORKFLOWS_DIR / ("api" if api else "") / f"{name}.json").read_text(encoding="utf-8"))


def file_names_used() -> dict[str, set[str]]:
    """The model and image file names the workflows select: {"checkpoints": {...}, "controlnet": ..., "input": ...}."""
    used = {"checkpoints": set(), "controlnet": set(), "loras": set(), "input": set()}
    for name in NAMES:
        for node in load_workflow(name, api=True).values():
            inputs = node["inputs"]
            for key, kind in (("ckpt_name", "checkpoints"), ("control_net_name", "controlnet"),
                              ("lora_name", "loras"), ("adapter_name", "loras")):
                if isinstance(inputs.get(key), str):
                    used[kind].add(inputs[key])
            if node["class_type"] == "LoadImage" and isinstance(inputs.get("image"), str):
                used["input"].add(inputs["image"])
    return used


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_for_url(url: str, proc: subprocess.Popen, timeout: float, log: Path, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with status {proc.returncode} before answering {url}; log tail:\n{tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not answer {url} within {timeout:.0f} s; log tail:\n{tail(log)}")
        time.sleep(1.0)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=20)


# ---- ComfyUI's server --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(comfy, fixtures, tmp_path_factory):
    """ComfyUI's real web server with this pack, in a scratch base directory; yields its base URL; always stopped."""
    base = tmp_path_factory.mktemp("browser_comfyui")
    for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(REPO_ROOT, target_is_directory=True)

    # The fixtures under the names the workflows select, so the loaders list exactly those files.
    fixture_files = {"checkpoints": comfy.work / "models" / "checkpoints" / fixtures["checkpoint"],
                     "controlnet": comfy.work / "models" / "controlnet" / fixtures["controlnet"]}
    shipped_example = comfy.root / "input" / "example.png"  # ComfyUI ships it; the workflows' default image
    image = shipped_example if shipped_example.is_file() else comfy.work / "input" / fixtures["source_image"]
    models = base / "fixture_models"
    used = file_names_used()
    for kind in ("checkpoints", "controlnet", "loras"):
        (models / kind).mkdir(parents=True, exist_ok=True)
        for file_name in sorted(used[kind]):
            assert kind in fixture_files, f"the workflows select a {kind} file ({file_name}) the test has no fixture for"
            (models / kind / file_name).symlink_to(fixture_files[kind].resolve())
    for file_name in sorted(used["input"]):
        shutil.copyfile(image, base / "input" / file_name)
    extra_paths = base / "extra_model_paths.yaml"
    extra_paths.write_text("sine_browser_test:\n"
                           f"  base_path: {json.dumps(str(models))}\n"
                           "  checkpoints: checkpoints\n  controlnet: controlnet\n  loras: loras\n", encoding="utf-8")
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(USER_SETTINGS), encoding="utf-8")

    # Import-only stand-ins for packages with no build for the CPU torch used here (see their docstrings).
    # (Asked of a fresh interpreter: this test process may already have the torchvision stand-in on sys.path.)
    present = subprocess.run([sys.executable, "-c", "import importlib.util as u; print(*[m for m in "
                              "('torchvision', 'spandrel') if u.find_spec(m)])"], capture_output=True, text=True,
                             check=True).stdout.split()
    standins = [str(REPO_ROOT / "tests" / folder) for folder, module in
                (("torchvision_standin", "torchvision"), ("server_standins", "spandrel")) if module not in present]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(standins + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    port = free_port()
    log = base / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--disable-api-nodes", "--base-directory", str(base), "--extra-model-paths-config", str(extra_paths),
           "--database-url", "sqlite:///:memory:"]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=comfy.root, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_url(url + "/", proc, SERVER_START_TIMEOUT, log, "ComfyUI's server")
        yield {"url": url, "log": log}
    finally:
        stop(proc)


# ---- Chromium over the DevTools protocol -------------------------------------------------------------------------
class DevTools:
    """A minimal DevTools-protocol client for one page target (aiohttp websocket, driven from sync code)."""

    def __init__(self, ws_url: str):
        self.loop = asyncio.new_event_loop()
        self.events: list[dict] = []
        self._pending: dict[int, asyncio.Future] = {}
        self._next_id = 0
        self.loop.run_until_complete(self._connect(ws_url))

    async def _connect(self, ws_url):
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(ws_url, max_msg_size=0)
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self):
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            future = self._pending.pop(data["id"], None) if "id" in data else None
            if future is not None:
                if not future.done():
                    future.set_result(data)
            else:
                self.events.append(data)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionError("the browser closed the DevTools connection"))

    async def _call(self, method, params, timeout):
        self._next_id += 1
        future = self.loop.create_future()
        self._pending[self._next_id] = future
        await self.ws.send_str(json.dumps({"id": self._next_id, "method": method, "params": params}))
        reply = await asyncio.wait_for(future, timeout)
        if "error" in reply:
            raise RuntimeError(f"DevTools {method} failed: {reply['error']}")
        return reply["result"]

    def call(self, method: str, timeout: float = 60, **params) -> dict:
        return self.loop.run_until_complete(self._call(method, params, timeout))

    def evaluate(self, expression: str, timeout: float = 60):
        """The value of a JS expression (a promise is awaited); raises with the page's exception text."""
        result = self.call("Runtime.evaluate", timeout=timeout, expression=expression, awaitPromise=True,
                           returnByValue=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise AssertionError("in the page: " + (details.get("exception", {}).get("description")
                                                     or details.get("text", "exception")))
        return result["result"].get("value")

    def sleep(self, seconds: float) -> None:
        self.loop.run_until_complete(asyncio.sleep(seconds))  # the reader keeps collecting events meanwhile

    def wait_for(self, expression: str, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
            self.sleep(0.25)

    def errors_since(self, start: int) -> list[str]:
        """Console errors and uncaught exceptions among the events from index `start` on."""
        found = []
        for event in self.events[start:]:
            params = event.get("params", {})
            if event.get("method") == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                found.append("console.error: " + " ".join(
                    str(a.get("value", a.get("description", ""))) for a in params.get("args", []))[:800])
            elif event.get("method") == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                found.append("exception: " + str(details.get("exception", {}).get("description")
                                                 or details.get("text"))[:800])
        return found

    def close(self):
        async def _close():
            await self.ws.close()
            await self.session.close()
            self._reader.cancel()
        try:
            self.loop.run_until_complete(_close())
        finally:
            self.loop.close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """Headless Chromium with a fresh profile and no background network traffic; yields a DevTools page client."""
    profile = tmp_path_factory.mktemp("chromium_profile")
    log = profile.parent / (profile.name + ".log")
    width, height = VIEWPORT
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
           f"--user-data-dir={profile}", f"--window-size={width},{height}", "--remote-debugging-address=127.0.0.1",
           "--remote-debugging-port=0", "about:blank"]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT)
    client = None
    try:
        port_file = profile / "DevToolsActivePort"  # Chromium writes its DevTools port here
        deadline = time.monotonic() + 60
        while not (port_file.is_file() and port_file.read_text().strip()):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Chromium did not start its DevTools endpoint; log tail:\n{tail(log)}")
            time.sleep(0.2)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            pages = [t for t in json.load(r) if t.get("type") == "page"]
        assert pages, "Chromium has no page target"
        client = DevTools(pages[0]["webSocketDebuggerUrl"])
        client.call("Page.enable")
        client.call("Runtime.enable")
        client.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=PIXEL_RATIO,
                    mobile=False)
        yield client
    finally:
        if client is not None:
            client.close()
        stop(proc)


def open_frontend(browser: DevTools, url: str) -> None:
    """A fresh page load of ComfyUI's frontend, ready (app set up, node definitions registered incl. this pack's)."""
    browser.call("Page.navigate", url=url + "/")
    browser.wait_for("!!(window.app && window.app.canvas && window.LiteGraph && "
                     "window.LiteGraph.registered_node_types['SINE_Finetune'])", 120, "ComfyUI's frontend to start")
    browser.sleep(1.0)  # the startup workflow restore and first renders


# The state a user would see after opening the workflow, as plain data.
INSPECT_JS = """(() => {
  const visible = (e) => !!(e.offsetWidth || e.offsetHeight || e.getClientRects().length);
  const text = (e) => (e.innerText || '').trim().replace(/\\s+/g, ' ').slice(0, 600);
  const graph = window.app.graph;
  const nodes = graph._nodes.map((n) => ({
    id: n.id, type: n.type, title: n.title,
    registered: !!LiteGraph.registered_node_types[n.type],
    has_errors: !!n.has_errors,
    widgets: (n.widgets || []).map((w) => ({
      name: w.name, type: w.type, value: w.value,
      options: Array.isArray(w.options && w.options.values) ? w.options.values : null,
    })),
  }));
  return {
    nodes,
    serialized: graph.serialize(),
    dialogs: [...document.querySelectorAll('.p-dialog')].filter(visible).map(text),
    toasts: [...document.querySelectorAll('.p-toast-message')].filter(visible).map(text),
  };
})()"""


# Zoom and pan so that every node fits the canvas area left free by the side bar, the menu/tab bars and the
# bottom toolbar (the frontend's own Fit View leaves most of a small window empty).
FIT_VIEW_JS = """(() => {
  const canvas = window.app.canvas;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of window.app.graph._nodes) {
    const [x, y, w, h] = n.boundingRect;
    x0 = Math.min(x0, x); y0 = Math.min(y0, y); x1 = Math.max(x1, x + w); y1 = Math.max(y1, y + h);
  }
  const [left, top, right, bottom] = [56, 96, 16, 72];
  const width = canvas.canvas.clientWidth - left - right, height = canvas.canvas.clientHeight - top - bottom;
  const scale = Math.min(width / (x1 - x0), height / (y1 - y0));
  canvas.ds.scale = scale;
  canvas.ds.offset = [(left + (width - (x1 - x0) * scale) / 2) / scale - x0,
                      (top + (height - (y1 - y0) * scale) / 2) / scale - y0];
  canvas.setDirty(true, true);
  return scale;
})()"""


def test_server_lists_the_workflows_as_templates(server):
    """ComfyUI's template browser gets the four workflows from this pack's workflows/ folder, with thumbnails."""
    with urllib.request.urlopen(server["url"] + "/api/workflow_templates", timeout=30) as r:
        templates = json.load(r)
    assert sorted(templates.get(PACK_DIR_NAME, [])) == NAMES, templates
    for name in NAMES:
        for ext in ("json", "jpg"):
            with urllib.request.urlopen(f"{server['url']}/api/workflow_templates/{PACK_DIR_NAME}/{name}.{ext}",
                                        timeout=30) as r:
                body = r.read()
            assert body == (WORKFLOWS_DIR / f"{name}.{ext}").read_bytes(), f"{name}.{ext} served differently"


@pytest.mark.parametrize("name", NAMES)
def test_workflow_opens_cleanly_in_the_browser(server, browser, name):
    workflow = load_workflow(name)
    open_frontend(browser, server["url"])
    start = len(browser.events)
    browser.evaluate(f"window.app.loadGraphData({json.dumps(workflow)}, true, true, {json.dumps(name)})"
                     ".then(() => true)", timeout=120)
    # Settle: renders, and the Load Image previews (the server's /view of the input images).
    browser.wait_for("window.app.graph._nodes.filter((n) => n.type === 'LoadImage')"
                     ".every((n) => n.imgs && n.imgs.length && n.imgs[0].complete && n.imgs[0].naturalWidth > 0)",
                     60, "the Load Image previews")
    browser.sleep(1.5)
    state = browser.evaluate(INSPECT_JS)
    errors = browser.errors_since(start)

    assert not state["dialogs"], f"{name}: dialog(s) shown on opening: {state['dialogs']}"
    assert not state["toasts"], f"{name}: toast(s) shown on opening: {state['toasts']}"
    missing = [f"{n['id']} {n['type']}" for n in state["nodes"] if not n["registered"]]
    assert not missing, f"{name}: node types unknown to the frontend: {missing}"
    flagged = [f"{n['id']} {n['type']}" for n in state["nodes"] if n["has_errors"]]
    assert not flagged, f"{name}: nodes marked with errors: {flagged}"
    assert sorted(n["id"] for n in state["nodes"]) == sorted(n["id"] for n in workflow["nodes"])
    assert len(state["serialized"]["links"]) == len(workflow["links"]), f"{name}: links were dropped or fixed"

    # Every widget keeps the file's value (a shifted layout or a rejected value would change them).
    saved = {n["id"]: n.get("widgets_values") for n in workflow["nodes"]}
    for node in state["serialized"]["nodes"]:
        assert node.get("widgets_values") == saved[node["id"]], \
            f"{name}: node {node['id']} ({node['type']}) widget values changed on loading"
    bad_combos = [f"node {n['id']} ({n['type']}) {w['name']}={w['value']!r} not in {w['options'][:8]}"
                  for n in state["nodes"] for w in n["widgets"]
                  if w["type"] == "combo" and w["options"] is not None and w["value"] not in w["options"]]
    assert not bad_combos, f"{name}: combo values the frontend does not offer: {bad_combos}"

    # What the frontend would queue is exactly the API twin (the headless runner's conversion agrees with it).
    prompt = browser.evaluate("window.app.graphToPrompt().then((p) => p.output)")
    assert prompt == load_workflow(name, api=True), f"{name}: the frontend's prompt differs from workflows/api/"
    assert not errors, f"{name}: errors in the page while opening: {errors}"

    # The screenshot: the whole graph in view.
    browser.evaluate(FIT_VIEW_JS)
    browser.sleep(1.0)
    shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=False)
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    assert image.size == (VIEWPORT[0] * PIXEL_RATIO, VIEWPORT[1] * PIXEL_RATIO)
    SCREENSHOTS_DIR.mkdir(exist_ok=True)
    # 256 colours, no dithering: the flat UI stays sharp at a third of the size.
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        SCREENSHOTS_DIR / f"{name}.png", optimize=True)
