"""The guider's window decisions without a host read (issue 19), inside real ComfyUI: with every sampler ComfyUI
lists, sampling follows the schedule on the host and gives what a read of every step's sigma gives, bit for bit,
also in the step the window end crosses (decided on both sides, picked on the device); no step reads back more
than ComfyUI's own CFGGuider does."""
import logging

import pytest
import torch
from test_finetune_compile import traced  # noqa: F401 (a fixture)

EDIT = "photo of a dog wearing a superhero cape"


@pytest.fixture(scope="module")
def sine_guider(comfy, fixtures):
    """`sine_guider(model)`: a SINE Guider on `model` (weight 0.3, the paper window) with an adapter fine-tuned for
    2 steps on the SD1.5 architecture proxy (model_channels 32: every layer of SD1.5 at almost no arithmetic, so
    that every sampler runs in seconds); `sine_guider.proxy` is that model."""
    from comfyui_fixtures import proxy_sd15_model
    mapping = comfy.nodes.NODE_CLASS_MAPPINGS
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        _, clip, vae = mapping["CheckpointLoaderSimple"]().load_checkpoint(fixtures["checkpoint"])[:3]
        image = mapping["LoadImage"]().load_image(fixtures["source_image"])[0]
        positive, negative = (mapping["CLIPTextEncode"]().encode(clip, text)[0] for text in (EDIT, ""))
        proxy = proxy_sd15_model(32, seed=5)
        finetuned = mapping["SINE_Finetune"].execute(
            model=proxy, clip=clip, vae=vae, image=image, source_prompt="photo of a sks dog", preset="custom",
            steps=2, learning_rate=1e-3, seed=0, method="lora", lora_rank=4, lora_alpha=4.0, layers="attention",
            text_encoder="off", precision="auto", gradient_checkpointing=False, resize="stretch", resolution=64,
            disk_cache=False).result

    def build(model):
        with torch.inference_mode():
            return mapping["SINE_Guider"].execute(
                model=model, positive=positive, negative=negative, cfg=7.5, sine_adapter=finetuned[3],
                source_conditioning=finetuned[2], finetuned_weight=0.3, start_percent=0.0,
                end_percent=0.6).result[0]
    build.proxy = proxy
    return build


@pytest.fixture(scope="module")
def guider(sine_guider):
    return sine_guider(sine_guider.proxy)


def sample(samplers, guider, sampler_name: str, sigmas, callback=None):
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11))
    with torch.inference_mode():  # as ComfyUI's executor runs SamplerCustomAdvanced
        return guider.sample(noise, torch.zeros(1, 4, 8, 8), samplers.sampler_object(sampler_name), sigmas,
                             callback=callback, disable_pbar=True, seed=3)


def schedule_across_the_window_end(model_patcher, steps=4):
    """A karras schedule whose window end (percent 0.6) falls strictly inside a middle step."""
    from comfy import samplers
    ms = model_patcher.get_model_object("model_sampling")
    sigmas = samplers.calculate_sigmas(ms, "karras", steps)
    end = float(ms.percent_to_sigma(0.6))
    inside = [i for i in range(steps) if float(sigmas[i + 1]) < end < float(sigmas[i])]
    assert inside and 0 < inside[0] < steps - 1, (sigmas, end)
    return sigmas


def test_every_sampler_decides_as_a_read_per_step(comfy, guider, caplog, monkeypatch):
    """Every sampler follows its schedule, the pack's table of those known to call off it left out: each is caught
    after its run exactly when it is in that table, and gives what a read per step gives."""
    from comfy import samplers
    gp = comfy.pack_module("nodes.guided_prediction")
    sigmas = schedule_across_the_window_end(guider.model_patcher)
    off, differ = set(), []
    caplog.set_level(logging.INFO, logger="sine")
    monkeypatch.setattr(gp, "known_off_schedule", lambda: frozenset())
    for name in samplers.KSampler.SAMPLERS:
        key = gp.sampler_key(samplers.sampler_object(name))
        gp.OFF_SCHEDULE_SAMPLERS.discard(key)
        followed = sample(samplers, guider, name, sigmas)
        if key in gp.OFF_SCHEDULE_SAMPLERS:
            off.add(name)  # caught after its run, sampled again reading each sigma
        gp.OFF_SCHEDULE_SAMPLERS.add(key)  # from here on this sampler's runs read every sigma
        read = sample(samplers, guider, name, sigmas)
        gp.OFF_SCHEDULE_SAMPLERS.discard(key)
        if not torch.equal(followed, read):
            differ.append((name, float((followed - read).abs().max())))
    assert not differ, differ
    assert off == set(gp.OFF_SCHEDULE_SAMPLER_NAMES)
    assert "SINE Guider: sampler comfy.samplers.ksampler.<locals>.dpm_adaptive_function calls the model off its " \
           "schedule's steps; sampling again" in caplog.text


