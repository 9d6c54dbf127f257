"""LoRA / FullDelta adapters, merging and mixed-batch routing on small fp32 layers."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from reference_forms import delta_weight, merged_bias, merged_weight
from sine_ops.adapters import AdaptedForward, FullDelta, LoRA, RowRouter, adaptable_layers, conv_spec


def make_layer(kind):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 5), torch.randn(4, 3, 6)  # (B, tokens, in)
    return nn.Conv2d(3, 5, 3, stride=2, padding=1), torch.randn(4, 3, 9, 9)  # (B, C, H, W)


def make_adapter(kind, layer, adapter_kind, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = tuple(layer.weight.shape)
    if adapter_kind == "lora":
        adapter = LoRA(shape, 2, 4.0, conv=conv_spec(layer), generator=gen)
        with torch.no_grad():
            adapter.up.normal_(generator=gen)
    else:
        adapter = FullDelta(shape, tuple(layer.bias.shape), conv=conv_spec(layer))
        with torch.no_grad():
            adapter.weight.normal_(std=0.1, generator=gen)
            adapter.bias.normal_(std=0.1, generator=gen)
    return adapter


def apply_merged(kind, layer, adapter, x):
    w, b = merged_weight(layer.weight, adapter), merged_bias(layer.bias, adapter)
    if kind == "linear":
        return F.linear(x, w, b)
    return F.conv2d(x, w, b, stride=layer.stride, padding=layer.padding)


KINDS = ["linear", "conv"]


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_lora_is_identity_and_base_rows_get_the_base_output(kind):
    layer, x = make_layer(kind)
    base = layer(x)
    lora = LoRA(tuple(layer.weight.shape), 2, 4.0, conv=conv_spec(layer), generator=torch.Generator().manual_seed(1))
    router = RowRouter()
    fwd = AdaptedForward(layer, "layer", {0: lora}, router)
    assert torch.equal(fwd(x), base)  # zero up: adapted model starts exactly at the base

    with torch.no_grad():
        lora.up.normal_()
    assert not torch.allclose(fwd(x), base)
    with router.route([-1, -1, -1, -1]):
        assert torch.equal(fwd(x), base)
    assert router.rows(0, 4) == slice(None)  # route restores the previous state: all rows


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapter_kind", ["lora", "full"])
def test_merged_weight_matches_activation_delta(kind, adapter_kind):
    layer, x = make_layer(kind)
    adapter = make_adapter(kind, layer, adapter_kind, seed=3)
    weight_before = layer.weight.detach().clone()
    with torch.no_grad():
        adapted = layer(x) + adapter(x)
        merged = apply_merged(kind, layer, adapter, x)
    scale = adapted.abs().max().item()
    assert torch.allclose(merged, adapted, atol=1e-5 * max(1.0, scale), rtol=0)
    assert torch.equal(layer.weight, weight_before)
    assert merged_weight(layer.weight, adapter) is not layer.weight


def test_merged_weight_keeps_dtype():
    layer, _ = make_layer("linear")
    adapter = make_adapter("linear", layer, "lora", seed=3)
    half = layer.weight.detach().to(torch.bfloat16)
    out = merged_weight(half, adapter)
    assert out.dtype == torch.bfloat16
    expected = (half.float() + delta_weight(adapter)).to(torch.bfloat16)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapter_kind", ["lora", "full"])
def test_mixed_batch_rows_match_separate_calls(kind, adapter_kind):
    layer, x = make_layer(kind)
    a0 = make_adapter(kind, layer, adapter_kind, seed=10)
    a1 = make_adapter(kind, layer, adapter_kind, seed=11)
    router = RowRouter()
    fwd = AdaptedForward(layer, "layer", {0: a0, 1: a1}, router)
    with torch.no_grad():
        base = layer(x)
        only0, only1 = layer(x) + a0(x), layer(x) + a1(x)
        with router.route(torch.tensor([-1, 0, 1, -1])):
            mixed = fwd(x)
    assert torch.equal(mixed[0], base[0]) and torch.equal(mixed[3], base[3])
    assert torch.allclose(mixed[1], only0[1], atol=1e-6)
    assert torch.allclose(mixed[2], only1[2], atol=1e-6)
    assert not torch.allclose(mixed[1], base[1])


def test_router_rows():
    router = RowRouter()
    assert router.rows(0, 3) == slice(None)
    with router.route([1, 1, 1]):
        assert router.rows(1, 3) == slice(None)
        assert router.rows(0, 3) is None
        with router.route([0, -1, 0]):
            assert router.rows(0, 3).tolist() == [0, 2]
        assert router.rows(1, 3) == slice(None)
        with pytest.raises(ValueError, match="batch has 4 rows"):
            router.rows(1, 4)
    assert router.rows(0, 3) == slice(None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("adapter_kind", ["lora", "full"])
def test_gradients_reach_only_adapter_params(kind, adapter_kind):
    layer, x = make_layer(kind)
    layer.requires_grad_(False)
    adapter = make_adapter(kind, layer, adapter_kind, seed=5)
    router = RowRouter()
    fwd = AdaptedForward(layer, "layer", {0: adapter}, router)
    with router.route([0, -1, 0, -1]):
        fwd(x).square().sum().backward()
    assert layer.weight.grad is None and layer.bias.grad is None
    for p in adapter.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_patched_instance_forward():
    # ComfyUI replaces the instance attribute `forward`; the module call must go through the adapter.
    layer, x = make_layer("conv")
    adapter = make_adapter("conv", layer, "lora", seed=2)
    with torch.no_grad():
        expected = layer(x) + adapter(x)
        layer.forward = AdaptedForward(layer, "layer", {0: adapter}, RowRouter())
        assert torch.equal(layer(x), expected)


def test_rank_validation_and_deterministic_init():
    with pytest.raises(ValueError, match=r"LoRA rank 6 is larger than layer \(5 x 6\)"):
        LoRA((5, 6), 6, 1.0)
    with pytest.raises(ValueError, match=r"larger than layer \(8 x 4\)"):
        LoRA((8, 1, 2, 2), 5, 1.0)
    with pytest.raises(ValueError, match=">= 1"):
        LoRA((5, 6), 0, 1.0)
    with pytest.raises(ValueError, match="groups"):
        LoRA((4, 2, 3, 3), 2, 1.0, conv=dict(groups=2))
    a = LoRA((5, 6), 2, 1.0, generator=torch.Generator().manual_seed(7))
    b = LoRA((5, 6), 2, 1.0, generator=torch.Generator().manual_seed(7))
    c = LoRA((5, 6), 2, 1.0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.down, b.down) and not torch.equal(a.down, c.down)
    assert a.scale == 0.5 and torch.count_nonzero(a.up) == 0
    bound = 1 / 6 ** 0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 6, as torch's own Linear init
    assert a.down.abs().max() <= bound


def test_adaptable_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)))
    assert [n for n, _ in adaptable_layers(net, lambda n, m: True)] == ["0", "2.0"]
    assert [n for n, _ in adaptable_layers(net, lambda n, m: isinstance(m, nn.Linear))] == ["2.0"]


def test_routing_is_per_thread_under_concurrent_forwards():
    """Two threads route the same adapted layer differently at the same time; each sees only its own routing."""
    import threading
    layer, x = make_layer("linear")
    adapter = make_adapter("linear", layer, "lora", seed=5)
    router = RowRouter()
    fwd = AdaptedForward(layer, "layer", {0: adapter}, router)
    with torch.no_grad():
        base, adapted = layer(x), layer(x) + adapter(x)
    owners = {"a": [0, -1, 0, -1], "b": [-1, 0, -1, 0]}
    barrier, errors = threading.Barrier(2), []

    def run(name):
        try:
            for _ in range(50):
                with router.route(owners[name]), torch.no_grad():
                    barrier.wait(timeout=10)  # both threads are inside their own route() now
                    y = fwd(x)
                for row, owner in enumerate(owners[name]):
                    assert torch.equal(y[row], (adapted if owner == 0 else base)[row]), (name, row)
        except BaseException as e:  # reported below; a thread's assertion would otherwise be lost
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(n,)) for n in owners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_adapted_layer_runs_the_module_of_the_model_that_runs():
    """A patch copied onto another model instance (ComfyUI's non-dynamic delegates, multi-GPU clones) must use that
    model's layer, named by the router's running root, not the one it was created for."""
    torch.manual_seed(0)
    model_a, model_b = nn.Sequential(nn.Linear(8, 6)), nn.Sequential(nn.Linear(8, 6))
    adapter = make_adapter("linear", model_a[0], "lora", seed=2)
    router = RowRouter()
    fwd = AdaptedForward(model_a[0], "0", {0: adapter}, router)
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(fwd(x), model_a[0](x) + adapter(x))          # no running root: its own layer
        with router.route(None, root=model_b):
            assert torch.equal(fwd(x), model_b[0](x) + adapter(x))      # the running model's layer


def test_routed_lora_costs_two_ops_and_no_host_sync():
    """Issue 19: a routed LoRA adds the down projection and one fused multiply-add into its rows of the output (no
    gather, cast, scale or index_add), and nothing for a batch without its rows; no host sync either way."""
    from op_counter import OpCounter
    layer, x = make_layer("linear")
    adapter = make_adapter("linear", layer, "lora", seed=4)
    router = RowRouter()
    fwd = AdaptedForward(layer, "layer", {0: adapter}, router)
    with torch.no_grad():
        expected = layer(x) + adapter(x)
        with router.route([-1, -1, 0, 0]):
            fwd(x)  # the first call casts the weights once
            with OpCounter() as routed:
                y = fwd(x)
        with router.route([-1, -1, -1, -1]), OpCounter() as base_only:
            fwd(x)
    assert routed.ops == 3 and base_only.ops == 1  # the base linear + 2
    assert sum(routed.syncs.values()) == 0 and sum(base_only.syncs.values()) == 0
    assert torch.equal(y[:2], layer(x)[:2]) and torch.allclose(y[2:], expected[2:], atol=1e-6)


def test_cached_cast_follows_weight_updates():
    """The per-device/dtype cast of a frozen adapter is made again when its weights change in place or are
    replaced (a trained or loaded adapter reused by a guider), without reading anything back."""
    layer, x = make_layer("linear")
    adapter = make_adapter("linear", layer, "lora", seed=6)
    fwd = AdaptedForward(layer, "layer", {0: adapter}, RowRouter())
    with torch.no_grad():
        first = fwd(x)
        adapter.up.mul_(2)
        assert torch.allclose(fwd(x), layer(x) + adapter(x), atol=1e-6) and not torch.allclose(fwd(x), first)
        adapter.down.data = adapter.down.data * 0
        assert torch.equal(fwd(x), layer(x))


def test_adapter_forward_has_no_graph_breaks():
    """Issue 19 (beyond eager): torch.compile sees the adapted layer's forward, routing included, as one graph."""
    dynamo = pytest.importorskip("torch._dynamo")
    layer, x = make_layer("linear")
    adapter = make_adapter("linear", layer, "lora", seed=8)
    router = RowRouter()
    fwd = AdaptedForward(layer, "layer", {0: adapter}, router)
    with torch.no_grad(), router.route([-1, 0, 0, -1]):
        frozen = dynamo.explain(fwd)(x)
    adapter.requires_grad_(True)
    trained = dynamo.explain(fwd)(x)  # training: every row, gradients through the adapter
    dynamo.reset()
    assert frozen.graph_break_count == 0, frozen.break_reasons
    assert trained.graph_break_count == 0, trained.break_reasons


def test_shared_down_projection_of_q_k_v():
    """While sampling, to_q / to_k / to_v LoRAs on one input run their down projections as one (SharedDown); on a
    different input (cross-attention's context) a sibling projects that input itself. Same outputs as apart."""
    from op_counter import OpCounter
    from sine_ops.adapters import SharedDown
    torch.manual_seed(0)
    layers = {n: nn.Linear(6, 6) for n in ("to_q", "to_k", "to_v")}
    loras = {n: make_adapter("linear", m, "lora", seed=i) for i, (n, m) in enumerate(layers.items())}
    group = SharedDown([loras[n] for n in layers])
    router = RowRouter()
    fwd = {n: AdaptedForward(m, n, {0: loras[n]}, router, {0: (group, i)}) for i, (n, m) in enumerate(layers.items())}
    x, context = torch.randn(3, 4, 6), torch.randn(3, 5, 6)
    with torch.no_grad(), router.route([-1, -1, 0]):
        [fwd[n](x) for n in layers]  # casts once (a forward of its own: the projection is kept per forward)
    with torch.no_grad(), router.route([-1, -1, 0]):
        with OpCounter() as self_attn:
            out = {n: fwd[n](x) for n in layers}
    with torch.no_grad(), router.route([-1, -1, 0]):
        with OpCounter() as cross_attn:
            cross = {"to_q": fwd["to_q"](x), "to_k": fwd["to_k"](context), "to_v": fwd["to_v"](context)}
    assert self_attn.ops == 3 + 1 + 3   # 3 base linears, one shared down projection, 3 fused adds
    assert cross_attn.ops == 3 + 2 + 3  # the context is projected once more, for the key and value
    for n, m in layers.items():
        with torch.no_grad():
            expected = m(x) + loras[n](x)
            expected_ctx = m(context) + loras[n](context)
        assert torch.equal(out[n][:2], m(x)[:2]) and torch.allclose(out[n][2], expected[2], atol=1e-6)
        assert torch.allclose(cross[n][2], (expected if n == "to_q" else expected_ctx)[2], atol=1e-6)



def test_adapters_made_in_inference_mode_sample_through_the_caches():
    """Adapters loaded or imported inside a ComfyUI node (Load SINE Adapter, SINE LoRA as Adapter) are inference
    tensors, which have no version counter: the cast caches (per layer and the shared q/k/v down projection) read
    them without failing and give the outputs of the same adapters made outside inference mode."""
    from sine_ops.adapters import SharedDown
    torch.manual_seed(0)
    layers = {n: nn.Linear(6, 6) for n in ("to_q", "to_k", "to_v")}
    outputs = []
    for inference in (False, True):
        with torch.inference_mode(inference):
            loras = {n: make_adapter("linear", m, "lora", seed=i) for i, (n, m) in enumerate(layers.items())}
        assert all(p.is_inference() == inference for lora in loras.values() for p in lora.parameters())
        group = SharedDown([loras[n] for n in layers])
        router = RowRouter()
        fwd = {n: AdaptedForward(m, n, {0: loras[n]}, router, {0: (group, i)})
               for i, (n, m) in enumerate(layers.items())}
        lone = AdaptedForward(layers["to_q"], "to_q", {0: loras["to_q"]}, router)  # no shared projection
        x = torch.randn(3, 4, 6, generator=torch.Generator().manual_seed(1))
        with torch.no_grad(), router.route([-1, 0, 0]):
            outputs.append([fwd[n](x) for n in layers] + [lone(x), lone(x)])
    assert all(torch.equal(a, b) for a, b in zip(*outputs, strict=True))


def test_training_on_fp8_weights_adds_the_delta_after_the_layer():
    """weight_dtype fp8_*: the layer's weight has no arithmetic (ComfyUI casts it per call), so the trained LoRA is
    not merged into it; gradients still reach the LoRA and match the same layer in fp32."""
    fp8 = getattr(torch, "float8_e4m3fn", None)
    if fp8 is None:
        pytest.skip("this torch has no float8")

    class CastLinear(nn.Linear):  # as comfy.ops' manual cast: the stored weight cast to the input per call
        def forward(self, x):
            return F.linear(x, self.weight.to(x.dtype), self.bias)

    grads = []
    for dtype in (torch.float32, fp8):
        torch.manual_seed(0)
        layer = CastLinear(6, 5)
        layer.weight.data = layer.weight.data.to(fp8).to(dtype)  # both runs on the same (fp8-exact) values
        layer.requires_grad_(False)
        adapter = make_adapter("linear", layer, "lora", seed=3)
        adapter.requires_grad_(True)
        fwd = AdaptedForward(layer, "layer", {0: adapter}, RowRouter())
        x = torch.randn(2, 3, 6, generator=torch.Generator().manual_seed(2))
        fwd(x).square().sum().backward()
        grads.append([adapter.down.grad, adapter.up.grad])
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(*grads, strict=True))


