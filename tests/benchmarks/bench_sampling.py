"""Benchmark (not a test): SINE Guided Sampler vs the stock KSampler, measured in the same run.

    COMFYUI_PATH=/path/to/ComfyUI .venv-tests/bin/python tests/benchmarks/bench_sampling.py \
        [--size 256] [--steps 10] [--repeats 3]

Same checkpoint (random-weight SD1.5 fixture), seed, sampler, scheduler, steps and resolution, batch 1; SINE
uses the paper's defaults (fine-tuned weight 0.3, window 0.0-0.6, cfg 7.5) with one LoRA adapter. Both nodes are
called by node id (ComfyUI's NODE_CLASS_MAPPINGS) as ComfyUI's executor calls them. After one warm-up each, the
runs alternate (KSampler, SINE, KSampler, SINE, ...) for --repeats rounds; min / median / spread are over those
rounds, and the ratio is SINE's median over KSampler's. Two measures: the whole node call, and seconds per step
between the first and last step reported to ComfyUI's progress bar. Where the cost grows linearly with the
batch, SINE costs 1.5x per step inside the window (3 predictions per guided step in one batch instead of 2),
i.e. 0.6 * 1.5 + 0.4 = 1.3x over the run; a batch of 3 usually costs less than 1.5 batches of 2.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timing  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (at least 3)")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--work", default="/tmp/sine_bench_sampling")
    args = p.parse_args()
    timing.check_repeats(args.repeats)
    import torch
    import comfy_workloads as w
    setup = w.edit_setup(Path(args.work))
    model, pos, neg = setup["model"], setup["positive"], setup["negative"]
    src_cond, adapter = setup["source_conditioning"], setup["adapter"]

    def variant(kind):
        def run(rnd):
            seed = 100 + rnd
            with timing.StepTimer() as st:
                t = timing.clock()
                w.sample(kind, model, positive=pos, negative=neg, size=args.size, steps=args.steps, seed=seed,
                         sampler=args.sampler, scheduler=args.scheduler, adapter=adapter,
                         source_conditioning=src_cond)
                total = timing.clock() - t
            return {"run_s": total, "step_s": st.per_step(args.steps)}
        return run

    stats = timing.interleaved({"ksampler": variant("ksampler"), "sine": variant("sine")}, repeats=args.repeats,
                               warmup=1, log=lambda m: print(m, flush=True))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nSampling benchmark: SD1.5 architecture, {args.size}x{args.size}, {args.steps} steps "
          f"{args.sampler}/{args.scheduler}, batch 1, device {device}, {args.repeats} interleaved rounds "
          "(KSampler, SINE, KSampler, SINE, ...) after one warm-up each")
    header = ["sampler"] + timing.stats_header("run s") + timing.stats_header("s/step")
    rows = [[label] + timing.stats_cells(stats[k]["run_s"], 2) + timing.stats_cells(stats[k]["step_s"], 3)
            for label, k in (("stock KSampler", "ksampler"), ("SINE Guided Sampler", "sine"))]
    print(timing.table(header, rows))
    run_ratio = timing.ratio_of_medians(stats["sine"]["run_s"], stats["ksampler"]["run_s"])
    step_ratio = timing.ratio_of_medians(stats["sine"]["step_s"], stats["ksampler"]["step_s"])
    print(f"ratio of medians, SINE / KSampler: whole run {run_ratio:.2f}x, per step {step_ratio:.2f}x "
          "(target <= 1.25x with the paper window)")


if __name__ == "__main__":
    main()
