"""Weight adapters (LoRA, full delta) for Linear/Conv2d layers, with per-row routing for mixed batches.

An adapter never touches the base layer: it adds an activation-space delta after the layer's own forward, so
rows of a batch that no adapter owns get exactly the base output, and the base weights stay frozen and shareable.
"""
import math
from contextlib import contextmanager
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def conv_spec(layer: nn.Module) -> dict | None:
    """The conv arguments an adapter must share with `layer` (None for Linear)."""
    if isinstance(layer, nn.Linear):
        return None
    if not isinstance(layer, nn.Conv2d):
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


@torch.no_grad()
def merged_weight(weight: torch.Tensor, adapter: LoRA | FullDelta) -> torch.Tensor:
    """New tensor weight + delta, summed in fp32 so low-precision base weights lose no more than one rounding."""
    return (weight.float() + adapter.delta_weight().to(weight.device)).to(weight.dtype)


@torch.no_grad()
def merged_bias(bias: torch.Tensor | None, adapter: LoRA | FullDelta) -> torch.Tensor | None:
    """New tensor bias + bias delta; the input itself when the adapter has no bias delta (LoRA)."""
    delta = adapter.delta_bias()
    if delta is None:
        return bias
    if bias is None:
        raise ValueError("adapter has a bias delta but the layer has no bias")
    return (bias.float() + delta.to(bias.device)).to(bias.dtype)


class RowRouter:
    """Which batch rows each adapter id applies to during the current forward.

    row_owner None: every adapter applies to all rows (training, or a fine-tuned model on its own).
    row_owner (B,) long: -1 = base row, k = row owned by adapter id k (one batch mixing base and fine-tuned rows).
    """

    def __init__(self):
        self.enabled = True
        self.row_owner: torch.Tensor | None = None
        self._cache: dict = {}

    def rows(self, adapter_id: int, batch: int, device=None) -> slice | torch.Tensor | None:
        """slice(None) = all rows, a LongTensor of row indices, or None = no rows (skip the adapter)."""
        if not self.enabled:
            return None
        if self.row_owner is None:
            return slice(None)
        if self.row_owner.shape[0] != batch:
            raise ValueError(f"row_owner has {self.row_owner.shape[0]} entries but the batch has {batch} rows")
        key = (adapter_id, str(device))
        if key not in self._cache:  # every adapted layer asks the same question once per forward
            idx = (self.row_owner == adapter_id).nonzero().flatten()
            self._cache[key] = None if idx.numel() == 0 else slice(None) if idx.numel() == batch else idx.to(device)
        return self._cache[key]

    @contextmanager
    def route(self, row_owner):
        """Set row ownership for the enclosed forward(s); the previous state is always restored."""
        prev = self.row_owner, self._cache
        self.row_owner = None if row_owner is None else torch.as_tensor(row_owner, dtype=torch.long).flatten().cpu()
        self._cache = {}
        try:
            yield self
        finally:
            self.row_owner, self._cache = prev


class AdaptedForward:
    """Replacement for `module.forward`: the class forward (the base output) plus each routed adapter's delta."""

    def __init__(self, module: nn.Module, adapters: dict[int, nn.Module], router: RowRouter):
        self.module, self.adapters, self.router = module, dict(adapters), router

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # The class forward, not the instance attribute (which is this object once patched in).
        y = type(self.module).forward(self.module, x, *args, **kwargs)
        for adapter_id, adapter in self.adapters.items():
            rows = self.router.rows(adapter_id, x.shape[0], x.device)
            if rows is None:
                continue
            if next(adapter.parameters()).device != x.device:
                adapter.to(x.device)  # once: follow the model to its device instead of copying at every call
            if isinstance(rows, slice):
                y = y + adapter(x).to(y.dtype)
            else:
                # Out-of-place so autograd works; unowned rows keep the base output bit-for-bit.
                y = y.index_add(0, rows, adapter(x[rows]).to(y.dtype))
        return y


def adaptable_layers(root: nn.Module, include: Callable[[str, nn.Module], bool] | None = None) -> list:
    """[(name, module)] of Linear/Conv2d submodules (ComfyUI's ops subclass these) accepted by include(name, module)."""
    return [(name, m) for name, m in root.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and (include is None or include(name, m))]
