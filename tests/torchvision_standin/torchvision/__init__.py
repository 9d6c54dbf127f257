"""Import-only stand-in for torchvision, for the ComfyUI test tier only (never shipped, never used by the pack).

ComfyUI 0.3.x imports torchvision at module level in Stable Cascade / Cosmos / ACE code that the SD1.5 path
never runs, and no torchvision on the package registry loads with the CPU torch wheel used here. The harness
puts this folder on sys.path only when no real torchvision is importable. Any real use fails loudly.
"""
from . import transforms  # noqa: F401  (`from torchvision import transforms` must import)


def __getattr__(name):
    raise AttributeError(f"torchvision.{name} is not available: tests/torchvision_standin is an import-only stand-in")
