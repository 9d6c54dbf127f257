"""ComfyUI glue: V3 nodes that take ComfyUI objects, call sine_ops, and wrap the results."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .patch import PatchResolutionConfig


class SineExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [PatchResolutionConfig]


async def comfy_entrypoint() -> SineExtension:
    return SineExtension()
