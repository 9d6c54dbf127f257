"""SINE Sweep inside real ComfyUI: each row equals the single SINE Guided Sampler run with its setting and seed.

Why 1e-4 relative and not bit for bit: a sweep row goes through the UNet in a batch of 3 x rows (edit, negative
and fine-tuned rows of every setting), the single run in a batch of 3 (2 outside its window). The rows' values are
the same computation, but torch's CPU kernels (matmul / conv blocking, attention) pick their summation order by the
batch shape, so results differ in the last bits (measured: a few 1e-6 relative after 4 steps); the weight-mix
arithmetic itself is the same (sine_ops.guidance.mix_conditional_maps, a zero weight leaves the edit prediction
exactly). Where the batches match (a one-row sweep) the result is bit for bit.
"""
import pytest
import torch

from test_guidance_sampling import EDIT, adapter_nodes, noise_masked, run_latent, unet_calls
from workflows_api import sine_sample_graph

REL = 1e-4


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def sweep_graph(fixtures, nodes, *, weights="0.2, 0.5", ends="0.5, 0.8", steps=4, sampler="euler",
                scheduler="normal", seed=3, prompts=None, rows_per_chunk=0, vae=True, weight_on_guider=0.3):
    """SINE Finetune -> SINE Guider -> SINE Sweep (-> grid saved), same graph shape as sine_sample_graph."""
    g = sine_sample_graph(fixtures["checkpoint"], nodes, edit=EDIT, seed=seed, steps=steps, sampler=sampler,
                          scheduler=scheduler)
    del g["sample"], g["save"]
    g["guider"] = {"class_type": "SINE_Guider", "inputs": {
        "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "cfg": 7.5,
        "sine_adapter": ["finetune", 3], "source_conditioning": ["finetune", 2], "finetuned_weight": weight_on_guider,
        "start_percent": 0.0, "end_percent": 0.6}}
    inputs = {"guider": ["guider", 0], "seed": seed, "steps": steps, "sampler_name": sampler,
              "scheduler": scheduler, "latent_image": ["latent", 0], "denoise": 1.0, "finetuned_weights": weights,
              "end_percents": ends, "rows_per_chunk": rows_per_chunk}
    if vae:
        inputs["vae"] = ["ckpt", 2]
    if prompts is not None:
        inputs.update(prompts=prompts, clip=["ckpt", 1])
    g["sweep"] = {"class_type": "SINE_Sweep", "inputs": inputs}
    g["save"] = {"class_type": "SaveLatent", "inputs": {"samples": ["sweep", 0], "filename_prefix": "sweep"}}
    g["grid"] = {"class_type": "PreviewImage", "inputs": {"images": ["sweep", 1]}}
    return g


def single(comfy, fixtures, nodes, *, weight, end, edit=EDIT, steps=4, sampler="euler", scheduler="normal", seed=3):
    return run_latent(comfy, sine_sample_graph(fixtures["checkpoint"], nodes, edit=edit, seed=seed, steps=steps,
                                               sampler=sampler, scheduler=scheduler, weight=weight, end=end))


@pytest.fixture(scope="module")
def nodes(comfy, fixtures):
    return adapter_nodes(fixtures)


def test_each_row_equals_the_single_guided_sampler_run(comfy, fixtures, nodes):
    with unet_calls(comfy) as calls:
        comfy.run(sweep_graph(fixtures, nodes))
    rows = comfy.node_output("sweep", 0)["samples"]
    settings = comfy.node_output("sweep", 2).splitlines()
    assert rows.shape[0] == 4 and len(settings) == 4
    assert {rows for _, rows in calls} <= {8, 12}  # ONE forward per step: 4 rows x (edit, negative[, fine-tuned])
    grid = comfy.node_output("sweep", 1)
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[1] > 2 * 64 and grid.shape[2] > 2 * 64
    order = [(0.2, 0.5), (0.2, 0.8), (0.5, 0.5), (0.5, 0.8)]  # weight-major, then window end
    for i, (w, e) in enumerate(order):
        assert settings[i].startswith(f"row {i}: finetuned_weight {w:g}, end_percent {e:g}")
        diff = rel_diff(rows[i:i + 1], single(comfy, fixtures, nodes, weight=w, end=e))
        print(f"row {i} (weight {w}, end {e}): max relative difference to the single run {diff:.2e}")
        assert diff < REL, (i, w, e, diff)
    assert (rows[0] - rows[3]).abs().max() > 1e-3  # the settings do change the result