def test_merge_group_trains_as_the_layers_apart_in_fewer_ops():
    """Issue 19: in a routed training forward, the trained LoRAs of same-shape layers merge into their weights as
    one batched multiply-add (MergeGroup). Outputs and gradients equal the per-layer merge; the ops per layer of a
    forward+backward drop from the per-layer merge's."""
    from op_counter import OpCounter
    from sine_ops.adapters import MergeGroup

    def run(grouped: bool):
        torch.manual_seed(0)
        layers = [nn.Linear(8, 8) for _ in range(4)]
        for m in layers:
            m.requires_grad_(grouped)  # grouped: as a model's weights (trainable by default), which get no gradient
        loras = [make_adapter("linear", m, "lora", seed=i) for i, m in enumerate(layers)]
        for lora in loras:
            lora.requires_grad_(True)
        router = RowRouter()
        group = MergeGroup(loras) if grouped else None
        fwd = [AdaptedForward(m, f"l{i}", {0: lora}, router, None, None if group is None else (group, i))
               for i, (m, lora) in enumerate(zip(layers, loras))]
        x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5), requires_grad=True)
        with OpCounter() as ops:
            with router.route(None):
                y = x
                for f in fwd:
                    y = f(y)
            y.square().sum().backward()
        assert all(m.weight.grad is None for m in layers)  # apart: frozen; grouped: the group detaches them
        return y.detach(), [p.grad for lora in loras for p in lora.parameters()] + [x.grad], ops.ops

    apart, grouped = run(False), run(True)
    assert torch.allclose(apart[0], grouped[0], rtol=1e-5, atol=1e-6)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6) for a, b in zip(apart[1], grouped[1], strict=True))
    assert grouped[2] < apart[2], (grouped[2], apart[2])
    print("ops per forward+backward of 4 layers: apart", apart[2], "grouped", grouped[2])


def test_all_rows_router_trains_as_an_unrouted_forward_in_one_graph():
    """SINE Finetune's compiled forward (AllRows: no per-call state) gives what the uncompiled one (a RowRouter
    routing no rows) gives, gradients included, and torch.compile sees it as one graph; AllRows refuses rows."""
    from sine_ops.adapters import AllRows
    dynamo = pytest.importorskip("torch._dynamo")
    layer, x = make_layer("linear")
    adapter = make_adapter("linear", layer, "lora", seed=9)
    adapter.requires_grad_(True)
    outputs, grads = [], []
    for router in (RowRouter(), AllRows()):
        fwd = AdaptedForward(layer, "layer", {0: adapter}, router)
        with router.route(None, root=None):
            y = fwd(x)
        y.pow(2).sum().backward()
        outputs.append(y.detach())
        grads.append(adapter.up.grad.clone())
        adapter.zero_grad(set_to_none=True)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-6) and torch.allclose(grads[0], grads[1], atol=1e-6)
    explained = dynamo.explain(AdaptedForward(layer, "layer", {0: adapter}, AllRows()))(x)
    dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    with pytest.raises(ValueError, match="RowRouter"):
        with AllRows().route([0, -1]):
            pass
