"""Benchmark (not a test): SINE Guided Sampler wall time vs the stock KSampler, measured in the same run.

    .venv-tests/bin/python tests/benchmarks/bench_sampling.py [--size 256] [--steps 10] [--repeats 2]

Same checkpoint, seed, sampler, scheduler, steps and resolution; SINE uses the paper's defaults (fine-tuned
weight 0.3, window 0.0-0.6, cfg 7.5) with one LoRA adapter. Runs alternate (stock, SINE, stock, SINE, ...)
after one warm-up each; the minimum of each is reported. The expected floor on CPU is about 1.30x: batch 3
instead of 2 in the guided 60% of steps.
"""
import argparse
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--work", default="/tmp/sine_bench_sampling")
    args = p.parse_args()
    from comfyui_fixtures import ensure_fixtures
    from comfyui_harness import ComfySession, find_comfyui
    from workflows_api import finetune_graph, sine_sample_graph
    s = ComfySession(find_comfyui(), Path(args.work))
    fx = ensure_fixtures(s.work / "models", s.work / "input", 1234,
                         importlib.import_module("comfyui_version").__version__)
    ft = finetune_graph(fx["checkpoint"], fx["source_image"], steps=3, lr=1e-3, resolution=64)
    adapter = {"image": ft["image"], "finetune": ft["finetune"]}
    kw = dict(edit="photo of a dog wearing a superhero cape", steps=args.steps, size=(args.size, args.size),
              sampler=args.sampler, scheduler=args.scheduler)
    graphs = {"stock": sine_sample_graph(fx["checkpoint"], adapter, stock=True, **kw),
              "sine": sine_sample_graph(fx["checkpoint"], adapter, **kw)}
    times = {"stock": [], "sine": []}
    for name, g in graphs.items():  # warm-up: model loads, adapter training (cached), first-call overheads
        s.run(g)
    for i in range(args.repeats):
        for name, g in graphs.items():
            g["sample"]["inputs"]["seed"] = 100 + i  # a new seed forces ComfyUI to re-run the sampler node
            t = time.perf_counter()
            s.run(g)
            times[name].append(time.perf_counter() - t)
    stock, sine = min(times["stock"]), min(times["sine"])
    device = "cuda" if __import__("torch").cuda.is_available() else "cpu"
    print(f"\nSampling benchmark: SD1.5 architecture, {args.size}x{args.size}, {args.steps} steps "
          f"{args.sampler}/{args.scheduler}, batch 1, device {device}")
    print(f"{'sampler':<24}{'seconds':>10}{'ratio':>8}")
    print(f"{'stock KSampler':<24}{stock:>10.2f}{1.0:>8.2f}")
    print(f"{'SINE Guided Sampler':<24}{sine:>10.2f}{sine / stock:>8.2f}")


if __name__ == "__main__":
    main()
