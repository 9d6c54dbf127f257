"""The UI workflows (workflows/*.json) in a real browser: ComfyUI's server + its own frontend, in headless Chromium.

- ComfyUI's real server (`main.py`, a subprocess on a free localhost port) loads this pack from a custom_nodes
  folder that links to the repo, as a user's install does. Model folders (an extra_model_paths.yaml) hold the
  random-weight fixtures under the file names the workflows use, so every model/image choice in them exists;
  nothing is queued.
- Two frontends, the same checks (the tests are parametrised over them): the one this ComfyUI pins (its pip
  package comfyui-frontend-package, installed by tests/run.sh) and NEWEST_FRONTEND, the newest release on PyPI
  when this was written, served with ComfyUI's `--front-end-root` flag from a `pip install --target` folder in the
  test cache (.sine_test_cache/, installed on first use; skipped with one line where pip cannot get it). Users
  run ComfyUI with newer frontends than it pins; workflows/README.md records where the newest one differs.
- Each workflows/*.json is loaded into the canvas with the frontend's own `app.loadGraphData` (what a drag-and-
  drop or the template browser does). Checked: the page runs the expected frontend version; no dialog (missing
  nodes, missing models, load error) and no toast (workflow validation, link fixes); every node's type is
  registered and no node is marked with errors; every widget keeps the value saved in the file (so the frontend
  lays the widgets out as the file expects) and every combo value is one of its choices; the groups keep their
  title and frame and each holds the nodes of its stage (the frontend's own membership); the prompt the frontend
  would queue (`app.graphToPrompt`) is exactly the workflow's API twin in workflows/api/; no console error or
  exception while loading.
- Screenshots, with the pinned frontend only (workflows/README.md shows them), in workflows/screenshots/:
  <name>.png, the whole workflow, and <name>_<part>.png, close-ups of the groups tools/build_workflows.py names for each
  workflow (Workflow.zooms) at canvas zoom 1, framed so a README ~800 px wide shows their widget text at a
  legible size. Rendered at pixel ratio 2 and cut to the graph (no menus).

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

from comfyui_harness import PACK_DIR_NAME, REPO_ROOT, SKIP_LINE, find_comfyui, import_standin_paths

WORKFLOWS_DIR = REPO_ROOT / "workflows"
SCREENSHOTS_DIR = WORKFLOWS_DIR / "screenshots"
NAMES = sorted(p.stem for p in WORKFLOWS_DIR.glob("*.json"))
VIEWPORT = (1280, 800)  # CSS pixels of the page
PIXEL_RATIO = 2  # device pixels per CSS pixel: screenshots stay sharp when opened full size
FREE_AREA = (56, 96, 16, 72)  # CSS px at the canvas's left, top, right, bottom that the frontend's bars may cover
MARGIN = 24  # graph units of canvas around a screenshot's nodes and groups
SERVER_START_TIMEOUT = 300  # s; ComfyUI imports torch and every node module, slow on a loaded CPU machine
# The newest comfyui-frontend-package on PyPI when checked (`pip index versions comfyui-frontend-package`,
# 2026-11-26); ComfyUI 0.3.64 pins 1.27.10.
NEWEST_FRONTEND = "1.58.1"


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

# Imported after the skips: where the module is skipped, nothing else of the ComfyUI tier needs to import.
from comfyui_fixtures import default_cache_dir  # noqa: E402
import build_workflows  # noqa: E402  (tools/ is on sys.path through comfyui_harness)

ZOOMS = {wf.name: wf.zooms for wf in (make() for make in build_workflows.WORKFLOWS)}  # close-ups per workflow

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


# ---- the frontends -----------------------------------------------------------------------------------------------
def pinned_frontend_version(comfy_root: Path) -> str:
    """The comfyui-frontend-package version this ComfyUI's requirements.txt pins (what its server serves)."""
    for line in (comfy_root / "requirements.txt").read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("comfyui-frontend-package=="):
            return line.split("==", 1)[1].strip()
    pytest.fail(f"{comfy_root / 'requirements.txt'} pins no comfyui-frontend-package version")


def newest_frontend_root() -> Path:
    """NEWEST_FRONTEND's static folder (the --front-end-root), pip-installed into the test cache on first use."""
    target = default_cache_dir() / f"comfyui-frontend-package-{NEWEST_FRONTEND}"
    static = target / "comfyui_frontend_package" / "static"
    if not (static / "index.html").is_file():
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "-q",
                               "--no-deps", "--target", str(partial), f"comfyui-frontend-package=={NEWEST_FRONTEND}"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"Newest-frontend check skipped: pip could not install comfyui-frontend-package=="
                        f"{NEWEST_FRONTEND}: {(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        shutil.rmtree(target, ignore_errors=True)
        partial.rename(target)
    return static


