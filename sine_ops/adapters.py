"""Weight adapters (LoRA, full delta) for Linear/Conv2d layers, with per-row routing for mixed batches.

An adapter never touches the base layer: it adds an activation-space delta after the layer's own forward, so
rows of a batch that no adapter owns get exactly the base output, and the base weights stay frozen and shareable.
"""
import contextvars
import copy
import functools
import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


LayerKind = Callable[[nn.Module], "str | None"]


def torch_layer_kind(layer: nn.Module) -> str | None:
    """"linear", "conv2d" or None (not adaptable), by torch class; ComfyUI's ops subclass these."""
    if isinstance(layer, nn.Linear):
        return "linear"
    if isinstance(layer, nn.Conv2d):
        return "conv2d"
    return None


def conv_spec(layer: nn.Module, kind: str | None = None) -> dict | None:
    """The conv arguments an adapter must share with `layer` (None for Linear); `kind` as layer_kind says."""
    kind = kind or torch_layer_kind(layer)
    if kind == "linear":
        return None
    if kind != "conv2d":
        raise ValueError(f"only Linear and Conv2d layers can be adapted, got {type(layer).__name__}")
    # The adapter conv pads with zeros, so any other padding mode would shift its delta against the base output.
    if layer.padding_mode != "zeros":
        raise ValueError(f"Conv2d with padding_mode={layer.padding_mode!r} is not supported")
    return dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)


def _check_conv(weight_shape: tuple, conv: dict | None) -> dict | None:
    if len(weight_shape) == 2:
        if conv is not None:
            raise ValueError("conv arguments given for a Linear weight shape (out, in)")
        return None
    if len(weight_shape) != 4:
        raise ValueError(f"weight shape must be (out, in) or (out, in, kh, kw), got {tuple(weight_shape)}")
    conv = dict(conv or {})
    if conv.pop("groups", 1) != 1:
        raise ValueError("grouped convolutions (groups != 1) are not supported")
    return conv


def _apply(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, conv: dict | None) -> torch.Tensor:
    return F.linear(x, weight, bias) if conv is None else F.conv2d(x, weight, bias, **conv)


