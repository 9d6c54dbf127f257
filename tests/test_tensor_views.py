"""sine_ops.tensor_views: autograd-safe, always-readable views of frozen weights (issue 18)."""
import pytest
import torch

from sine_ops.tensor_views import normal_view


def copied_outside_inference_mode():
    """A checkpoint layer after a GPU move made outside inference mode (../shared/repro/inference_tensor_move.py):
    a copying move stands in for the GPU. Returns the layer and its weight's values from before the move."""
    with torch.inference_mode():
        conv = torch.nn.Conv2d(3, 8, 3)
        before = conv.weight.clone()
    with torch.inference_mode(False):
        conv._apply(lambda t: t.to("cpu", copy=True))
    return conv, before


def test_inference_tensors_get_an_autograd_safe_view():
    with torch.inference_mode():
        w = torch.randn(3, 3)
    view = normal_view(w)
    assert not view.is_inference() and view.data_ptr() == w.data_ptr()
    x = torch.randn(2, 3, requires_grad=True)
    (x @ view).sum().backward()
    assert x.grad is not None


def test_a_weight_copied_outside_inference_mode_reads_through_the_view():
    conv, before = copied_outside_inference_mode()
    with pytest.raises(RuntimeError, match="version counter"):
        conv.weight.reshape(-1)  # the failure the view exists for
    for mode in (False, True):
        with torch.inference_mode(mode):
            view = normal_view(conv.weight)
            assert view.data_ptr() == conv.weight.data_ptr()
            assert torch.equal(view.reshape(-1), before.reshape(-1))


def test_views_keep_strides_and_offsets():
    with torch.inference_mode():
        base = torch.arange(24.).reshape(4, 6)
        part = base[1:, ::2]
    view = normal_view(part)
    assert view.shape == part.shape and view.stride() == part.stride()
    assert torch.equal(view.clone(), part.clone())


def test_content_stamp_follows_in_place_writes_and_reads_inference_tensors():
    """Caches of tensors derived from a weight key on content_stamp: an in-place write changes it; an inference
    tensor (which has no version counter) is stamped by its storage."""
    from sine_ops.tensor_views import content_stamp
    t = torch.zeros(3)
    before = content_stamp(t)
    t.add_(1)
    assert content_stamp(t) != before and content_stamp(t)[0] == before[0]
    with torch.inference_mode():
        frozen = torch.zeros(3)
    with pytest.raises(RuntimeError, match="version counter"):
        frozen._version  # noqa: B018 - what content_stamp must not read
    assert content_stamp(frozen) == (frozen.data_ptr(), None)