def test_a_sampler_known_to_call_off_its_schedule_samples_once(comfy, guider, caplog):
    """With the table, the first run of such a sampler reads each sigma from the start: one run, no log line."""
    from comfy import samplers
    gp = comfy.pack_module("nodes.guided_prediction")
    sigmas = schedule_across_the_window_end(guider.model_patcher)
    caplog.set_level(logging.INFO, logger="sine")
    for name in gp.OFF_SCHEDULE_SAMPLER_NAMES:
        gp.OFF_SCHEDULE_SAMPLERS.discard(gp.sampler_key(samplers.sampler_object(name)))
        reports = []
        sample(samplers, guider, name, sigmas, callback=lambda step, *a: reports.append(step))
        assert reports and reports == sorted(set(reports)), (name, reports)  # one pass over the steps, not two
    assert "sampling again" not in caplog.text


def test_no_sampling_step_reads_back_more_than_stock(comfy, guider):
    """Host syncs per sampling step (OpCounter between the sampler's step reports), SINE Guider vs ComfyUI's own
    CFGGuider on the same model: SINE adds none, in the step the window end crosses too."""
    from comfy import samplers
    from op_counter import OpCounter
    stock = samplers.CFGGuider(guider.model_patcher)
    stock.original_conds = {k: guider.original_conds[k] for k in ("positive", "negative")}  # converted already
    stock.set_cfg(guider.cfg)
    sigmas = schedule_across_the_window_end(guider.model_patcher, steps=6)

    def syncs_per_step(g):
        sample(samplers, g, "euler", sigmas)  # warm-up: per-device adapter copies, caches
        marks = []
        with OpCounter() as c:
            sample(samplers, g, "euler", sigmas, callback=lambda *a: marks.append(sum(c.syncs.values())))
        return [b - a for a, b in zip(marks, marks[1:])]  # steps 1.. (step 0 holds the set-up)

    base, sine = syncs_per_step(stock), syncs_per_step(guider)
    assert len(sine) == len(base) == len(sigmas) - 2
    added = [s - b for s, b in zip(sine, base)]
    assert added == [0] * len(added), (sine, base)


def test_stock_torch_compile_model_before_the_guider(comfy, sine_guider, traced):
    """ComfyUI's TorchCompileModel on the MODEL that goes into SINE Guider (its execute, with the tracing-only
    backend instead of the UI's inductor or cudagraphs: see test_finetune_compile) samples what the uncompiled
    model samples. Each adapted layer reads its rows from the forward's routing context, which torch.compile
    cannot trace, so the compiled UNet runs in pieces (docs/compatibility.md)."""
    from comfy import samplers
    compile_node = comfy.nodes.NODE_CLASS_MAPPINGS["TorchCompileModel"]
    compiled_model = compile_node.execute(model=sine_guider.proxy, backend="aot_eager").result[0]
    sigmas = schedule_across_the_window_end(compiled_model)
    eager = sample(samplers, sine_guider(sine_guider.proxy), "euler", sigmas)
    compiled = sample(samplers, sine_guider(compiled_model), "euler", sigmas)
    assert traced["stats"]["unique_graphs"] >= 1, "nothing was compiled: no test"
    assert torch.allclose(compiled, eager, rtol=1e-5, atol=1e-5), float((compiled - eager).abs().max())
