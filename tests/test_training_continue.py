"""Continuing a training run, the loss mask, L_rec and fresh patch crops, in plain torch (issue 11 / 12)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from reference_forms import LinearDDPMSchedule
from sine_ops.adapter_file import OPTIM_PREFIX, from_state_dict, metadata, state_dict
from sine_ops.adapters import AdaptedForward, LoRA, RowRouter, adaptable_layers, conv_spec
from sine_ops.config import FinetuneSettings, OptimConfig, PatchConfig, resolve_settings
from sine_ops.sine_adapter import SineAdapter
from sine_ops.training import (TrainProgress, denoising_loss, noisy_latent, reconstruction_loss, step_generator,
                               train)
from sine_ops.training_data import BankSampler, FreshCropSampler, training_sampler
from test_training import TinyUNet, denoiser


class Schedule(LinearDDPMSchedule):
    """The toy schedule with ComfyUI's model_sampling.timestep (index of the nearest σ)."""

    def timestep(self, sigma):
        return (sigma.log()[None] - self.sigmas.log()[:, None]).abs().argmin(dim=0).view(sigma.shape)


def lora_setup(seed=0):
    torch.manual_seed(seed)
    net = TinyUNet()
    net.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for name, m in adaptable_layers(net, lambda n, m: type(m) is nn.Conv2d):
        adapters[name] = LoRA(tuple(m.weight.shape), 4, 4.0, conv=conv_spec(m), generator=g)
        m.forward = AdaptedForward(m, name, {0: adapters[name]}, RowRouter())
    return net, SineAdapter(unet=adapters, text_encoder={}, family="sd1", source_prompt="photo of a sks dog")


def run(schedule, steps, start=0, optimizer_state=None, adapter_state=None, seed=3):
    """Train a fresh toy LoRA (weights from `adapter_state` if given) from step `start` to `steps`."""
    net, adapter = lora_setup()
    if adapter_state is not None:
        with torch.no_grad():
            for (_, p), q in zip(adapter.named_parameters(), adapter_state):
                p.copy_(q)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    den = denoiser(net, schedule)

    def loss_at_step(step):
        sigma, _, x = noisy_latent(schedule, x0, step_generator(seed, step))
        return denoising_loss(schedule, sigma, den(x, sigma), x0)

    for p in adapter.parameters():
        p.requires_grad_(True)
    progress = TrainProgress()
    train(adapter.parameters(), loss_at_step, OptimConfig(steps=steps, learning_rate=3e-3, clip_grad_norm=1.0),
          start_step=start, optimizer_state=optimizer_state, progress=progress)
    return [p.detach().clone() for p in adapter.parameters()], progress


def test_three_plus_three_steps_equal_six_steps():
    schedule = Schedule()
    six, full = run(schedule, 6)
    three, first = run(schedule, 3)
    assert first.step == 3 and len(first.losses) == 3
    continued, second = run(schedule, 6, start=3, optimizer_state=first.optimizer_state, adapter_state=three)
    assert second.step == 6 and first.losses + second.losses == full.losses
    for a, b in zip(continued, six):
        assert torch.allclose(a, b, rtol=0, atol=1e-6), (a - b).abs().max()
    # without the optimizer state the continuation differs: the state is what makes it exact
    restarted, _ = run(schedule, 6, start=3, adapter_state=three)
    assert max((a - b).abs().max() for a, b in zip(restarted, six)) > 1e-5


def test_a_stopped_run_reports_its_last_completed_state():
    schedule = Schedule()
    net, adapter = lora_setup()
    for p in adapter.parameters():
        p.requires_grad_(True)
    x0 = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    den = denoiser(net, schedule)

    def loss_at_step(step):
        sigma, _, x = noisy_latent(schedule, x0, step_generator(0, step))
        return denoising_loss(schedule, sigma, den(x, sigma), x0)

    def cancel_at_4(step, loss):
        if step == 4:
            raise KeyboardInterrupt  # a BaseException, as ComfyUI's newer InterruptProcessingException
    progress, checkpoints = TrainProgress(), []
    try:
        train(adapter.parameters(), loss_at_step,
              OptimConfig(steps=10, learning_rate=1e-3, clip_grad_norm=1.0, checkpoint_every=2), cancel_at_4,
              progress=progress, on_checkpoint=lambda p: checkpoints.append(p.step))
    except KeyboardInterrupt:
        pass
    assert progress.step == 4 and checkpoints == [2, 4]
    assert all(int(s["step"]) == 4 for s in progress.optimizer_state)


def test_step_randomness_depends_on_seed_and_step_only():
    a = torch.randn(4, generator=step_generator(5, 17))
    assert torch.equal(a, torch.randn(4, generator=step_generator(5, 17)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(5, 18)))
    assert not torch.equal(a, torch.randn(4, generator=step_generator(6, 17)))


def test_all_ones_mask_is_bit_identical_and_a_mask_weights_the_loss():
    schedule = Schedule()
    g = torch.Generator().manual_seed(0)
    x0, pred = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 4, 16, 16, generator=g)
    sigma = schedule.sigmas[[400]]
    ones = torch.ones(1, 1, 16, 16)
    for loss in (denoising_loss, reconstruction_loss):
        assert torch.equal(loss(schedule, sigma, pred, x0), loss(schedule, sigma, pred, x0, ones))
    left = torch.zeros(1, 1, 16, 16)
    left[..., :8] = 1.0
    masked = denoising_loss(schedule, sigma, pred, x0, left)
    expected = denoising_loss(schedule, sigma, pred[..., :8], x0[..., :8])
    assert torch.allclose(masked, expected, rtol=1e-6)