def test_one_row_sweep_is_bit_identical_and_weight_zero_equals_stock_ksampler(comfy, fixtures, nodes):
    comfy.run(sweep_graph(fixtures, nodes, weights="0.3", ends="0.6"))
    assert torch.equal(comfy.node_output("sweep", 0)["samples"], single(comfy, fixtures, nodes, weight=0.3, end=0.6))
    stock = run_latent(comfy, sine_sample_graph(fixtures["checkpoint"], nodes, edit=EDIT, seed=3, steps=4,
                                                stock=True))
    with unet_calls(comfy) as calls:
        comfy.run(sweep_graph(fixtures, nodes, weights="0", ends="0.6"))
    assert torch.equal(comfy.node_output("sweep", 0)["samples"], stock)
    assert {rows for _, rows in calls} == {2}  # weight 0: no fine-tuned rows at all, as KSampler
    comfy.run(sweep_graph(fixtures, nodes, weights="0", ends="0.4, 0.6, 0.9"))
    many = comfy.node_output("sweep", 0)["samples"]
    assert all(rel_diff(many[i:i + 1], stock) < REL for i in range(3))


def test_chunks_give_the_same_rows(comfy, fixtures, nodes):
    comfy.run(sweep_graph(fixtures, nodes, weights="0.2, 0.5", ends="0.5, 0.8", rows_per_chunk=0))
    whole = comfy.node_output("sweep", 0)["samples"]
    with unet_calls(comfy) as calls:
        comfy.run(sweep_graph(fixtures, nodes, weights="0.2, 0.5", ends="0.5, 0.8", rows_per_chunk=3))
    chunked = comfy.node_output("sweep", 0)["samples"]
    assert {rows for _, rows in calls} <= {6, 9, 2, 3} and {2, 3} & {rows for _, rows in calls}  # 3 rows, then 1
    assert chunked.shape == whole.shape and rel_diff(chunked, whole) < REL
    bars = [(value, total) for value, total, node in comfy.progress if node == "sweep"]
    assert {total for _, total in bars} == {8} and bars[-1][0] == 8  # ONE bar over both chunks (2 x 4 steps)


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_2m_sde"])  # default noise; Brownian-tree noise
def test_stochastic_sampler_rows_get_the_same_noise(comfy, fixtures, nodes, sampler):
    comfy.run(sweep_graph(fixtures, nodes, weights="0.3, 0.5", ends="0.6", sampler=sampler, seed=11))
    rows = comfy.node_output("sweep", 0)["samples"]
    for i, w in enumerate((0.3, 0.5)):
        ref = single(comfy, fixtures, nodes, weight=w, end=0.6, sampler=sampler, seed=11)
        assert rel_diff(rows[i:i + 1], ref) < REL, (w, rel_diff(rows[i:i + 1], ref))
    assert (rows[0] - rows[1]).abs().max() > 1e-3


def test_prompt_list_rows_and_grid_labels(comfy, fixtures, nodes):
    other = "photo of a dog in the snow"
    comfy.run(sweep_graph(fixtures, nodes, weights="0.3", ends="0.6", prompts=f"{EDIT}\n\n  {other}  \n"))
    rows = comfy.node_output("sweep", 0)["samples"]
    settings = comfy.node_output("sweep", 2).splitlines()
    assert rows.shape[0] == 2 and settings[1].endswith(f"prompt '{other}'")
    for i, edit in enumerate((EDIT, other)):
        ref = single(comfy, fixtures, nodes, weight=0.3, end=0.6, edit=edit)
        assert rel_diff(rows[i:i + 1], ref) < REL
    sweep_ops = comfy.pack_module("sine_ops.sweep")
    rows_ = sweep_ops.sweep_rows(2, [0.3], [0.6])
    labels, columns, _ = sweep_ops.grid_layout(rows_, [EDIT, other])
    assert labels == ["w 0.3  photo of a dog ...", "w 0.3  photo of a dog ..."] and columns == ["K 400  (end 0.6)"]
    # without a VAE the grid is the latent colour preview (same layout)
    comfy.run(sweep_graph(fixtures, nodes, weights="0.3", ends="0.6", prompts=f"{EDIT}\n{other}", vae=False))
    assert comfy.node_output("sweep", 1).shape[0] == 1


