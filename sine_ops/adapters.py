"""Weight adapters (LoRA, full delta) for Linear/Conv2d layers, with per-row routing for mixed batches.

An adapter never touches the base layer: it adds an activation-space delta after the layer's own forward, so
rows of a batch that no adapter owns get exactly the base output, and the base weights stay frozen and shareable.
"""
import contextvars
import functools
import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .tensor_views import content_stamp


LayerKind = Callable[[nn.Module], "str | None"]
# Weight dtypes a LoRA can be added to in the graph (merged training); fp8 storage is only cast, never added to.
_ARITHMETIC_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


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


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


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

    def compute_weights(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up * scale) as add_delta takes them, in the compute dtype on `device`. With gradients they stay in
        the graph (cast only where the dtype differs: under autocast F.linear casts down itself)."""
        up = self.up if self.scale == 1 else self.up * self.scale  # alpha == rank (the default): no multiply
        if self.down.requires_grad and torch.is_grad_enabled():
            return self.down.to(device), up.to(device=device, dtype=dtype)
        return self.down.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype)

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, weights: tuple) -> torch.Tensor:
        """y += up(down(x)) * scale in place, for the rows given (views of the layer's output and input): the down
        projection and one fused multiply-add into y (baddbmm_, bit-equal on the CPU to y + h @ up)."""
        down, up = weights
        return self.add_up(y, _apply(x, down, None, self.conv), up)

    def add_up(self, y: torch.Tensor, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """y += up(h) in place, h = the down projection of the rows' input."""
        if self.conv is None and 2 <= y.dim() <= 3:
            y3, h3 = (y, h) if y.dim() == 3 else (y.unsqueeze(0), h.unsqueeze(0))
            y3.baddbmm_(h3, up.flatten(1).t().expand(y3.shape[0], -1, -1))
            return y
        return y.add_(_apply(h, up, None, None if self.conv is None else {}))

    def merged_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """weight + scale * up @ down, in the graph (training): one addmm, whose backward is the layer's weight
        gradient times down and up, instead of a second forward path through the rank (LoraDiff-style)."""
        up, down = self.up.flatten(1), self.down.flatten(1)
        if weight.dtype == up.dtype or _autocast_on(weight.device.type):
            return torch.addmm(weight.flatten(1), up, down, alpha=self.scale).view(weight.shape)
        return weight + (up @ down).mul(self.scale).view(weight.shape)  # e.g. fp16 weights, fp32 LoRA: promoted


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

    def compute_weights(self, dtype: torch.dtype, device: torch.device) -> tuple:
        return tuple(None if p is None else p.to(device=device, dtype=dtype) for p in (self.weight, self.bias))

    def add_delta(self, y: torch.Tensor, x: torch.Tensor, weights: tuple) -> torch.Tensor:
        return y.add_(_apply(x, *weights, self.conv))


def _rows_of(owner: tuple, adapter_id: int):
    """The rows of `owner` (one adapter id per row) that `adapter_id` owns: slice(None) = all, a slice when they are
    contiguous (ComfyUI batches each cond's rows together), a list of indices otherwise, None = none."""
    idx = [i for i, o in enumerate(owner) if o == adapter_id]
    if not idx:
        return None
    if len(idx) == len(owner):
        return slice(None)
    if idx[-1] - idx[0] + 1 == len(idx):
        return slice(idx[0], idx[-1] + 1)
    return idx


@dataclass
class _Routing:
    row_owner: tuple | None  # adapter id per row (-1 = base), None = every row is every adapter's
    root: nn.Module | None
    rows: dict = field(default_factory=dict)  # adapter id (, device) -> rows, filled by the first layer that asks
    shared: tuple | None = None  # SharedDown's latest projection: (SharedDown, input, rows, projection)
    merged: dict = field(default_factory=dict)  # MergeGroup -> its members' merged weights, in this forward

    def rows_of(self, adapter_id: int, batch: int, device=None):
        if self.row_owner is None:
            return slice(None)
        if len(self.row_owner) != batch:
            raise ValueError(f"row_owner has {len(self.row_owner)} entries but the batch has {batch} rows")
        rows = self.rows.get(adapter_id, _UNSET)
        if rows is _UNSET:
            rows = self.rows[adapter_id] = _rows_of(self.row_owner, adapter_id)
        if isinstance(rows, list):  # scattered rows (rare): an index tensor, made once per forward and device
            key = (adapter_id, device)
            if key not in self.rows:
                self.rows[key] = torch.tensor(rows, device=device)
            return self.rows[key]
        return rows


_UNSET = object()


class RowRouter:
    """Which batch rows each adapter id owns during the forward that runs in this thread (or asyncio task).

    Routing lives in a ContextVar set around each forward call, never in shared state, so forwards on several
    threads (ComfyUI's multi-GPU workers call the model wrapper from worker threads) route independently.
    Outside `route`: every adapter applies to all rows (training, or a fine-tuned model on its own).
    `route(row_owner)`: one adapter id per row, -1 = base row, k = row owned by adapter id k (one batch mixing
    base and fine-tuned rows), as Python ints (a tensor is read once here); `root`: the model that is running, so
    adapted layers use that model's modules even when their patch was copied onto another model (see
    AdaptedForward). The rows are worked out on the host, from Python values: no device op, no host sync.
    """

    def __init__(self):
        self._state: contextvars.ContextVar[_Routing | None] = contextvars.ContextVar("sine_routing", default=None)

    def state(self) -> _Routing | None:
        return self._state.get()

    def rows(self, adapter_id: int, batch: int, device=None) -> slice | torch.Tensor | None:
        """slice(None) = all rows, a slice of contiguous rows, a LongTensor of scattered rows, or None = no rows."""
        state = self._state.get()
        return slice(None) if state is None else state.rows_of(adapter_id, batch, device)

    @contextmanager
    def route(self, row_owner, root: nn.Module | None = None):
        """Set row ownership (None = all rows) for the enclosed forward(s) of this thread; always restored."""
        if torch.is_tensor(row_owner):
            row_owner = row_owner.flatten().tolist()
        owner = None if row_owner is None else tuple(int(o) for o in row_owner)
        token = self._state.set(_Routing(owner, root))
        try:
            yield self
        finally:
            self._state.reset(token)


class AllRows:
    """The router of a model whose adapters apply to every row of every forward, kept in no per-call state: a
    compiled training forward (SINE Finetune's compile setting). torch.compile cannot trace RowRouter's ContextVar;
    what that state buys a training forward (the merge groups' one batched merge) the compiler fuses by itself."""

    def state(self) -> None:
        return None

    def rows(self, adapter_id: int, batch: int, device=None) -> slice:
        return slice(None)

    @contextmanager
    def route(self, row_owner, root: nn.Module | None = None):
        if row_owner is not None:
            raise ValueError("AllRows routes no rows: use a RowRouter for a batch of several models")
        yield self


class SharedDown:
    """The LoRA down projections of sibling layers that attention runs on one input (to_q / to_k / to_v), computed
    as one projection while sampling: one kernel instead of one per layer. The concatenated, cast weights are
    cached like AdaptedForward's; the projection of the latest input is kept in the forward's routing state (one
    slot, so per thread, and released with the forward), and a sibling called on another tensor (cross-attention's
    key and value on the context) projects that tensor itself."""

    def __init__(self, loras: list[LoRA]):
        self.loras = loras
        bounds = [0]
        for lora in loras:
            bounds.append(bounds[-1] + lora.rank)
        self.bounds = bounds
        self._cast: dict = {}  # (device, dtype) -> (stamp, concatenated down)
        self._inference = [lora.down.is_inference() for lora in loras]  # read once: see content_stamp

    def down(self, x: torch.Tensor) -> torch.Tensor:
        key = (x.device, x.dtype)
        stamp = tuple(content_stamp(lora.down, inf) for lora, inf in zip(self.loras, self._inference))
        cached = self._cast.get(key)
        if cached is None or cached[0] != stamp:
            with torch.no_grad():
                cached = self._cast[key] = (stamp, torch.cat([lora.down for lora in self.loras]).to(x))
        return cached[1]

    def project(self, state: "_Routing", member: int, x: torch.Tensor, rows: slice) -> torch.Tensor:
        """The down projection of layer `member` on its rows of x (a column slice of the shared projection)."""
        slot = state.shared
        if slot is None or slot[0] is not self or slot[1] is not x or slot[2] != rows:
            h = F.linear(x[rows], self.down(x))
            slot = state.shared = (self, x, rows, h)
        return slot[3][..., self.bounds[member]:self.bounds[member + 1]]


class MergeGroup:
    """Trained LoRAs of layers whose weights share one shape (the attention projections of one width): in a routed
    training forward their merged weights (weight + scale * up @ down) are made for all members at once, as one
    batched multiply-add, whose backward is one batched product each for the ups and the downs; per layer only
    the layer's own weight gradient remains. Made when the first member runs, kept in the forward's routing
    state (so per thread, and released with the forward), as SharedDown keeps its projection."""

    def __init__(self, loras: list[LoRA]):
        self.loras = loras
        self.forwards: list[AdaptedForward] = []  # the members' forwards, in the order of loras (set by them)

    def merged_weight(self, state: "_Routing", member: int) -> torch.Tensor | None:
        """Member `member`'s merged weight in this forward; None where the members' weights cannot be stacked
        (another dtype or device per layer: e.g. a --lowvram model with some layers left on the CPU)."""
        merged = state.merged.get(self, _UNSET)
        if merged is _UNSET:
            merged = state.merged[self] = self._merge(state.root)
        return None if merged is None else merged[member]

    def _merge(self, root: nn.Module | None) -> tuple | None:
        # detached, never the layers' own Parameters: only the layer that runs has its weights swapped for views by
        # the training clone (nodes/model_patching.TrainableWeights), and the model's weights must get no gradient
        weights = [f._module(root)._parameters["weight"].detach() for f in self.forwards]
        if len({(w.dtype, w.device, w.shape) for w in weights}) != 1:
            return None
        for lora in self.loras:
            if lora.up.device != weights[0].device:
                lora.to(weights[0].device)  # the trained parameters themselves follow the model
        first = self.loras[0]
        ups = torch.stack([lora.up.flatten(1) for lora in self.loras])
        downs = torch.stack([lora.down.flatten(1) for lora in self.loras])
        base = torch.stack([w.flatten(1) for w in weights])
        if base.dtype == ups.dtype or _autocast_on(base.device.type):
            merged = torch.baddbmm(base, ups, downs, alpha=first.scale)
        else:
            merged = base + torch.bmm(ups, downs).mul(first.scale)  # e.g. fp16 weights, fp32 LoRA: promoted
        return tuple(m.view(weights[0].shape) for m in merged.unbind(0))


class AdaptedForward:
    """Replacement for `module.forward`: the class forward (the base output) plus each routed adapter's delta,
    added in place into the adapter's rows of that output (the other rows keep the base output bit for bit).

    `path` locates the layer from the model root it was made for. When the router names another running root
    (the patch was copied onto a patcher over another model instance: ComfyUI's non-dynamic delegates, multi-GPU
    clones), the layer is looked up there, so the base output always comes from the model that runs.
    Frozen adapters (sampling) are cast to the compute dtype and device once, and again only when their weights
    change (a new tensor or an in-place update: its version counter); trained ones run on their parameters.
    """

    def __init__(self, module: nn.Module, path: str, adapters: dict[int, nn.Module], router: RowRouter,
                 shared: dict[int, tuple[SharedDown, int]] | None = None,
                 merge: tuple[MergeGroup, int] | None = None):
        self.module, self.path, self.adapters, self.router = module, path, dict(adapters), router
        self.shared = shared or {}  # adapter id -> (SharedDown, this layer's index in it), for frozen LoRAs
        self.merge = merge  # (MergeGroup, this layer's index in it), for the one adapter of a training model
        if merge is not None:
            group, index = merge
            group.forwards.extend([None] * (index + 1 - len(group.forwards)))
            group.forwards[index] = self
        self._modules_by_root: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._cast: dict = {}  # (adapter id, device, dtype) -> (weights stamp, cast weights)
        # which parameters are inference tensors (loaded inside a node), read once: see content_stamp
        self._inference = {i: [p is not None and p.is_inference() for p in a._parameters.values()]
                           for i, a in self.adapters.items()}

    def _module(self, root: nn.Module | None) -> nn.Module:
        if root is None:
            return self.module
        module = self._modules_by_root.get(root)
        if module is None:
            module = self._modules_by_root[root] = functools.reduce(getattr, self.path.split("."), root)
        return module

    def _weights(self, adapter_id: int, adapter: nn.Module, x: torch.Tensor) -> tuple:
        params = adapter._parameters.values()
        if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
            return adapter.compute_weights(x.dtype, x.device)  # training: in the graph, every call
        key = (adapter_id, x.device, x.dtype)
        stamp = tuple(content_stamp(p, inf) for p, inf in zip(params, self._inference[adapter_id]) if p is not None)
        cached = self._cast.get(key)
        if cached is None or cached[0] != stamp:
            with torch.no_grad():
                cached = self._cast[key] = (stamp, adapter.compute_weights(x.dtype, x.device))
        return cached[1]

    def _trains_merged(self, state, module) -> LoRA | None:
        """The LoRA to train merged into the layer's weight: one adapter on every row (training does not route),
        with gradients."""
        if state is not None and state.row_owner is not None or len(self.adapters) != 1:
            return None
        adapter = next(iter(self.adapters.values()))
        if not (isinstance(adapter, LoRA) and adapter.down.requires_grad and torch.is_grad_enabled()):
            return None
        weight = module._parameters.get("weight")
        # fp8 storage (weight_dtype fp8_*) has no arithmetic: the layer casts it per call, so the delta goes after
        return adapter if weight is not None and weight.dtype in _ARITHMETIC_DTYPES else None

    def __call__(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        state = self.router.state()  # one context lookup per layer call
        module = self._module(None if state is None else state.root)
        trained = self._trains_merged(state, module)
        if trained is not None:
            # training: the layer runs once on weight + up @ down (the same function of x as base + delta)
            params = module._parameters
            weight = params["weight"]
            merged = None if self.merge is None or state is None else self.merge[0].merged_weight(state, self.merge[1])
            if merged is None:
                if trained.up.device != weight.device:
                    trained.to(weight.device)  # the trained parameters themselves follow the model
                merged = trained.merged_weight(weight)
            params["weight"] = merged
            try:
                return type(module).forward(module, x, *args, **kwargs)
            finally:
                params["weight"] = weight
        # The class forward, not the instance attribute (which is this object once patched in).
        y = type(module).forward(module, x, *args, **kwargs)
        for adapter_id, adapter in self.adapters.items():
            rows = slice(None) if state is None else state.rows_of(adapter_id, x.shape[0], x.device)
            if rows is None:
                continue
            weights = self._weights(adapter_id, adapter, x)
            shared = self.shared.get(adapter_id) if state is not None and isinstance(rows, slice) else None
            if shared is not None and not (torch.is_grad_enabled() and adapter.down.requires_grad):
                h = shared[0].project(state, shared[1], x, rows)
                adapter.add_up(y[rows], h, weights[1])  # in place into the rows' view of y
            elif isinstance(rows, slice):
                whole = rows.start is None and rows.stop is None
                adapter.add_delta(y if whole else y[rows], x if whole else x[rows], weights)  # in place into y
            else:
                # scattered rows: out of place on a gathered copy, so autograd works and other rows stay exact
                y = y.index_add(0, rows, adapter.add_delta(torch.zeros_like(y[rows]), x[rows], weights))
        return y


def adaptable_layers(root: nn.Module, include: Callable[[str, nn.Module], bool] | None = None,
                     kind: LayerKind = torch_layer_kind) -> list:
    """[(name, module)] of the Linear/Conv2d submodules (as `kind` recognises them) accepted by include(name, m)."""
    return [(name, m) for name, m in root.named_modules()
            if kind(m) is not None and (include is None or include(name, m))]
