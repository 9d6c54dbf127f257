"""The V3 nodes that take ComfyUI objects, call sine_ops, and wrap the results."""
from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .adapter_nodes import LoadSineAdapter, SaveSineAdapter, SineApplyAdapter
from .finetune import SineFinetune
from .guidance import SineAddFinetuned, SineGuidedSampler, SineGuiderNode
from .lora_import import SineLoraAsAdapter
from .patch import PatchResolutionConfig
from .sweep import SineSweep

NODES = [SineFinetune, SineGuiderNode, SineGuidedSampler, SineAddFinetuned, PatchResolutionConfig,
         SaveSineAdapter, LoadSineAdapter, SineApplyAdapter, SineLoraAsAdapter, SineSweep]


class SineExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> SineExtension:
    return SineExtension()
