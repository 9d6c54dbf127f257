"""Attaching sine_ops adapters and the positional grid to ComfyUI's ModelPatcher / CLIP objects.

Everything goes through ModelPatcher object patches on clones, so the user's MODEL and CLIP are never modified:
- an adapted layer gets `<layer>.forward` replaced by sine_ops' AdaptedForward (the module tree, weight keys and
  ComfyUI's own weight patches such as a stock LoRA stay as they are);
- the positional grid is an `input_block_patch`, which ComfyUI's UNet calls after input block 0 (conv_in),
  before the skip connection is stored: SINE's injection point (SINE_METHOD.md §3).
"""
from __future__ import annotations

import torch

import comfy.model_management
import comfy.utils

from ..sine_ops.adapter_set import SineAdapter
from ..sine_ops.adapters import AdaptedForward, FullDelta, LoRA, RowRouter, adaptable_layers, conv_spec
from ..sine_ops.positional_grid import add_grid_to_rows, grid_for_boxes, positional_grid
from ..sine_ops.training import normal_tensor_view

_FAMILIES = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl",
             "SDXLRefiner": "sdxl_refiner", "SSD1B": "sdxl", "Segmind_Vega": "sdxl", "KOALA_700M": "sdxl",
             "KOALA_1B": "sdxl"}

UNET_LAYER_SETS = {
    "attention": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0",
                  "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"),
    "attention+ff": ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"),
    "all": None,  # every Linear and Conv2d
}
TE_LORA_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                  "mlp.fc1", "mlp.fc2")


class SineNodeError(ValueError):
    """A user-facing error: the message names the node and the input to fix."""


def model_family(model) -> str:
    name = type(model.model.model_config).__name__
    return _FAMILIES.get(name, name.lower())


def has_unet_input_conv(model) -> bool:
    unet = getattr(model.model, "diffusion_model", None)
    return unet is not None and hasattr(unet, "input_blocks") and isinstance(unet.input_blocks[0][0], torch.nn.Conv2d)


def unet_layers(model, layer_set: str) -> list[tuple[str, torch.nn.Module]]:
    """[(path from the ModelPatcher's model, module)] of the UNet layers to adapt."""
    suffixes = UNET_LAYER_SETS[layer_set]
    found = adaptable_layers(model.model.diffusion_model,
                             None if suffixes is None else lambda name, m: name.endswith(suffixes))
    return [(f"diffusion_model.{name}", m) for name, m in found]


def text_encoder_layers(clip, mode: str) -> list[tuple[str, torch.nn.Module]]:
    """[(path in clip.cond_stage_model, module)] of the text-encoder layers to adapt ("lora" or "full")."""
    return adaptable_layers(clip.cond_stage_model,
                            (lambda name, m: name.endswith(TE_LORA_LAYERS)) if mode == "lora" else None)


def max_lora_rank(module: torch.nn.Module) -> int:
    """Largest useful LoRA rank of a layer: min(out, fan_in). Smaller layers (e.g. the 4-channel output conv)
    get their full rank instead of the requested one; see SineFinetune's lora_rank tooltip."""
    return min(module.weight.shape[0], module.weight[0].numel())


def new_adapter(module: torch.nn.Module, method: str, rank: int, alpha: float, generator: torch.Generator):
    if method == "lora":
        return LoRA(tuple(module.weight.shape), rank, alpha, conv=conv_spec(module), generator=generator)
    return FullDelta(tuple(module.weight.shape), None if module.bias is None else tuple(module.bias.shape),
                     conv=conv_spec(module))


def _bind(root: torch.nn.Module, path: str, adapter: torch.nn.Module, node: str, input_name: str):
    """The layer at `path`, after checking the adapter fits it (a file may come from another model)."""
    try:
        module = comfy.utils.get_attr(root, path)
    except AttributeError:
        raise SineNodeError(f"{node}: the adapter has a layer '{path}' that this model lacks; it was trained on a "
                            f"different model family. Connect a {input_name} of the family it was trained on.")
    if tuple(module.weight.shape) != adapter.weight_shape:
        raise SineNodeError(f"{node}: layer '{path}' is {tuple(module.weight.shape)} in this model but "
                            f"{adapter.weight_shape} in the adapter; connect a {input_name} of the family the "
                            "adapter was trained on.")
    if adapter.conv is not None:
        spec = conv_spec(module)
        spec.pop("groups")
        adapter.conv = spec
    return module


