"""Patching ComfyUI's ModelPatcher / CLIP objects with sine_ops adapters and the positional grid.

Everything goes through ModelPatcher object patches on clones, so the user's MODEL and CLIP are never modified:
- an adapted layer gets `<layer>.forward` replaced by sine_ops' AdaptedForward (the module tree, weight keys and
  ComfyUI's own weight patches such as a stock LoRA stay as they are);
- the positional grid is an `input_block_patch`, which ComfyUI's UNet calls after input block 0 (conv_in),
  before the skip connection is stored: SINE's injection point (docs/method.md §3);
- rows are routed per forward call by a `model_function_wrapper` (RoutingWrapper), which also tells the adapted
  layers which model instance is running.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch

import comfy.model_management
import comfy.utils

from ..sine_ops.adapters import (AdaptedForward, FullDelta, LoRA, MergeGroup, RowRouter, SharedDown, adaptable_layers,
                                conv_spec)
from ..sine_ops.config import LAYER_SETS, SHARED_INPUT_LAYERS, TEXT_ENCODER_LORA_LAYERS
from ..sine_ops.positional_grid import add_grid_to_rows, grid_for_boxes, positional_grid
from ..sine_ops.sine_adapter import SineAdapter
from ..sine_ops.tensor_views import normal_view
from . import comfy_compat as compat
from .errors import InputError

# ComfyUI model_config class name -> the family an adapter is bound to (and its sizes in sine_ops.config)
_FAMILIES = {"SD15": "sd1", "SD20": "sd2", "SD21UnclipL": "sd2", "SD21UnclipH": "sd2", "SDXL": "sdxl",
             "SDXLRefiner": "sdxl_refiner", "SSD1B": "sdxl", "Segmind_Vega": "sdxl", "KOALA_700M": "sdxl",
             "KOALA_1B": "sdxl"}

# transformer_options keys this pack sets per call
CROP_GRID_KEY = "sine_crop_grid"     # (B, C, H, W) the training crops' windows of the positional grid, this forward
COND_OWNER_KEY = "sine_cond_owner"   # cond index -> adapter id (-1 = base model) for this sampling step
FINETUNED_FLAG = "sine_finetuned"    # on SINE Finetune's MODEL output: the guider refuses it as a base


def model_family(model) -> str:
    name = type(model.model.model_config).__name__
    return _FAMILIES.get(name, name.lower())


def has_unet_input_conv(model) -> bool:
    unet = getattr(model.model, "diffusion_model", None)
    return unet is not None and hasattr(unet, "input_blocks") and isinstance(unet.input_blocks[0][0], torch.nn.Conv2d)


def unet_layers(model, layer_set: str) -> list[tuple[str, torch.nn.Module]]:
    """[(path from the ModelPatcher's model, module)] of the UNet layers to adapt."""
    suffixes = LAYER_SETS[layer_set]
    found = adaptable_layers(model.model.diffusion_model,
                             None if suffixes is None else lambda name, m: name.endswith(suffixes), compat.layer_kind)
    return [(f"diffusion_model.{name}", m) for name, m in found]


def text_encoder_layers(clip, mode: str) -> list[tuple[str, torch.nn.Module]]:
    """[(path in clip.cond_stage_model, module)] of the text-encoder layers to adapt ("lora" or "full")."""
    return adaptable_layers(clip.cond_stage_model,
                            (lambda name, m: name.endswith(TEXT_ENCODER_LORA_LAYERS)) if mode == "lora" else None,
                            compat.layer_kind)


def max_lora_rank(module: torch.nn.Module) -> int:
    """Largest useful LoRA rank of a layer: min(out, fan_in). Smaller layers (e.g. the 4-channel output conv)
    get their full rank instead of the requested one; see SineFinetune's lora_rank tooltip."""
    out_features, *fan_in = module.weight.shape  # the shape only: the weight may be mid-move (see tensor_views)
    return min(out_features, math.prod(fan_in))


def new_adapter(module: torch.nn.Module, method: str, rank: int, alpha: float, generator: torch.Generator):
    if method == "lora":
        return LoRA(tuple(module.weight.shape), min(rank, max_lora_rank(module)), alpha,
                    conv=conv_spec(module, compat.layer_kind(module)), generator=generator)
    return FullDelta(tuple(module.weight.shape), None if module.bias is None else tuple(module.bias.shape),
                     conv=conv_spec(module, compat.layer_kind(module)))


def _bind(root: torch.nn.Module, path: str, adapter: torch.nn.Module, input_name: str):
    """The layer at `path`, after checking the adapter fits it (a file may come from another model)."""
    try:
        module = comfy.utils.get_attr(root, path)
    except AttributeError:
        raise InputError(input_name, f"the adapter has a layer '{path}' that this model lacks; it was trained on "
                                     f"a different model family. Connect a {input_name} of the family it was "
                                     "trained on.") from None
    if tuple(module.weight.shape) != adapter.weight_shape:
        raise InputError(input_name, f"layer '{path}' is {tuple(module.weight.shape)} in this model but "
                                     f"{adapter.weight_shape} in the adapter; connect a {input_name} of the family "
                                     "the adapter was trained on.")
    if adapter.conv is not None:
        spec = conv_spec(module, compat.layer_kind(module))
        spec.pop("groups")
        adapter.conv = spec
    return module


def shared_downs(adapters: dict[str, torch.nn.Module]) -> dict[str, tuple[SharedDown, int]]:
    """path -> (SharedDown, index) for the Linear LoRAs of sibling layers that share an input (SHARED_INPUT_LAYERS:
    to_q / to_k / to_v), so their down projections run as one while sampling."""
    out = {}
    for names in SHARED_INPUT_LAYERS:
        parents: dict[tuple, list[str]] = {}  # (parent, input width) -> siblings: cross-attention's query has
        for path, adapter in adapters.items():  # another width than its key and value (the context's)
            parent, _, leaf = path.rpartition(".")
            if leaf in names:
                parents.setdefault((parent, getattr(adapter, "weight_shape", (0, 0))[1]), []).append(path)
        for paths in parents.values():
            paths.sort(key=lambda p: names.index(p.rpartition(".")[2]))
            loras = [adapters[p] for p in paths]
            if len(loras) > 1 and all(isinstance(a, LoRA) and a.conv is None for a in loras):
                group = SharedDown(loras)
                out.update({p: (group, i) for i, p in enumerate(paths)})
    return out


def merge_groups(adapters: dict[str, torch.nn.Module]) -> dict[str, tuple[MergeGroup, int]]:
    """path -> (MergeGroup, index) for the LoRAs whose layers share a weight shape, rank and scale, so a training
    forward merges their weights as one batched multiply-add (sine_ops MergeGroup)."""
    by_shape: dict[tuple, list[str]] = {}
    for path, adapter in adapters.items():
        if isinstance(adapter, LoRA):
            by_shape.setdefault((adapter.weight_shape, adapter.rank, adapter.scale), []).append(path)
    out = {}
    for paths in by_shape.values():
        if len(paths) > 1:
            group = MergeGroup([adapters[p] for p in paths])
            out.update({p: (group, i) for i, p in enumerate(paths)})
    return out


def attach_adapters(patcher, groups: dict[int, dict[str, torch.nn.Module]], router: RowRouter,
                    input_name: str) -> None:
    """Patch every adapted layer's forward on `patcher` (a clone): one AdaptedForward per layer, all ids on it.
    One adapter id (a model being trained) also gets its layers' merge groups."""
    by_path: dict[str, dict[int, torch.nn.Module]] = {}
    shared: dict[str, dict[int, tuple]] = {}
    for adapter_id, adapters in groups.items():
        for path, adapter in adapters.items():
            by_path.setdefault(path, {})[adapter_id] = adapter
        for path, member in shared_downs(adapters).items():
            shared.setdefault(path, {})[adapter_id] = member
    merge = merge_groups(next(iter(groups.values()))) if len(groups) == 1 else {}
    for path, adapters in by_path.items():
        module = None
        for adapter in adapters.values():
            module = _bind(patcher.model, path, adapter, input_name)
        patcher.add_object_patch(f"{path}.forward", AdaptedForward(module, path, adapters, router, shared.get(path),
                                                                   merge.get(path)))


class RoutingWrapper:
    """model_function_wrapper: routes the rows of each forward call to their adapters, on the model that runs.

    The guider puts `COND_OWNER_KEY` (cond index -> adapter id) in the call's transformer_options; ComfyUI passes
    `cond_or_uncond` (the cond index of every chunk of the batch). Without an owner list every row is the
    fine-tuned model's. Routing is per call (sine_ops RowRouter), so concurrent forwards do not interfere.
    """

    def __init__(self, router: RowRouter, previous=None):
        self.router, self.previous = router, previous  # an earlier wrapper on the input MODEL is chained

    def __call__(self, apply_model, args):
        owners = args["c"].get("transformer_options", {}).get(COND_OWNER_KEY)
        row_owner = None
        if owners is not None:
            chunks = args["cond_or_uncond"]
            per_chunk = args["input"].shape[0] // len(chunks)
            row_owner = [owners[c] for c in chunks for _ in range(per_chunk)]  # host values: no device op
        # apply_model is the running BaseModel's bound method: its owner is the model whose layers must be used
        with self.router.route(row_owner, root=getattr(apply_model, "__self__", None)):
            if self.previous is not None:
                return self.previous(apply_model, args)
            return apply_model(args["input"], args["timestep"], **args["c"])


class WeightViews:
    """Zero-copy normal views of frozen weights (sine_ops.tensor_views), made once per weight and shared by the
    layers of one training run. A view keeps the storage it was taken of alive, so they are released before
    ComfyUI may move weights (else a moved model would be held twice) and when the run ends."""

    def __init__(self):
        self._views: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}  # id -> (weight, address, view)
        # installed(): (root, the parameter dicts of its modules that own weights), found once: walking the UNet's
        # ~850 modules at every step made a swap 1.3 ms instead of 0.5 ms (SD1.5, CPU). Loads move weights but keep
        # the modules and their parameter dicts.
        self._owners: tuple[torch.nn.Module, list[dict]] | None = None

    def of(self, weight: torch.Tensor) -> torch.Tensor:
        entry = self._views.get(id(weight))
        if entry is None or entry[0] is not weight or entry[1] != weight.data_ptr():
            entry = self._views[id(weight)] = (weight, weight.data_ptr(), normal_view(weight))
        return entry[2]

    def release(self) -> None:
        self._views.clear()

    @contextmanager
    def installed(self, root: torch.nn.Module):
        """Every weight under `root` replaced by its view for the enclosed forward, then given back: the compiled
        training forward, which must not take views itself (torch.compile cannot trace them). The uncompiled one
        swaps per layer instead (TrainableWeights), which gradient checkpointing's recompute needs."""
        if self._owners is None or self._owners[0] is not root:
            self._owners = (root, [m._parameters for m in root.modules()
                                   if any(p is not None for p in m._parameters.values())])
        swapped = []
        for params in self._owners[1]:
            own = {name: p for name, p in params.items() if p is not None}
            swapped.append((params, own))
            params.update({name: self.of(p) for name, p in own.items()})
        try:
            yield
        finally:
            for params, own in swapped:
                params.update(own)


class TrainableWeights:
    """Replacement for a layer's forward on a training clone: the layer runs on normal views of its own weights,
    which autograd can save (ComfyUI's weights are inference tensors), then gets its weights back.

    The views are of the weights ComfyUI has loaded for this clone at call time: on a GPU, after this clone's
    weight patches (e.g. a LoRA on the input MODEL) were applied and any other clone's removed. Nothing stays
    swapped between calls, so ComfyUI's loads and offloads only ever see its own parameters. `inner` is the forward
    the layer already had on the clone (an adapter's AdaptedForward, an input guard), None for the class forward.
    """

    def __init__(self, module: torch.nn.Module, views: WeightViews, inner=None):
        self.module, self.views, self.inner = module, views, inner

    def __call__(self, *args, **kwargs):
        params = self.module._parameters
        own = {name: p for name, p in params.items() if p is not None}
        for name, p in own.items():
            params[name] = self.views.of(p)
        try:
            if self.inner is not None:
                return self.inner(*args, **kwargs)
            return type(self.module).forward(self.module, *args, **kwargs)
        finally:
            params.update(own)


def attach_trainable_weights(patcher, views: WeightViews, prefix: str = "") -> None:
    """Every layer with weights under `prefix` of a training clone runs on autograd-safe views of them (see
    TrainableWeights); forwards already patched on the clone run inside. The user's modules keep their parameters;
    only this clone's forwards change."""
    for name, module in patcher.model.named_modules():
        if name and name.startswith(prefix) and any(p is not None for p in module._parameters.values()):
            key = f"{name}.forward"
            patcher.add_object_patch(key, TrainableWeights(module, views, patcher.object_patches.get(key)))


def _clone_input_forward(module):
    cls_forward = type(module).forward

    def forward(x, *args, **kwargs):
        return cls_forward(module, x.clone(), *args, **kwargs)
    return forward


def attach_inplace_guards(patcher) -> None:
    """Training clone of a text encoder: LayerNorms see a copy of their input. Call before
    attach_trainable_weights, which wraps these forwards.

    ComfyUI's CLIP layers update the residual stream in place (`x += attn(norm(x))`), which overwrites the
    tensor LayerNorm saved for its backward pass; a copy keeps it intact (~300 KB per layer at 77 tokens).
    """
    for name, m in patcher.model.named_modules():
        if isinstance(m, torch.nn.LayerNorm):
            patcher.add_object_patch(f"{name}.forward", _clone_input_forward(m))


def _checkpointed(module):
    """forward of a UNet block recomputed in the backward pass (gradient checkpointing) instead of stored."""
    cls_forward = type(module).forward

    def forward(*args, **kwargs):
        return torch.utils.checkpoint.checkpoint(cls_forward, module, *args, use_reentrant=False, **kwargs)
    return forward


def attach_gradient_checkpointing(patcher) -> None:
    """Every input and output block of the UNet recomputes its activations in the backward pass."""
    unet = patcher.model.diffusion_model
    for prefix, blocks in (("input_blocks", unet.input_blocks), ("output_blocks", unet.output_blocks)):
        for i, block in enumerate(blocks):
            patcher.add_object_patch(f"diffusion_model.{prefix}.{i}.forward", _checkpointed(block))


class PositionalGrids:
    """Each patch-trained adapter's fixed positional grid, made once per (grid size, channels, device), and its
    windows resized to a feature map."""

    def __init__(self):
        self._grids: dict = {}

    def windows(self, adapter: SineAdapter, boxes: torch.Tensor | None, channels: int, hw: tuple,
                device) -> torch.Tensor:
        """(B, C, *hw): each box's window of the grid (boxes (B, 4) on the CPU); boxes None: (1, C, *hw), the
        whole grid (sampling at any size: the whole canvas is the whole source image)."""
        key = (adapter.patch.grid_size, channels, str(device))
        if key not in self._grids:
            self._grids[key] = positional_grid(adapter.patch.grid_size, channels).to(device)
        return grid_for_boxes(self._grids[key], boxes, hw, adapter.patch.interpolation)


class GridInjector:
    """input_block_patch adding SINE's positional grid at ("input", 0) to the rows of patch-trained adapters.

    A training forward's transformer_options carry CROP_GRID_KEY: the crops' grid windows, made by the training
    loop before the forward (the boxes are read on the host, which a compiled forward cannot do); without it the
    whole grid is resized to the feature map.
    """

    def __init__(self, router: RowRouter, adapters: dict[int, SineAdapter]):
        self.router = router
        self.adapters = {i: a for i, a in adapters.items() if a.patch is not None and a.grid_enabled}
        self.grids = PositionalGrids()

    def __call__(self, h: torch.Tensor, transformer_options: dict) -> torch.Tensor:
        if transformer_options.get("block") != ("input", 0):
            return h
        crop_grid = transformer_options.get(CROP_GRID_KEY)
        for adapter_id, adapter in self.adapters.items():
            rows = self.router.rows(adapter_id, h.shape[0], h.device)
            if rows is None:
                continue
            grid = crop_grid if crop_grid is not None else \
                self.grids.windows(adapter, None, h.shape[1], tuple(h.shape[-2:]), h.device)
            h = add_grid_to_rows(h, grid * adapter.grid_scale, rows)
        return h


def patched_model(model, adapters: dict[int, SineAdapter], router: RowRouter):
    """A clone of `model` carrying the UNet side of `adapters` (and their grids), routed by `router` per call."""
    m = model.clone()
    attach_adapters(m, {i: a.unet for i, a in adapters.items()}, router, "model")
    if any(a.patch is not None for a in adapters.values()):
        m.set_model_input_block_patch(GridInjector(router, adapters))
    m.set_model_unet_function_wrapper(RoutingWrapper(router, model.model_options.get("model_function_wrapper")))
    return m


def patched_clip(clip, adapter: SineAdapter):
    """A clone of `clip` with the text-encoder adapter always on; the input CLIP itself when there is none."""
    if not adapter.text_encoder:
        return clip
    c = clip.clone()
    attach_adapters(c.patcher, {0: adapter.text_encoder}, RowRouter(), "clip")
    return c


def check_family(adapter: SineAdapter, model, input_name: str = "model") -> None:
    family = model_family(model)
    if adapter.family != family:
        raise InputError(input_name, f"the SINE adapter was trained on a {adapter.family} model but this is "
                                     f"{family}; connect the checkpoint it was fine-tuned from.")
    if adapter.patch is not None and not has_unet_input_conv(model):
        raise InputError(input_name, "patch-based adapters need a UNet with an input conv (SD1.x/SD2.x/SDXL).")


def model_kwargs(model, cond_entry, x: torch.Tensor, device) -> dict:
    """The keyword inputs ComfyUI's apply_model takes for one CONDITIONING entry (c_crossattn, SDXL's y, ...)."""
    cond, extra = cond_entry
    conds = model.model.extra_conds(cross_attn=cond, pooled_output=extra.get("pooled_output"), noise=x,
                                    device=device, width=x.shape[-1] * 8, height=x.shape[-2] * 8)
    return {k: v.process_cond(batch_size=x.shape[0], device=device, area=None).cond.to(device)
            for k, v in conds.items()}


def device_of(model) -> torch.device:
    return model.load_device if model.load_device is not None else comfy.model_management.get_torch_device()


def fresh_crops_cheap(model) -> bool:
    """Whether a VAE encode per training step is cheap beside the step (patch mode's crop_bank -1): on a CUDA or XPU
    GPU that holds the model. On the CPU, and under --lowvram/--novram where the weights stream in, the bank wins."""
    vram = comfy.model_management.vram_state
    return device_of(model).type in ("cuda", "xpu") and vram not in (comfy.model_management.VRAMState.LOW_VRAM,
                                                                    comfy.model_management.VRAMState.NO_VRAM)
