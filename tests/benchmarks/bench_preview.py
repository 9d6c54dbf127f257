"""Benchmark (not a test): what SINE Finetune's live previews cost per training step, measured in one run.

    COMFYUI_PATH=/path/to/ComfyUI .venv-tests/bin/python tests/benchmarks/bench_preview.py \
        [--size 128] [--steps 8] [--repeats 3]

Variants, interleaved (off, default, every step, off, ...) in one ComfyUI process on the random-weight SD1.5
fixture (LoRA rank 16 on attention, fp32): previews off; the shipped interval (nodes/training_run.py
PREVIEW_EVERY_S, first and last step always); a preview at every step (the worst case, which gives the cost of one
preview). Seconds per step come from ComfyUI's progress bar (timing.StepTimer: the first step, set-up and model
loading excluded). Printed: min / median / spread per variant, the ratios of medians to "off", and the overhead
of the shipped interval computed from the per-preview cost (the direct ratio is within the noise on a busy
machine). A small --size is the worst case: the preview costs the same at any size, a step does not.
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import comfy_workloads as w  # noqa: E402
import timing  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=128, help="training side in px (multiple of 64)")
    p.add_argument("--steps", type=int, default=8, help="training steps per measurement (at least 3)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (at least 3)")
    args = p.parse_args()
    timing.check_repeats(args.repeats)
    session, fx = w.start(Path(tempfile.mkdtemp(prefix="sine_bench_preview_")))
    from comfy.cli_args import LatentPreviewMethod, args as comfy_args
    comfy_args.preview_method = LatentPreviewMethod.Latent2RGB  # previews follow ComfyUI's setting (default: none)
    training_run = session.pack_module("nodes.training_run")
    shipped = training_run.PREVIEW_EVERY_S
    model, clip, vae = w.load_checkpoint(fx)
    image = w.source_image(fx)

    def variant(interval):
        def run(rnd):
            training_run.PREVIEW_EVERY_S = interval
            w.clear_sine_cache()
            session.previews.clear()  # the harness's progress hook records each preview (StepTimer passes them on)
            with timing.StepTimer() as timer:
                w.sine_finetune(model, clip, vae, image, steps=args.steps, resolution=args.size, seed=1000 + rnd)
            return {"per_step_s": timer.per_step(args.steps), "previews": len(session.previews)}
        return run

    variants = {"off": None, "shipped": shipped, "every_step": 0.0}
    stats = timing.interleaved({k: variant(v) for k, v in variants.items()}, repeats=args.repeats, warmup=1,
                               log=lambda m: print(m, flush=True))
    training_run.PREVIEW_EVERY_S = shipped
    off = stats["off"]["per_step_s"]
    rows = [[name] + timing.stats_cells(stats[name]["per_step_s"]) +
            [f"{stats[name]['previews'].median:.0f}", f"{timing.ratio_of_medians(stats[name]['per_step_s'], off):.3f}"]
            for name in variants]
    print(f"\nSINE Finetune live previews: SD1.5 architecture, {args.size}x{args.size}, {args.steps} steps, "
          f"device {w.device()}, {args.repeats} interleaved rounds")
    print(timing.table(["variant"] + timing.stats_header("s/step") + ["previews/run", "vs off"], rows))
    per_preview = stats["every_step"]["per_step_s"].median - off.median
    step = off.median
    per_step_share = per_preview * min(1.0, step / shipped) / step if shipped else per_preview / step
    print(f"(medians) one preview costs {per_preview * 1000:.1f} ms; a step takes {step:.3f} s. At the shipped "
          f"interval ({shipped} s) the previews cost {per_step_share:.2%} of training time at this size "
          f"(target: <= 2%).")


if __name__ == "__main__":
    main()