class LoRA(nn.Module):
    """Low-rank weight delta scale * up @ down (LoRA, Hu et al. 2021; init as PEFT: kaiming-uniform down, zero up)."""

    def __init__(self, weight_shape: tuple, rank: int, alpha: float, *, conv: dict | None = None,
                 dtype=torch.float32, device=None, generator: torch.Generator | None = None):
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.conv = _check_conv(self.weight_shape, conv)
        out_ch, in_ch, *kernel = self.weight_shape
        fan_in = in_ch * math.prod(kernel)
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if rank > min(out_ch, fan_in):
            raise ValueError(f"LoRA rank {rank} is larger than layer ({out_ch} x {fan_in}); "
                             f"use a rank <= {min(out_ch, fan_in)}")
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        # Initialise in fp32 on the generator's device: a seed gives the same adapter whatever its dtype/device.
        down = torch.empty(rank, in_ch, *kernel, device=generator.device if generator is not None else "cpu")
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.down = nn.Parameter(down.to(device=device, dtype=dtype))  # (rank, in[, kh, kw])
        # (out, rank[, 1, 1]), zero so the adapted model starts identical to the base
        self.up = nn.Parameter(torch.zeros(out_ch, rank, *(1,) * len(kernel), dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Activation-space delta only: up(down(x)) * scale, the down conv carrying the base conv's stride/padding."""
        down, up = self.down.to(x), self.up.to(x)
        h = _apply(x, down, None, self.conv)
        return _apply(h, up, None, None if self.conv is None else {}) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """(out, in[, kh, kw]) fp32: a 1x1 up conv after the down conv equals one conv with kernel up @ down."""
        return (self.up.float().flatten(1) @ self.down.float().flatten(1)).reshape(self.weight_shape) * self.scale

    def delta_bias(self) -> None:
        return None


class FullDelta(nn.Module):
    """Dense trainable delta for a full fine-tune of one layer (SINE fine-tunes every UNet/CLIP weight, §2)."""

    def __init__(self, weight_shape: tuple, bias_shape: tuple | None, *, conv: dict | None = None,
                 dtype=torch.float32, device=None):
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.conv = _check_conv(self.weight_shape, conv)
        self.weight = nn.Parameter(torch.zeros(self.weight_shape, dtype=dtype, device=device))
        self.bias = None if bias_shape is None else nn.Parameter(torch.zeros(bias_shape, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Activation-space delta: the layer op with (dW, db); linear in the weights, so base + delta = merged."""
        return _apply(x, self.weight.to(x), None if self.bias is None else self.bias.to(x), self.conv)

    def delta_weight(self) -> torch.Tensor:
        return self.weight.float()

    def delta_bias(self) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.float()


class RowRouter:
    """Which batch rows each adapter id owns during the forward that runs in this thread (or asyncio task).

    Routing lives in a ContextVar set around each forward call, never in shared state, so forwards on several
    threads (ComfyUI's multi-GPU workers call the model wrapper from worker threads) route independently.
    Outside `route`: every adapter applies to all rows (training, or a fine-tuned model on its own).
    `route(row_owner)`: (B,) long, -1 = base row, k = row owned by adapter id k (one batch mixing base and
    fine-tuned rows); `root`: the model that is running, so adapted layers use that model's modules even when
    their patch was copied onto another model (see AdaptedForward).
    """

    def __init__(self):
        self._state: contextvars.ContextVar[_Routing | None] = contextvars.ContextVar("sine_routing", default=None)

    def rows(self, adapter_id: int, batch: int, device=None) -> slice | torch.Tensor | None:
        """slice(None) = all rows, a LongTensor of row indices, or None = no rows (skip the adapter)."""
        state = self._state.get()
        if state is None or state.row_owner is None:
            return slice(None)
        if state.row_owner.shape[0] != batch:
            raise ValueError(f"row_owner has {state.row_owner.shape[0]} entries but the batch has {batch} rows")
        key = (adapter_id, str(device))
        if key not in state.cache:  # every adapted layer asks the same question once per forward
            idx = (state.row_owner == adapter_id).nonzero().flatten()
            state.cache[key] = None if idx.numel() == 0 else slice(None) if idx.numel() == batch else idx.to(device)
        return state.cache[key]

    def running_root(self) -> nn.Module | None:
        state = self._state.get()
        return None if state is None else state.root

    @contextmanager
    def route(self, row_owner, root: nn.Module | None = None):
        """Set row ownership (None = all rows) for the enclosed forward(s) of this thread; always restored."""
        owner = None if row_owner is None else torch.as_tensor(row_owner, dtype=torch.long).flatten().cpu()
        token = self._state.set(_Routing(owner, root, {}))
        try:
            yield self
        finally:
            self._state.reset(token)


@dataclass
class _Routing:
    row_owner: torch.Tensor | None
    root: nn.Module | None
    cache: dict  # (adapter id, device) -> rows, filled by the first layer that asks


class AdaptedForward:
    """Replacement for `module.forward`: the class forward (the base output) plus each routed adapter's delta.

    `path` locates the layer from the model root it was made for. When the router names another running root
    (the patch was copied onto a patcher over another model instance: ComfyUI's non-dynamic delegates, multi-GPU
    clones), the layer is looked up there, so the base output always comes from the model that runs.
    """

    def __init__(self, module: nn.Module, path: str, adapters: dict[int, nn.Module], router: RowRouter):
        self.module, self.path, self.adapters, self.router = module, path, dict(adapters), router
        self._modules_by_root: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._adapters_by_device: dict = {}  # frozen per-device copies (a model copy on a second GPU)

    def _module(self) -> nn.Module:
        root = self.router.running_root()
        if root is None:
            return self.module
        module = self._modules_by_root.get(root)
        if module is None:
            module = self._modules_by_root[root] = functools.reduce(getattr, self.path.split("."), root)
        return module

    def _adapter_on(self, adapter_id: int, adapter: nn.Module, device: torch.device) -> nn.Module:
        if next(adapter.parameters()).device == device:
            return adapter
        if any(p.requires_grad for p in adapter.parameters()):
            adapter.to(device)  # training: the trained parameters themselves follow the model
            return adapter
        key = (adapter_id, str(device))
        if key not in self._adapters_by_device:  # sampling: one frozen copy per device, never moved back and forth
            self._adapters_by_device[key] = copy.deepcopy(adapter).to(device)
        return self._adapters_by_device[key]

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        module = self._module()
        # The class forward, not the instance attribute (which is this object once patched in).
        y = type(module).forward(module, x, *args, **kwargs)
        for adapter_id, adapter in self.adapters.items():
            rows = self.router.rows(adapter_id, x.shape[0], x.device)
            if rows is None:
                continue
            adapter = self._adapter_on(adapter_id, adapter, x.device)
            if isinstance(rows, slice):
                y = y + adapter(x).to(y.dtype)
            else:
                # Out-of-place so autograd works; unowned rows keep the base output bit-for-bit.
                y = y.index_add(0, rows, adapter(x[rows]).to(y.dtype))
        return y


def adaptable_layers(root: nn.Module, include: Callable[[str, nn.Module], bool] | None = None,
                     kind: LayerKind = torch_layer_kind) -> list:
    """[(name, module)] of the Linear/Conv2d submodules (as `kind` recognises them) accepted by include(name, m)."""
    return [(name, m) for name, m in root.named_modules()
            if kind(m) is not None and (include is None or include(name, m))]
