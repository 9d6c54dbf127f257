"""Import-only stand-in for spandrel, for the browser test's ComfyUI server only (never shipped, never used by the pack).

spandrel (ComfyUI's upscale-model loader library) requires torchvision, which has no build for the CPU torch used
by the test tier. Without it ComfyUI skips comfy_extras/nodes_upscale_model.py, so "Load Upscale Model" is missing
from /object_info — and ComfyUI's frontend assumes that node exists (its model-to-node table lists it) and fails
while building model widgets. With this stand-in the node registers as in a user's ComfyUI; loading an upscale
model (which the workflows under test never do) fails loudly. tests/comfyui/test_browser.py puts this folder on
the server's PYTHONPATH only when no real spandrel is importable.
"""


class _Unavailable:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("spandrel is not available: tests/server_standins/spandrel is an import-only stand-in")


class ModelLoader(_Unavailable):
    pass


class ImageModelDescriptor(_Unavailable):
    pass


MAIN_REGISTRY = None


def __getattr__(name):
    raise AttributeError(f"spandrel.{name} is not available: tests/server_standins is an import-only stand-in")