def attach_adapters(patcher, groups: dict[int, dict[str, torch.nn.Module]], router: RowRouter, node: str,
                    input_name: str) -> None:
    """Patch every adapted layer's forward on `patcher` (a clone): one AdaptedForward per layer, all ids on it."""
    by_path: dict[str, dict[int, torch.nn.Module]] = {}
    for adapter_id, adapters in groups.items():
        for path, adapter in adapters.items():
            by_path.setdefault(path, {})[adapter_id] = adapter
    for path, adapters in by_path.items():
        module = None
        for adapter in adapters.values():
            module = _bind(patcher.model, path, adapter, node, input_name)
        patcher.add_object_patch(f"{path}.forward", AdaptedForward(module, adapters, router))


def attach_trainable_views(patcher, prefix: str = "") -> None:
    """Frozen, autograd-safe views of the base weights for a training clone (see normal_tensor_view).

    The user's parameters keep their storage and their requires_grad flags; only this clone sees the views.
    """
    for name, p in patcher.model.named_parameters():
        if name.startswith(prefix):
            patcher.add_object_patch(name, torch.nn.Parameter(normal_tensor_view(p.detach()), requires_grad=False))


def _clone_input_forward(module):
    cls_forward = type(module).forward

    def forward(x, *args, **kwargs):
        return cls_forward(module, x.clone(), *args, **kwargs)
    return forward


def attach_inplace_guards(patcher) -> None:
    """Training clone of a text encoder: LayerNorms see a copy of their input.

    ComfyUI's CLIP layers update the residual stream in place (`x += attn(norm(x))`), which overwrites the
    tensor LayerNorm saved for its backward pass; a copy keeps it intact (~300 KB per layer at 77 tokens).
    """
    for name, m in patcher.model.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            patcher.add_object_patch(f"{name}.forward", _clone_input_forward(m))


class GridInjector:
    """input_block_patch adding SINE's positional grid at ("input", 0) to the rows of patch-trained adapters.

    `boxes` (B, 4) selects per-row grid windows during training; None = the full grid resized to the latent
    (sampling at any size: the whole canvas is the whole source image).
    """

    def __init__(self, router: RowRouter, adapters: dict[int, SineAdapter]):
        self.router = router
        self.adapters = {i: a for i, a in adapters.items() if a.patch is not None and a.grid_enabled}
        self.boxes: torch.Tensor | None = None
        self._grids: dict = {}

    def _grid(self, adapter: SineAdapter, channels: int, device) -> torch.Tensor:
        key = (adapter.patch.grid_size, channels, str(device))
        if key not in self._grids:
            self._grids[key] = positional_grid(adapter.patch.grid_size, channels).to(device)
        return self._grids[key]

    def __call__(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        if transformer_options.get("block") != ("input", 0):
            return h
        for adapter_id, adapter in self.adapters.items():
            rows = self.router.rows(adapter_id, h.shape[0], h.device)
            if rows is None:
                continue
            grid = grid_for_boxes(self._grid(adapter, h.shape[1], h.device), self.boxes, tuple(h.shape[-2:]),
                                  adapter.patch.interpolation)
            h = add_grid_to_rows(h, grid * adapter.grid_scale, rows)
        return h


def patched_model(model, adapters: dict[int, SineAdapter], router: RowRouter, node: str):
    """A clone of `model` carrying the UNet side of `adapters` (and their grids), routed by `router`."""
    m = model.clone()
    attach_adapters(m, {i: a.unet for i, a in adapters.items()}, router, node, "MODEL")
    injector = GridInjector(router, adapters)
    if any(a.patch is not None for a in adapters.values()):
        m.set_model_input_block_patch(injector)
    return m, injector


def patched_clip(clip, adapter: SineAdapter, node: str):
    """A clone of `clip` with the text-encoder adapter always on; the input CLIP itself when there is none."""
    if not adapter.text_encoder:
        return clip
    c = clip.clone()
    attach_adapters(c.patcher, {0: adapter.text_encoder}, RowRouter(), node, "CLIP")
    return c


def check_family(adapter: SineAdapter, model, node: str, input_name: str = "model") -> None:
    family = model_family(model)
    if adapter.family != family:
        raise SineNodeError(f"{node}: the SINE adapter was trained on a {adapter.family} model but '{input_name}' is "
                            f"{family}; connect the checkpoint it was fine-tuned from.")
    if adapter.patch is not None and not has_unet_input_conv(model):
        raise SineNodeError(f"{node}: patch-based adapters need a UNet with an input conv (SD1.x/SD2.x/SDXL).")


def device_of(model) -> torch.device:
    return model.load_device if model.load_device is not None else comfy.model_management.get_torch_device()
