"""Benchmark (not a test): what a fresh VAE-encoded crop at every step (patch mode, crop_bank 0, the official
code's pipeline) costs per training step against a bank of crops encoded once, measured in one run.

    COMFYUI_PATH=/path/to/ComfyUI .venv-tests/bin/python tests/benchmarks/bench_fresh_crops.py \
        [--size 256] [--steps 6] [--repeats 3]

Both variants run SINE Finetune in patch mode on the random-weight SD1.5 fixture (LoRA rank 16 on attention, fp32,
canvas 2x the crop size, as the paper's 1024/512), interleaved (fresh, bank, fresh, ...) in one ComfyUI process.
Seconds per step come from ComfyUI's progress bar (timing.StepTimer: the first step, set-up and the bank's
encodes excluded), so "fresh / bank" is the per-step price of the paper's crop variety. Printed: min / median /
spread and the ratio of medians. The paper's size is --size 512 (slow on a CPU).
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
    p.add_argument("--size", type=int, default=256, help="crop (training) side in px, multiple of 64")
    p.add_argument("--steps", type=int, default=6, help="training steps per measurement (at least 3)")
    p.add_argument("--bank", type=int, default=4, help="crop_bank of the banked variant")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (at least 3)")
    args = p.parse_args()
    timing.check_repeats(args.repeats)
    _, fx = w.start(Path(tempfile.mkdtemp(prefix="sine_bench_crops_")))
    model, clip, vae = w.load_checkpoint(fx)
    image = w.source_image(fx)

    def variant(crop_bank):
        def run(rnd):
            patch = w.call_node("SINE_PatchResolutionConfig", working_size=2 * args.size,
                                train_resolution=args.size, min_crop_frac=0.1, max_crop_frac=1.0,
                                whole_image_prob=0.0, grid_size=64, interpolation="bilinear", grid_gate=False,
                                crop_bank=crop_bank, recon_loss=True)[0]
            w.clear_sine_cache()
            with timing.StepTimer() as timer:
                w.sine_finetune(model, clip, vae, image, steps=args.steps, resolution=0, seed=2000 + rnd,
                                patch_config=patch)
            return timer.per_step(args.steps)
        return run

    stats = timing.interleaved({"fresh crop every step": variant(0), f"bank of {args.bank}": variant(args.bank)},
                               repeats=args.repeats, warmup=1, log=lambda m: print(m, flush=True))
    fresh, bank = (s["s"] for s in stats.values())
    print(f"\nPatch-mode crops: SD1.5 architecture, {args.size}px crops of a {2 * args.size}px canvas, "
          f"{args.steps} steps, device {w.device()}, {args.repeats} interleaved rounds")
    print(timing.table(["variant"] + timing.stats_header("s/step"),
                       [[name] + timing.stats_cells(s["s"]) for name, s in stats.items()]))
    print(f"(medians) fresh / bank = {timing.ratio_of_medians(fresh, bank):.3f}: a fresh crop adds "
          f"{fresh.median - bank.median:.3f} s ({fresh.median / bank.median - 1:.1%}) to every step")


if __name__ == "__main__":
    main()
