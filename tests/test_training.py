"""sine_ops.training on a small UNet-like torch module: the step memorises one image, in the model's own space."""
import pytest
import torch
from torch import nn

from sine_ops.adapter_file import AdapterFileError, from_state_dict, metadata, state_dict
from sine_ops.config import OptimConfig
from sine_ops.sine_adapter import SineAdapter
from sine_ops.adapters import AdaptedForward, LoRA, RowRouter, adaptable_layers, conv_spec
from reference_forms import LinearDDPMSchedule, lora_delta_weight
from sine_ops.training import (TrainingDiverged, denoising_loss, noisy_latent,
                               output_space_scale, train)


class TinyUNet(nn.Module):
    """conv_in -> down conv -> time-conditioned mid -> up -> conv_out, with a skip: enough to overfit one image."""

    def __init__(self, ch=32):
        super().__init__()
        self.conv_in = nn.Conv2d(4, ch, 3, padding=1)
        self.down = nn.Conv2d(ch, ch, 3, stride=2, padding=1)
        self.time = nn.Linear(1, ch)
        self.mid = nn.Conv2d(ch, ch, 3, padding=1)
        self.up = nn.ConvTranspose2d(ch, ch, 4, stride=2, padding=1)
        self.conv_out = nn.Conv2d(2 * ch, 4, 3, padding=1)

    def forward(self, x, t):
        h0 = torch.relu(self.conv_in(x))
        h = torch.relu(self.down(h0)) + self.time(t[:, None] / 1000.0)[:, :, None, None]
        h = torch.relu(self.mid(h))
        return self.conv_out(torch.cat([torch.relu(self.up(h)), h0], 1))


def denoiser(net, schedule):
    def call(x, sigma):
        t = torch.searchsorted(schedule.sigmas, sigma).float()
        return schedule.calculate_denoised(sigma, net(schedule.calculate_input(sigma, x), t), x)
    return call


def held_out_loss(den, schedule, x0, seed=1234, n=32):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return float(torch.stack([denoising_loss(schedule, s, den(x, s), x0)
                                  for s, _, x in (noisy_latent(schedule, x0, g) for _ in range(n))]).mean())


def test_lora_training_memorises_one_image():
    torch.manual_seed(0)
    schedule, net = LinearDDPMSchedule(), TinyUNet()
    net.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    router = RowRouter()
    adapters = {}
    for name, m in adaptable_layers(net, lambda n, m: type(m) is nn.Conv2d):
        adapters[name] = LoRA(tuple(m.weight.shape), 4, 4.0, conv=conv_spec(m), generator=g)
        m.forward = AdaptedForward(m, name, {0: adapters[name]}, router)
    image_a, image_b = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    den = denoiser(net, schedule)
    before_a = held_out_loss(den, schedule, image_a)
    params = [p for a in adapters.values() for p in a.parameters()]

    def loss_at_step(step):
        sigma, _, x = noisy_latent(schedule, image_a, g)
        return denoising_loss(schedule, sigma, den(x, sigma), image_a)

    losses = train(params, loss_at_step, OptimConfig(steps=400, learning_rate=3e-3, clip_grad_norm=1.0))
    after_a, after_b = held_out_loss(den, schedule, image_a), held_out_loss(den, schedule, image_b)
    assert len(losses) == 400
    assert after_a < 0.5 * before_a, (before_a, after_a)
    assert after_a < 0.5 * after_b, (after_a, after_b)  # it learned THIS image, not denoising in general
    assert all(p.grad is None for p in net.parameters())


def test_loss_is_in_the_models_output_space():
    """ε-model: loss == mean((ε̂ - ε)²); a v-model-like affine output map gives the v-MSE."""
    schedule = LinearDDPMSchedule()
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    sigma, eps, x = noisy_latent(schedule, x0, g)
    eps_hat = eps + 0.1 * torch.randn(eps.shape, generator=g)
    denoised = schedule.calculate_denoised(sigma, eps_hat, x)
    assert torch.allclose(denoising_loss(schedule, sigma, denoised, x0), (eps_hat - eps).pow(2).mean(), rtol=1e-4)
    assert torch.allclose(output_space_scale(schedule, sigma, x0)[:, 0, 0, 0], -sigma)


def test_divergence_stops_with_the_step_and_a_hint():
    p = nn.Parameter(torch.ones(1))
    with pytest.raises(TrainingDiverged, match=r"step 3.*lower the learning rate"):
        train([p], lambda i: p.sum() * (float("nan") if i == 2 else 1.0),
              OptimConfig(steps=5, learning_rate=1e-3, clip_grad_norm=1.0))


def test_adapter_file_round_trip_and_damage_detection():
    g = torch.Generator().manual_seed(0)
    lora = LoRA((8, 6), 2, 2.0, generator=g)
    with torch.no_grad():
        lora.up.normal_(generator=g)
    ad = SineAdapter(unet={"diffusion_model.a.b": lora}, text_encoder={}, family="sd1", source_prompt="photo of a sks dog")
    sd = state_dict(ad)
    meta = metadata(ad, sd)
    back = from_state_dict(sd, meta)
    assert torch.equal(lora_delta_weight(back.unet["diffusion_model.a.b"]), lora_delta_weight(lora))
    sd["diffusion_model.a.b.lora_up.weight"][0, 0] += 1
    with pytest.raises(AdapterFileError, match="damaged"):
        from_state_dict(sd, meta)


def test_losses_are_read_back_only_when_asked_and_a_non_finite_step_is_skipped():
    """Issue 19: no host read per step (the losses wait on the device until read); with the fused AdamW a
    non-finite step changes nothing (skipped on the device) and the read names its step."""
    from sine_ops.training import TrainProgress
    from op_counter import OpCounter
    p = nn.Parameter(torch.ones(3))
    reads = []

    def on_step(step, loss):
        reads.append(torch.is_tensor(loss))

    progress = TrainProgress()
    with OpCounter() as c:
        train([p], lambda i: (p * 2).sum(), OptimConfig(steps=4, learning_rate=1e-2, clip_grad_norm=1.0), on_step,
              progress=progress)
    losses = progress.losses
    assert reads == [True] * 4 and len(losses) == 4 and losses[0] == 6.0  # on_step gets the loss as a tensor
    assert all(a > b for a, b in zip(losses, losses[1:]))
    assert c.syncs["item"] <= 1  # the one read at the end of the run (all four losses at once)
    q = nn.Parameter(torch.ones(2))
    progress = TrainProgress()
    before = None
    with pytest.raises(TrainingDiverged, match="step 2"):
        def loss(i):
            nonlocal before
            if i == 1:
                before = q.detach().clone()
                return q.sum() * float("nan")
            return q.sum()
        train([q], loss, OptimConfig(steps=2, learning_rate=1e-2, clip_grad_norm=0.0), progress=progress)
    assert torch.equal(q.detach(), before) and progress.step == 1  # the NaN step was skipped
