"""Import-only stand-ins for packages that ComfyUI imports at module level but this pack never uses.

torchvision and torchaudio have no build for the CPU torch wheel of the test tier; spandrel and kornia pull
torchvision or a torch build of their own. ComfyUI imports them at module level in code the SD1.5 path never
runs (0.3.64: Stable Cascade, Cosmos; newer releases also `import torchaudio` in comfy/sd.py's import chain,
comfy/ldm/lightricks/vae/audio_vae.py). PyAV (`av`, a 35 MB wheel) is imported at module level by comfy_api's
video and UI types (comfy_api/latest/_ui.py, _input_impl/video_types.py) and is missing on a bare CUDA image
(../shared/gpu-kit). Each of tools/import_standins/<name>/ is one sys.path entry holding one
stand-in package, put on the path only when the real package is missing (tools/import_standins/__init__.py:
import_standin_paths). In a stand-in every attribute and submodule exists (`from torchvision.ops import
roi_align`, `import torchaudio.functional as AF`, subclassing all import), and calling or instantiating any of
them raises, so a real use fails loudly. Never shipped, never imported by the pack.

spandrel matters to the browser test: without it ComfyUI skips comfy_extras/nodes_upscale_model.py, so "Load
Upscale Model" is missing from /object_info, and ComfyUI's frontend (whose model-to-node table lists it) fails
while building model widgets. With the stand-in the node registers as in a user's ComfyUI.
"""
from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
import types

_ROOTS: set[str] = set()


class _UnavailableType(type):
    """Type of every stand-in attribute: any attribute of it is another stand-in; calling it raises."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return unavailable(f"{cls.__module__}.{cls.__qualname__}.{name}")

    def __call__(cls, *args, **kwargs):
        raise RuntimeError(f"{cls.__module__}.{cls.__qualname__} is not available: tools/import_standins holds an "
                           "import-only stand-in for this package (install the real package to use it)")


def unavailable(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return _UnavailableType(name, (), {"__module__": module, "__qualname__": name})


class StandinModule(types.ModuleType):
    """A stand-in package or submodule: any missing attribute is an `unavailable` stand-in."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = unavailable(f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _SubmoduleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes every submodule of a stand-in package importable, as another StandinModule."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] in _ROOTS and "." in fullname:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = StandinModule(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        pass


_FINDER = _SubmoduleFinder()


def make_standin(package_name: str, version: str = "0.0.0+import-standin") -> None:
    """Turn the package being imported (its __init__ calls this) into a stand-in, submodules included."""
    module = sys.modules[package_name]
    module.__class__ = StandinModule
    module.__version__ = version
    _ROOTS.add(package_name)
    if _FINDER not in sys.meta_path:
        sys.meta_path.append(_FINDER)
