"""The guidance window in noise-level terms under every kind of ComfyUI model_sampling (real ComfyUI classes).

The window is end_sigma < sigma <= start_sigma with the bounds from the model's own `percent_to_sigma`; before,
it compared `model_sampling.timestep(sigma)` with 0..1000, a DDPM timestep only on discrete schedules.
"""
import pytest
import torch

PAPER = (0.0, 0.6)  # start_percent, end_percent: the paper's K = 400


def sampling(kind: str):
    from comfy import model_sampling as ms
    classes = {"eps": (ms.ModelSamplingDiscrete, ms.EPS), "v_prediction": (ms.ModelSamplingDiscrete, ms.V_PREDICTION),
               "zsnr": (ms.ModelSamplingDiscrete, ms.V_PREDICTION), "edm": (ms.ModelSamplingContinuousEDM, ms.EDM),
               "flow": (ms.ModelSamplingDiscreteFlow, ms.CONST)}[kind]
    cls = type(f"Sampling_{kind}", classes, {})
    m = cls(zsnr=True) if kind == "zsnr" else cls()
    if kind == "flow":
        m.set_parameters(shift=3.0)
    return m


def guided_steps(comfy, model_sampling, sigmas, window=PAPER):
    guidance = comfy.pack_module("nodes.guidance")
    window_active = comfy.pack_module("sine_ops.guidance").window_active
    entry = guidance.GuidanceEntry(None, [], 0.3, *window)
    bounds = guidance.window_sigmas(model_sampling, entry)
    return [window_active(float(s), *bounds) for s in sigmas[:-1]]


@pytest.mark.parametrize("kind", ["eps", "v_prediction", "zsnr", "edm", "flow"])
@pytest.mark.parametrize("scheduler", ["normal", "karras", "simple"])
def test_window_fires_on_the_high_noise_steps(comfy, kind, scheduler):
    from comfy import samplers
    ms = sampling(kind)
    sigmas = samplers.calculate_sigmas(ms, scheduler, 20)
    guided = guided_steps(comfy, ms, sigmas)
    assert guided[0] and not guided[-1]
    first_off = guided.index(False)
    assert all(guided[:first_off]) and not any(guided[first_off:])  # one contiguous high-noise block
    boundary = float(ms.percent_to_sigma(0.6))
    assert all((float(s) > boundary) == g for s, g in zip(sigmas[:-1], guided))
    if kind in ("eps", "v_prediction", "zsnr"):  # discrete: in DDPM timesteps, t > 0.4 * 999 = 399.6
        t = ms.timestep(sigmas[:-1].float())
        assert [bool(x > 399.6) for x in t] == guided


def test_old_timestep_rule_never_fired_under_edm(comfy):
    """What the sigma window fixes: timestep(sigma) = 0.25 log(sigma) under EDM is never above 400."""
    from comfy import samplers
    ms = sampling("edm")
    sigmas = samplers.calculate_sigmas(ms, "karras", 20)
    assert float(ms.timestep(sigmas[:-1]).max()) < 400
    assert sum(guided_steps(comfy, ms, sigmas)) >= 5


@pytest.mark.parametrize("kind", ["eps", "v_prediction", "zsnr"])
@pytest.mark.parametrize("scheduler,steps", [("ddim_uniform", 50), ("ddim_uniform", 100), ("normal", 5),
                                             ("normal", 8), ("karras", 5), ("karras", 8), ("normal", 30)])
def test_discrete_schedules_guide_the_same_steps_as_the_timestep_rule(comfy, kind, scheduler, steps):
    """Paper defaults on discrete schedules: the same steps are guided as with the earlier rule t > 400, so their
    results are bit-identical (the UNet sees the same batches)."""
    from comfy import samplers
    ms = sampling(kind)
    sigmas = samplers.calculate_sigmas(ms, scheduler, steps)
    old_rule = [float(ms.timestep(s[None])) > 400 for s in sigmas[:-1]]
    assert guided_steps(comfy, ms, sigmas) == old_rule


def test_integer_step_at_k_is_guided_as_the_official_sampler(comfy):
    """ddim_uniform with 52 steps lands exactly on t = 400: the official DDIM sampler guides it (t >= K); the
    paper's t > K would not. ComfyUI's percent convention (K at t = 399.6) gives the official behaviour."""
    from comfy import samplers
    ms = sampling("eps")
    sigmas = samplers.calculate_sigmas(ms, "ddim_uniform", 52)
    t = [round(float(ms.timestep(s[None]))) for s in sigmas[:-1]]
    at_k = t.index(400)
    assert guided_steps(comfy, ms, sigmas)[at_k]
    assert not guided_steps(comfy, ms, sigmas)[at_k + 1]


def test_window_bounds_and_empty_windows(comfy):
    from comfy import samplers
    ms = sampling("eps")
    sigmas = samplers.calculate_sigmas(ms, "normal", 10)
    assert all(guided_steps(comfy, ms, sigmas, (0.0, 1.0)))
    assert not any(guided_steps(comfy, ms, sigmas, (0.5, 0.5)))
    late = guided_steps(comfy, ms, sigmas, (0.3, 1.0))
    assert not late[0] and late[-1]
    assert torch.is_tensor(sigmas)
