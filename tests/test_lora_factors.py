"""A stock LoRA layer as this pack's LoRA module (sine_ops.lora_import): the delta ComfyUI's loader would add."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sine_ops.adapters import conv_spec
from reference_forms import lora_delta_weight
from sine_ops.lora_import import lora_module


def stock_delta(weight_shape, up, down, alpha, strength):
    """ComfyUI's LoRA patch (weight_adapter/lora.py): strength * alpha/rank * up.flatten(1) @ down.flatten(1)."""
    scale = 1.0 if alpha is None else alpha / down.shape[0]
    return (strength * scale * (up.flatten(1) @ down.flatten(1))).reshape(weight_shape)


@pytest.mark.parametrize("layer,up_shape,down_shape", [
    (nn.Linear(12, 10), (10, 3), (3, 12)),
    (nn.Conv2d(6, 8, 3, padding=1), (8, 3, 1, 1), (3, 6, 3, 3)),       # kohya LoCon
    (nn.Conv2d(6, 8, 1), (8, 3), (3, 6)),                              # 2-D factors stored for a 1x1 conv
    (nn.Linear(12, 10), (10, 3, 1, 1), (3, 12, 1, 1)),                 # 4-D factors for a Linear
])
@pytest.mark.parametrize("alpha,strength", [(2.0, 1.0), (None, 0.7), (8.0, -0.5)])
def test_module_adds_the_stock_loras_delta(layer, up_shape, down_shape, alpha, strength):
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(up_shape, generator=gen), torch.randn(down_shape, generator=gen)
    shape = tuple(layer.weight.shape)
    adapter = lora_module(shape, up, down, alpha, strength, conv_spec(layer))
    expected = stock_delta(shape, up, down, alpha, strength)
    assert torch.allclose(lora_delta_weight(adapter), expected, atol=1e-5)
    x = torch.randn(2, 6, 5, 5, generator=gen) if isinstance(layer, nn.Conv2d) else torch.randn(2, 4, 12, generator=gen)
    merged = (F.conv2d(x, expected, None, padding=layer.padding) if isinstance(layer, nn.Conv2d)
              else F.linear(x, expected))
    assert torch.allclose(adapter(x), merged, atol=1e-4)
    assert not any(p.requires_grad for p in adapter.parameters())


def test_factors_for_another_layer_are_refused():
    with pytest.raises(ValueError, match=r"do not fit a layer of weight shape \(10, 12\)"):
        lora_module((10, 12), torch.zeros(10, 3), torch.zeros(3, 16), 1.0, 1.0, None)
    with pytest.raises(ValueError, match="do not fit"):
        lora_module((10, 12), torch.zeros(9, 3), torch.zeros(3, 12), 1.0, 1.0, None)


def test_global_rng_is_untouched():
    torch.manual_seed(5)
    before = torch.get_rng_state()
    lora_module((10, 12), torch.zeros(10, 3), torch.zeros(3, 12), 1.0, 1.0, None)
    assert torch.equal(torch.get_rng_state(), before)
