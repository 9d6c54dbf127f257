"""Benchmark (not a test): SINE Sweep of N settings vs ONE SINE Guided Sampler run, measured in the same process.

    COMFYUI_PATH=/path/to/ComfyUI .venv-tests/bin/python tests/benchmarks/bench_sweep.py \
        [--size 128] [--steps 8] [--repeats 3] [--op-settings 8] [--time-settings 4]

Two measures, both on the random-weight SD1.5 fixture, same seed / sampler / scheduler / steps, cfg 7.5, window
start 0.0, one LoRA adapter; nodes called by node id as ComfyUI's executor calls them (SINE Guider -> SINE Sweep,
no VAE: the grid is the latent colour preview; SINE Guided Sampler for the single run):

1. Architecture proxy (what a launch-bound GPU pays): non-view aten operations dispatched during the node call,
   counted as bench_op_count.py counts them (tests/op_counter.py), for a sweep of --op-settings settings (weights x window ends, e.g. 8 = 4 x 2) vs one run
   with the paper's setting (0.3, 0.6). On a GPU at batch 1 and 512 px a SINE step is mostly launch overhead
   (issue 22: 0.051 s per step on an H200), so the op ratio approximates the time ratio there. Counted at 64 px:
   the count does not depend on the image size.
2. CPU time (FLOP-bound here): seconds of the node call at --size for a sweep of --time-settings settings vs one
   run, interleaved (single, sweep, single, sweep, ...) after one warm-up each; min / median / spread over
   --repeats rounds, ratio of medians.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timing  # noqa: E402

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=128, help="image side (px) of the CPU time measurement")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (at least 3)")
    p.add_argument("--op-settings", type=int, default=8, help="settings of the op-count sweep (4, 8, 12, 16, ...)")
    p.add_argument("--time-settings", type=int, default=4, help="settings of the timed sweep")
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--work", default="/tmp/sine_bench_sweep")
    args = p.parse_args()
    timing.check_repeats(args.repeats)
    import torch
    import comfy_workloads as w
    from op_counter import OpCounter
    setup = w.edit_setup(Path(args.work))
    model = setup["model"]
    kw = dict(positive=setup["positive"], negative=setup["negative"], steps=args.steps, sampler=args.sampler,
              scheduler=args.scheduler, adapter=setup["adapter"], source_conditioning=setup["source_conditioning"])
    for n in (args.op_settings, args.time_settings):
        if n not in w.SWEEP_SETTINGS:
            sys.exit(f"--op-settings / --time-settings: choose from {sorted(w.SWEEP_SETTINGS)}")

    def single(size, seed):  # SINE Guided Sampler with the paper's setting (0.3, window 0.0-0.6)
        return w.sample("sine", model, size=size, seed=seed, **kw)

    def sweep(size, seed, n):
        return w.sweep(model, settings=n, size=size, seed=seed, **kw)

    # 1. op counts (one call each after a warm-up, so lazy set-up is not counted)
    counts = {}
    for label, fn in (("single", lambda: single(64, 1)), ("sweep", lambda: sweep(64, 1, args.op_settings))):
        fn()
        with OpCounter() as c:
            fn()
        counts[label] = c.ops
    # 2. CPU time
    def variant(fn):
        def run(rnd):
            t = timing.clock()
            fn(100 + rnd)
            return {"run_s": timing.clock() - t}
        return run

    stats = timing.interleaved({"single": variant(lambda seed: single(args.size, seed)),
                                "sweep": variant(lambda seed: sweep(args.size, seed, args.time_settings))},
                               repeats=args.repeats, warmup=1, log=lambda m: print(m, flush=True))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nSweep benchmark: SD1.5 architecture, {args.steps} steps {args.sampler}/{args.scheduler}, device {device}")
    print(f"non-view aten ops per node call (64 px): one SINE Guided Sampler run {counts['single']}, SINE Sweep of "
          f"{args.op_settings} settings {counts['sweep']} = {counts['sweep'] / counts['single']:.2f}x "
          f"(architecture proxy for a launch-bound GPU; target <= 2x)")
    header = ["variant"] + timing.stats_header("run s")
    rows = [[label] + timing.stats_cells(stats[k]["run_s"], 2)
            for label, k in (("one SINE Guided Sampler run", "single"),
                             (f"SINE Sweep, {args.time_settings} settings", "sweep"))]
    print(f"CPU time at {args.size}x{args.size}, {args.repeats} interleaved rounds after one warm-up each:")
    print(timing.table(header, rows))
    ratio = timing.ratio_of_medians(stats["sweep"]["run_s"], stats["single"]["run_s"])
    print(f"ratio of medians, sweep of {args.time_settings} / one run: {ratio:.2f}x "
          f"(= {ratio / args.time_settings:.2f}x per setting; FLOP-bound CPU: about {args.time_settings}x expected)")


if __name__ == "__main__":
    main()