def test_reconstruction_loss_is_the_official_formula():
    """L_rec = mean_b[(t/1000)² · mean|pool64(x̂0) - pool64(z0)|], x̂0 = (z_t - sqrt(1-ᾱ_t) ε̂)/sqrt(ᾱ_t), written
    in the official (VP, ε-prediction) form on a 2-item batch at a 128-latent (so pool64 averages 2x2 blocks)."""
    schedule = Schedule()
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(2, 4, 128, 128, generator=g)
    eps, eps_pred = torch.randn(2, 4, 128, 128, generator=g), torch.randn(2, 4, 128, 128, generator=g)
    t = torch.tensor([100, 850])
    alpha_bar = 1 / (1 + schedule.sigmas.double()[t] ** 2)  # σ² = (1-ᾱ)/ᾱ
    ab = alpha_bar.view(-1, 1, 1, 1)
    z_t = ab.sqrt() * z0 + (1 - ab).sqrt() * eps
    x0_hat = (z_t - (1 - ab).sqrt() * eps_pred) / ab.sqrt()
    per_item = (F.adaptive_avg_pool2d(x0_hat, 64) - F.adaptive_avg_pool2d(z0.double(), 64)).abs().mean(dim=(1, 2, 3))
    official = ((t.double() / 1000) ** 2 * per_item).mean()
    # the same quantities in ComfyUI's σ-space: x_σ = z0 + σε, denoised = x_σ - σε̂
    sigma = schedule.sigmas[t]
    x_sigma = schedule.noise_scaling(sigma, eps, z0)
    denoised = schedule.calculate_denoised(sigma, eps_pred, x_sigma)
    ours = reconstruction_loss(schedule, sigma, denoised, z0)
    assert math.isclose(float(ours), float(official), rel_tol=1e-5)


def test_fresh_crop_sampler_draws_a_new_crop_every_step_and_cuts_the_mask_with_it():
    image = torch.rand(1, 96, 96, 3, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 96, 96)
    mask[:, :, :48] = 1.0
    encode = lambda px: F.avg_pool2d(px.movedim(-1, 1), 8)  # noqa: E731 - a stand-in "VAE": 8x down
    patch = PatchConfig(working_size=128, train_resolution=64, grid_size=16, crop_bank=0).resolved("sd1")
    calls = []
    counted = lambda px: calls.append(1) or encode(px)  # noqa: E731
    sampler = training_sampler(image, counted, FinetuneSettings(), "sd1", patch, torch.Generator(), mask)
    assert isinstance(sampler, FreshCropSampler) and not calls  # nothing encoded before training
    draws = [sampler.draw(step_generator(0, k)) for k in range(4)]
    assert len(calls) == 4 and len({tuple(box[0].tolist()) for _, box, _ in draws}) == 4
    for latent, box, m in draws:
        y0, x0, y1, x1 = box[0].tolist()  # grid cells of 8 px on the 128-px canvas; the mask's edge is at x = 64
        assert latent.shape == (1, 3, 8, 8) and m.shape == (1, 1, 8, 8)
        if x1 <= 8:
            assert torch.all(m == 1)
        elif x0 >= 8:
            assert torch.all(m == 0)
    again = sampler.draw(step_generator(0, 2))
    assert torch.equal(again[0], draws[2][0]) and torch.equal(again[1], draws[2][1])
    banked = training_sampler(image, encode, FinetuneSettings(), "sd1",
                              PatchConfig(working_size=128, train_resolution=64, grid_size=16,
                                          crop_bank=3).resolved("sd1"), torch.Generator(), mask)
    assert isinstance(banked, BankSampler) and banked.latents.shape[0] == 3 and banked.masks.shape[0] == 3


def test_plain_mode_mask_is_resized_like_comfyui():
    image = torch.rand(1, 80, 120, 3)
    mask = torch.rand(1, 80, 120)
    encode = lambda px: F.avg_pool2d(px.movedim(-1, 1), 8)  # noqa: E731
    sampler = training_sampler(image, encode, FinetuneSettings(resolution=64), "sd1", None, torch.Generator(), mask)
    expected = F.interpolate(mask.reshape(-1, 1, 80, 120), size=(8, 8), mode="bilinear")  # comfy prepare_mask
    assert torch.equal(sampler.masks, expected)


def test_optimizer_state_rides_in_the_file_beside_the_lora_keys():
    _, adapter = lora_setup()
    names = [n for n, _ in adapter.named_parameters()]
    adapter.optimizer_state = {n: {"step": torch.tensor(3.0), "exp_avg": torch.randn(p.shape),
                                   "exp_avg_sq": torch.rand(p.shape)} for n, p in adapter.named_parameters()}
    adapter.settings = {"steps": 3}
    sd = state_dict(adapter)
    lora_keys = {k for k in sd if not k.startswith(OPTIM_PREFIX)}
    assert lora_keys and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in lora_keys)
    loaded = from_state_dict(sd, metadata(adapter, sd))
    assert sorted(loaded.optimizer_state) == sorted(names)
    for n in names:
        for field, t in adapter.optimizer_state[n].items():
            assert torch.equal(loaded.optimizer_state[n][field], t)
    plain = SineAdapter(unet=adapter.unet, text_encoder={}, family="sd1", source_prompt="photo of a sks dog")
    assert from_state_dict(state_dict(plain), metadata(plain, state_dict(plain))).optimizer_state is None


def test_paper_preset_trains_10000_steps_in_patch_mode_and_has_no_clipping():
    assert resolve_settings("paper", steps=5).steps == 800
    assert resolve_settings("paper", patch_mode=True, steps=5).steps == 10_000
    assert resolve_settings("paper").clip_grad_norm == 0
    assert resolve_settings("custom", patch_mode=True, steps=5).steps == 5
    assert PatchConfig().recon_loss