@pytest.fixture(scope="module", params=["pinned", "newest"])
def frontend(request, comfy):
    """{"kind", "version", "root"}: the frontend the server serves (root None = its installed pip package)."""
    if request.param == "pinned":
        return {"kind": "pinned", "version": pinned_frontend_version(comfy.root), "root": None}
    return {"kind": "newest", "version": NEWEST_FRONTEND, "root": newest_frontend_root()}


# ---- ComfyUI's server --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(comfy, fixtures, frontend, tmp_path_factory):
    """ComfyUI's real web server with this pack and `frontend`, in a scratch base directory; yields its base URL and
    the frontend; always stopped."""
    base = tmp_path_factory.mktemp("browser_comfyui")
    for sub in ("custom_nodes", "input", "output", "temp", "user/default"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / PACK_DIR_NAME).symlink_to(REPO_ROOT, target_is_directory=True)

    # The fixtures under the names the workflows select, so the loaders list exactly those files.
    fixture_files = {"checkpoints": comfy.work / "models" / "checkpoints" / fixtures["checkpoint"],
                     "controlnet": comfy.work / "models" / "controlnet" / fixtures["controlnet"],
                     "loras": comfy.work / "models" / "loras" / fixtures["lora"]}
    shipped_example = comfy.root / "input" / "example.png"  # ComfyUI ships it; the workflows' default image
    image = shipped_example if shipped_example.is_file() else comfy.work / "input" / fixtures["source_image"]
    models = base / "fixture_models"
    used = file_names_used()
    for kind in ("checkpoints", "controlnet", "loras"):
        (models / kind).mkdir(parents=True, exist_ok=True)
        for file_name in sorted(used[kind]):
            assert kind in fixture_files, f"the workflows select a {kind} file ({file_name}): no fixture for it"
            (models / kind / file_name).symlink_to(fixture_files[kind].resolve())
    for file_name in sorted(used["input"]):
        shutil.copyfile(image, base / "input" / file_name)
    extra_paths = base / "extra_model_paths.yaml"
    extra_paths.write_text("sine_browser_test:\n"
                           f"  base_path: {json.dumps(str(models))}\n"
                           "  checkpoints: checkpoints\n  controlnet: controlnet\n  loras: loras\n", encoding="utf-8")
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(USER_SETTINGS), encoding="utf-8")

    # Import-only stand-ins for packages with no build for the CPU torch used here (tools/import_standins).
    standins = import_standin_paths()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(standins + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    port = free_port()
    log = base / "server.log"
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-auto-launch",
           "--disable-api-nodes", "--base-directory", str(base), "--extra-model-paths-config", str(extra_paths),
           "--database-url", "sqlite:///:memory:"]
    if frontend["root"] is not None:
        cmd += ["--front-end-root", str(frontend["root"])]
    with open(log, "wb") as log_file:
        proc = subprocess.Popen(cmd, cwd=comfy.root, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_url(url + "/", proc, SERVER_START_TIMEOUT, log, "ComfyUI's server")
        yield {"url": url, "log": log, "frontend": frontend}
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

    def wait_for(self, expression: str, timeout: float, what: str, detail: str | None = None) -> None:
        """Polls `expression` until it is true; on timeout fails, with the value of the `detail` expression."""
        deadline = time.monotonic() + timeout
        while not self.evaluate(expression):
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}"
                            + (f"; now: {self.evaluate(detail)}" if detail else ""))
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
        emulate_window(client, width, height)
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
  const groups = graph.groups.map((g) => {
    g.recomputeInsideNodes();  // the frontend's own rule for which nodes a group holds (moves with it)
    // Number(): the newest frontend's live node ids are strings ('1'); the saved ones stay numbers.
    return { title: g.title, nodes: g.nodes.map((n) => Number(n.id)).sort((a, b) => a - b) };
  });
  return {
    version: window.__COMFYUI_FRONTEND_VERSION__,
    nodes,
    groups,
    serialized: graph.serialize(),
    dialogs: [...document.querySelectorAll('.p-dialog')].filter(visible).map(text),
    toasts: [...document.querySelectorAll('.p-toast-message')].filter(visible).map(text),
  };
})()"""

# The canvas rectangle [x0, y0, x1, y1] (graph units) of the groups with the given titles, or with none given, of
# every node and group, as the frontend lays them out; and how many of the titles it found.
BOUNDS_JS = """((titles) => {
  const graph = window.app.graph;
  const groups = graph.groups.filter((g) => !titles.length || titles.includes(g.title));
  const rects = groups.map((g) => [...g.boundingRect]);
  if (!titles.length) rects.push(...graph._nodes.map((n) => [...n.boundingRect]));
  return {
    found: groups.length,
    rect: [Math.min(...rects.map((r) => r[0])), Math.min(...rects.map((r) => r[1])),
           Math.max(...rects.map((r) => r[0] + r[2])), Math.max(...rects.map((r) => r[1] + r[3]))],
  };
})"""

# Where the canvas lies in the page and its size, CSS px (frontend 1.27 puts bars beside it, newer ones over it).
CANVAS_JS = """(() => {
  const c = window.app.canvas.canvas, r = c.getBoundingClientRect();
  return [r.x, r.y, c.clientWidth, c.clientHeight];
})()"""

# Zoom and pan so that graph point (x, y) is at canvas point (left, top).
PLACE_JS = """((x, y, scale, left, top) => {
  const canvas = window.app.canvas;
  canvas.ds.scale = scale;
  canvas.ds.offset = [left / scale - x, top / scale - y];
  canvas.setDirty(true, true);
  return true;
})"""


def emulate_window(browser: DevTools, width: int, height: int) -> None:
    """A window of width x height CSS pixels at PIXEL_RATIO."""
    browser.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=PIXEL_RATIO,
                 mobile=False)


def grow_window(browser: DevTools, canvas_w: int, canvas_h: int, grow_w: int, grow_h: int) -> None:
    """The default window grown by grow_w x grow_h CSS px; waits until the frontend's canvas (canvas_w x canvas_h in
    the default window) has grown as much and its backing store has followed (a window resize event is sent again
    while it has not: two quick resizes in a row can leave the frontend at the first size)."""
    emulate_window(browser, VIEWPORT[0] + grow_w, VIEWPORT[1] + grow_h)
    width, height = canvas_w + grow_w, canvas_h + grow_h
    browser.wait_for(f"(() => {{ const c = window.app.canvas.canvas; const done = c.clientWidth === {width} && "
                     f"c.clientHeight === {height} && c.width === Math.round({width} * devicePixelRatio) && "
                     f"c.height === Math.round({height} * devicePixelRatio); "
                     f"if (!done) window.dispatchEvent(new Event('resize')); return done; }})()", 30,
                     f"the canvas to follow the window size (to {width}x{height} CSS px)",
                     "(() => { const c = window.app.canvas.canvas; return {client: [c.clientWidth, c.clientHeight], "
                     "backing: [c.width, c.height], window: [innerWidth, innerHeight]}; })()")


def screenshot(browser: DevTools, path: Path, titles: list[str], zoom: float | None) -> tuple[int, int]:
    """Writes a PNG of the named groups (none: the whole workflow) at canvas `zoom` (None: the zoom that fits the
    default window), cut to them plus MARGIN; the window grows where they do not fit. Returns the image size."""
    bounds = browser.evaluate(f"{BOUNDS_JS}({json.dumps(titles)})")
    assert bounds["found"] == len(titles) or not titles, f"{path.name}: groups {titles} not all in the workflow"
    x0, y0, x1, y1 = bounds["rect"]
    x0, y0, x1, y1 = x0 - MARGIN, y0 - MARGIN, x1 + MARGIN, y1 + MARGIN
    left, top, right, bottom = FREE_AREA
    emulate_window(browser, *VIEWPORT)  # the previous close-up may have grown it
    browser.wait_for(f"innerWidth === {VIEWPORT[0]} && innerHeight === {VIEWPORT[1]}", 30, "the default window")
    canvas_x, canvas_y, canvas_w, canvas_h = browser.evaluate(CANVAS_JS)
    if zoom is None:
        zoom = min((canvas_w - left - right) / (x1 - x0), (canvas_h - top - bottom) / (y1 - y0))
    width, height = round((x1 - x0) * zoom), round((y1 - y0) * zoom)
    # The window grows by what the shot needs beyond the canvas's free area (the bars keep their size).
    grow_window(browser, canvas_w, canvas_h, max(0, width - (canvas_w - left - right)),
                max(0, height - (canvas_h - top - bottom)))
    browser.evaluate(f"{PLACE_JS}({x0}, {y0}, {zoom}, {left}, {top})")
    browser.sleep(1.0)
    canvas_x, canvas_y = browser.evaluate(CANVAS_JS)[:2]
    shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=False,
                        clip={"x": canvas_x + left, "y": canvas_y + top, "width": width, "height": height, "scale": 1})
    image = Image.open(io.BytesIO(base64.b64decode(shot["data"]))).convert("RGB")
    assert image.size == (width * PIXEL_RATIO, height * PIXEL_RATIO), (path.name, image.size, width, height)
    # 256 colours, no dithering: the flat UI stays sharp at a third of the size.
    image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
    return image.size


def test_server_lists_the_workflows_as_templates(server):
    """ComfyUI's template browser gets every workflow from this pack's workflows/ folder, with thumbnails."""
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
    frontend = server["frontend"]
    workflow = load_workflow(name)
    emulate_window(browser, *VIEWPORT)  # a screenshot of the previous workflow may have grown it
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

    assert state["version"] == frontend["version"], f"the page runs frontend {state['version']}, not {frontend}"
    assert not state["dialogs"], f"{name}: dialog(s) shown on opening: {state['dialogs']}"
    assert not state["toasts"], f"{name}: toast(s) shown on opening: {state['toasts']}"
    missing = [f"{n['id']} {n['type']}" for n in state["nodes"] if not n["registered"]]
    assert not missing, f"{name}: node types unknown to the frontend: {missing}"
    flagged = [f"{n['id']} {n['type']}" for n in state["nodes"] if n["has_errors"]]
    assert not flagged, f"{name}: nodes marked with errors: {flagged}"
    assert sorted(n["id"] for n in state["serialized"]["nodes"]) == sorted(n["id"] for n in workflow["nodes"])
    assert len(state["serialized"]["links"]) == len(workflow["links"]), f"{name}: links were dropped or fixed"

    # Every widget keeps the file's value (a shifted layout or a rejected value would change them). A node with no
    # widget ([] in the file): the newest frontend writes no widgets_values at all.
    saved = {n["id"]: n.get("widgets_values") for n in workflow["nodes"]}
    for node in state["serialized"]["nodes"]:
        assert node.get("widgets_values", []) == saved[node["id"]], \
            f"{name}: node {node['id']} ({node['type']}) widget values changed on loading"
    bad_combos = [f"node {n['id']} ({n['type']}) {w['name']}={w['value']!r} not in {w['options'][:8]}"
                  for n in state["nodes"] for w in n["widgets"]
                  if w["type"] == "combo" and w["options"] is not None and w["value"] not in w["options"]]
    assert not bad_combos, f"{name}: combo values the frontend does not offer: {bad_combos}"

    # The groups keep title, frame and colour, and each holds the nodes of its stage (the frontend's membership).
    # font_size: kept, or dropped where the frontend draws every group title at one size (the newest does); never
    # changed.
    groups = state["serialized"]["groups"]
    assert [{k: g[k] for k in ("title", "bounding", "color")} for g in groups] == \
        [{k: g[k] for k in ("title", "bounding", "color")} for g in workflow["groups"]], f"{name}: groups changed"
    assert all(g.get("font_size", f["font_size"]) == f["font_size"] for g, f in zip(groups, workflow["groups"]))
    in_file = {g["title"]: sorted(n["id"] for n in workflow["nodes"] if n["type"] != "Note" and
                                  inside(g["bounding"], n)) for g in workflow["groups"]}
    assert {g["title"]: g["nodes"] for g in state["groups"]} == in_file, f"{name}: group members differ"
    assert sorted(i for ids in in_file.values() for i in ids) == sorted(
        n["id"] for n in workflow["nodes"] if n["type"] != "Note"), f"{name}: a node is in no group or in two"

    # What the frontend would queue is exactly the API twin (the headless runner's conversion agrees with it).
    prompt = browser.evaluate("window.app.graphToPrompt().then((p) => p.output)")
    assert prompt == load_workflow(name, api=True), f"{name}: the frontend's prompt differs from workflows/api/"
    assert not errors, f"{name}: errors in the page while opening: {errors}"

    if frontend["kind"] != "pinned":
        return
    # The screenshots (with the frontend this ComfyUI ships): the whole workflow, then each close-up.
    SCREENSHOTS_DIR.mkdir(exist_ok=True)
    expected = {f"{name}.png"} | {f"{name}_{part}.png" for part in ZOOMS[name]}
    for stale in SCREENSHOTS_DIR.glob(f"{name}_*.png"):
        if stale.name not in expected:
            stale.unlink()
    screenshot(browser, SCREENSHOTS_DIR / f"{name}.png", [], None)
    for part, titles in ZOOMS[name].items():
        screenshot(browser, SCREENSHOTS_DIR / f"{name}_{part}.png", titles, 1.0)


def inside(bounding: list[float], node: dict) -> bool:
    """The frontend's group membership rule: the centre of the node's bounding rect (title bar included)."""
    x = node["pos"][0] + node["size"][0] / 2
    y = node["pos"][1] - build_workflows.TITLE_H + (node["size"][1] + build_workflows.TITLE_H) / 2
    return bounding[0] <= x <= bounding[0] + bounding[2] and bounding[1] <= y <= bounding[1] + bounding[3]
