"""Training masks and crops (issue 21.2): a crop that misses the mask's white area is drawn again, deterministically,
and a mask too small for the latent is refused before training, instead of a 0/0 loss at some step."""
import pytest
import torch
import torch.nn.functional as F

from dataclasses import replace

from sine_ops.config import AUTO_CROP_BANK, BANKED_CROPS, FinetuneSettings, PatchConfig
from sine_ops.training import denoising_loss, step_generator
from sine_ops.training_data import (MAX_CROP_ATTEMPTS, BankSampler, FreshCropSampler, MaskTooSmall,
                                    training_sampler)

encode = lambda px: F.avg_pool2d(px.movedim(-1, 1), 8)  # noqa: E731 - a stand-in "VAE": 8x down
IMAGE = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(0))


def corner_mask(side=30):
    """White only in a small top-left corner: most random crops miss it."""
    mask = torch.zeros(1, 96, 96)
    mask[:, :side, :side] = 1.0
    return mask


def patch(crop_bank):
    return PatchConfig(working_size=128, train_resolution=64, grid_size=16, min_crop_frac=0.1, max_crop_frac=0.5,
                       crop_bank=crop_bank).resolved("sd1")


def test_fresh_crops_that_miss_the_mask_are_redrawn_deterministically():
    sampler = training_sampler(IMAGE, encode, FinetuneSettings(), "sd1", patch(0), torch.Generator(), corner_mask())
    assert isinstance(sampler, FreshCropSampler)
    draws = [sampler.draw(step_generator(0, k)) for k in range(40)]
    assert all(m.sum() > 0 for _, _, m in draws)  # every step has something to learn: no 0/0 loss
    assert sampler.missed_crops > 0  # the corner mask is missed by most crops: they were redrawn and counted
    again = training_sampler(IMAGE, encode, FinetuneSettings(), "sd1", patch(0), torch.Generator(), corner_mask())
    for k in (0, 17, 39):  # a re-queued run draws the same crops for the same (seed, step)
        latent, box, mask = again.draw(step_generator(0, k))
        assert torch.equal(box, draws[k][1]) and torch.equal(mask, draws[k][2]) and torch.equal(latent, draws[k][0])
    for latent, _, mask in draws:  # the loss is finite with every drawn mask
        assert torch.isfinite(denoising_loss(_IdentitySchedule(), torch.ones(1), latent + 0.1, latent, mask))


def test_a_redraw_leaves_the_steps_own_stream_as_it_is():
    """Noise and timestep are drawn from the step's generator after the crop: a redraw must not shift them."""
    masked = training_sampler(IMAGE, encode, FinetuneSettings(), "sd1", patch(0), torch.Generator(), corner_mask())
    plain = training_sampler(IMAGE, encode, FinetuneSettings(), "sd1", patch(0), torch.Generator(), None)
    for k in range(20):
        g_masked, g_plain = step_generator(0, k), step_generator(0, k)
        masked.draw(g_masked)
        plain.draw(g_plain)
        assert torch.equal(torch.randn(4, generator=g_masked), torch.randn(4, generator=g_plain))


def test_a_crop_bank_holds_only_crops_that_cover_the_mask():
    bank = training_sampler(IMAGE, encode, FinetuneSettings(), "sd1", patch(12), torch.Generator().manual_seed(3),
                            corner_mask())
    assert isinstance(bank, BankSampler) and bank.masks.shape[0] == 12
    assert all(m.sum() > 0 for m in bank.masks) and bank.missed_crops > 0


def test_no_mask_and_all_white_masks_draw_exactly_as_before():
    plain = training_sampler(IMAGE, encode, FinetuneSettings(), "sd1", patch(0), torch.Generator(), None)
    white = training_sampler(IMAGE, encode, FinetuneSettings(), "sd1", patch(0), torch.Generator(),
                             torch.ones(1, 96, 96))
    for k in range(5):
        assert torch.equal(plain.draw(step_generator(1, k))[1], white.draw(step_generator(1, k))[1])
    assert white.missed_crops == 0


def test_a_mask_that_vanishes_at_latent_size_is_refused_up_front():
    dot = torch.zeros(1, 96, 96)
    dot[:, 50, 50] = 1.0  # one pixel: bilinear resizing to the 8x8 latent drops it
    with pytest.raises(MaskTooSmall, match="too small"):
        training_sampler(IMAGE, encode, FinetuneSettings(resolution=64), "sd1", None, torch.Generator(), dot)


def test_a_mask_no_crop_can_cover_ends_in_a_clear_error_after_bounded_attempts():
    cfg = PatchConfig(working_size=128, train_resolution=64, grid_size=16, min_crop_frac=0.1, max_crop_frac=0.1,
                      crop_bank=0).resolved("sd1")
    mask = torch.zeros(1, 96, 96)
    mask[:, 94:, 94:] = 1.0  # a speck in the corner: on the canvas, but the 1/10 crops' latent never shows it
    sampler = training_sampler(IMAGE, encode, FinetuneSettings(), "sd1", cfg, torch.Generator(), mask)
    calls = []
    sampler.crops.encode = lambda px: calls.append(1) or encode(px)
    with pytest.raises(MaskTooSmall, match="min_crop_frac"):
        for k in range(200):
            sampler.draw(step_generator(0, k))
    assert len(calls) <= k + 1  # a known miss costs no VAE encode
    assert sampler.missed_crops <= (k + 1) * MAX_CROP_ATTEMPTS


class _IdentitySchedule:
    def calculate_denoised(self, sigma, model_output, model_input):
        return model_input + model_output


def test_crop_bank_auto_is_fresh_crops_where_cheap_and_a_bank_elsewhere():
    """crop_bank -1 (the default) becomes 0 (a fresh crop per step) on a GPU holding the model, the bank elsewhere;
    a value the user set is kept, and an unresolved -1 never reaches the sampler as an empty bank."""
    auto = PatchConfig(working_size=128, train_resolution=64, grid_size=16)
    assert auto.crop_bank == AUTO_CROP_BANK
    assert auto.for_device(fresh_crops_cheap=True).crop_bank == 0
    assert auto.for_device(fresh_crops_cheap=False).crop_bank == BANKED_CROPS
    for chosen in (0, 5):
        assert replace(auto, crop_bank=chosen).for_device(True).crop_bank == chosen
        assert replace(auto, crop_bank=chosen).for_device(False).crop_bank == chosen
    with pytest.raises(ValueError, match="for_device"):
        training_sampler(IMAGE, encode, FinetuneSettings(), "sd1", auto.resolved("sd1"), torch.Generator())
    with pytest.raises(ValueError, match="crop_bank must be -1"):
        PatchConfig(crop_bank=-2).validate()