@pytest.mark.parametrize("change,message", [
    (dict(weights="0.2, x"), "SINE Sweep: input 'finetuned_weights': 'x' is not a number"),
    (dict(weights=""), "SINE Sweep: input 'finetuned_weights': no weights given"),
    (dict(weights="0.3, 1.5"), r"SINE Sweep: input 'finetuned_weights': 1.5 is outside \[0, 1\]"),
    (dict(ends="0.6, 0.6"), "SINE Sweep: input 'end_percents': 0.6 is listed twice"),
    (dict(prompts="a\nb"), "SINE Sweep: input 'clip': a prompt list needs the CLIP"),
])
def test_bad_lists_are_clear_errors(comfy, fixtures, nodes, change, message):
    from comfyui_harness import WorkflowError
    g = sweep_graph(fixtures, nodes, **{k: v for k, v in change.items() if k != "prompts"})
    if "prompts" in change:
        g["sweep"]["inputs"]["prompts"] = change["prompts"]
    with pytest.raises(WorkflowError, match=message):
        comfy.run(g)


def test_guider_that_is_not_sine_is_refused(comfy, fixtures, nodes):
    from comfyui_harness import WorkflowError
    g = sweep_graph(fixtures, nodes)
    g["guider"] = {"class_type": "CFGGuider", "inputs": {"model": ["ckpt", 0], "positive": ["pos", 0],
                                                         "negative": ["neg", 0], "cfg": 7.5}}
    with pytest.raises(WorkflowError, match="SINE Sweep: input 'guider': expected the GUIDER of a SINE Guider"):
        comfy.run(g)


def test_cancel_stops_the_sweep(comfy, fixtures, nodes):
    from comfyui_harness import WorkflowError
    comfy.run(sweep_graph(fixtures, nodes, weights="0.3", ends="0.6", seed=20))  # the fine-tune is cached now
    comfy.interrupt_at = 2
    try:
        with pytest.raises(WorkflowError, match="interrupted|Interrupt"):
            comfy.run(sweep_graph(fixtures, nodes, rows_per_chunk=1, seed=21))
    finally:
        comfy.interrupt_at = None
    assert max(v for v, _, node in comfy.progress if node == "sweep") < 16  # stopped early: not all 4 chunks ran
    comfy.run(sweep_graph(fixtures, nodes, weights="0.3", ends="0.6", seed=22))  # the next run works
    assert comfy.node_output("sweep", 0)["samples"].shape[0] == 1


def test_chunk_size_follows_free_memory(comfy, fixtures, monkeypatch):
    """rows_per_chunk 0: the most rows whose batch (3 per row here) fits free memory by ComfyUI's own rule for its
    batches (memory_required x 1.5 < free), with the real model's memory estimate."""
    import comfy.model_management as mm
    sweep = comfy.pack_module("nodes.sweep")
    comfy.run({"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fixtures["checkpoint"]}},
               "show": {"class_type": "PreviewAny", "inputs": {"source": ["ckpt", 0]}}})
    model = comfy.node_output("ckpt", 0)
    mm.load_models_gpu([model])  # loaded: its weights are not counted against the free memory again
    shape = (1, 4, 8, 8)

    def needed(rows):
        return model.model.memory_required([rows * 3, *shape[1:]]) * 1.5
    for room in (1, 2, 3, 4):
        budget = (needed(room) + needed(room + 1)) / 2  # room for `room` rows, not one more
        monkeypatch.setattr(mm, "get_free_memory", lambda *args, **kwargs: budget)
        assert sweep.chunk_rows(model, shape, 3, 4, 0) == room
    assert sweep.chunk_rows(model, shape, 3, 4, 2) == 2  # a size the user set is kept


def test_ddim_rows_with_a_latent_noise_mask_equal_single_runs(comfy, fixtures, nodes):
    """ddim re-noises the kept region of a noise mask with noise ComfyUI draws for the whole batch: every row gets
    the 1-image draw (nodes/sweep.same_inpaint_noise), so rows after the first equal their single runs too."""
    kw = dict(sampler="ddim", scheduler="ddim_uniform", seed=13)
    comfy.run(noise_masked(sweep_graph(fixtures, nodes, weights="0.3, 0.5", ends="0.6", **kw), "sweep"))
    rows = comfy.node_output("sweep", 0)["samples"]
    for i, w in enumerate((0.3, 0.5)):
        ref = run_latent(comfy, noise_masked(sine_sample_graph(fixtures["checkpoint"], nodes, edit=EDIT, steps=4,
                                                               weight=w, end=0.6, **kw), "sample"))
        assert rel_diff(rows[i:i + 1], ref) < REL, (w, rel_diff(rows[i:i + 1], ref))
