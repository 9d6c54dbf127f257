"""Benchmark (not a test): seconds per training step and peak memory, all measured in one run, same model/size.

    COMFYUI_PATH=/path/to/ComfyUI .venv-tests/bin/python tests/benchmarks/bench_finetune.py \
        [--size 256] [--rank 8] [--layers all] [--repeats 3]

Rows:
- bare: the UNet's forward + backward (to its input) through ComfyUI's apply_model, no adapters;
- SINE Finetune: the SINE_Finetune node (LoRA, AdamW), per step;
- native Train LoRA: ComfyUI's own TrainLoraNode at the same rank, precision and layers ("all": it adapts every
  weight), gradient checkpointing off for both;
- crop bank: one VAE encode of a training crop (what a per-step encode would add) vs the bank set-up.
Per-step times come from two runs with different step counts ((T_long - T_short) / (steps difference)), after
one untimed run, so model loading, set-up and first-call overheads are excluded (the native node reports its
steps to tqdm only, not to ComfyUI's progress bar, so the progress-bar clock of the GPU check cannot be used). Each measurement runs in its own process, to read its own peak memory
(max RSS on CPU; max allocated on CUDA), and the processes are interleaved: bare, SINE, native, crop bank, bare,
SINE, ... for --repeats rounds; min / median / spread are over the rounds, ratios are of medians. Nodes are
called by node id (ComfyUI's NODE_CLASS_MAPPINGS) as ComfyUI's executor calls them.
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timing  # noqa: E402

VARIANTS = ("bare", "sine", "native", "crop_bank")


def variant(name: str, args) -> dict:
    import torch
    import comfy_workloads as w
    s, fx = w.start(Path(args.work) / name)
    model, clip, vae = w.load_checkpoint(fx)
    image = w.source_image(fx)
    short, long = args.steps_short, args.steps_long
    cuda = torch.cuda.is_available()

    if name == "bare":
        bare = w.BareUNet(s, model, w.encode_text(clip, w.PROMPT), args.size)

        def steps(n):
            t = timing.clock()
            for _ in range(n):
                bare.step()
            return timing.clock() - t
        steps(1)
    elif name == "sine":
        def steps(n):
            w.clear_sine_cache()  # time training, not the cache (the seed changes too)
            t = timing.clock()
            w.sine_finetune(model, clip, vae, image, steps=n, resolution=args.size, seed=n, rank=args.rank,
                            layers=args.layers)
            return timing.clock() - t
    elif name == "native":
        scaled = w.call_node("ImageScale", image=image, upscale_method="bicubic", width=args.size,
                             height=args.size, crop="disabled")[0]
        latents = w.call_node("VAEEncode", pixels=scaled, vae=vae)[0]
        positive = w.encode_text(clip, w.PROMPT)

        def steps(n):
            t = timing.clock()
            w.call_node("TrainLoraNode", model=model, latents=latents, positive=positive, batch_size=1,
                        grad_accumulation_steps=1, steps=n, learning_rate=1e-4, rank=args.rank, optimizer="AdamW",
                        loss_function="MSE", seed=n, training_dtype="fp32", lora_dtype="fp32", algorithm="LoRA",
                        gradient_checkpointing=False, existing_lora="[None]")
            return timing.clock() - t
    elif name == "crop_bank":  # what a per-step VAE encode of the crop would add to every training step
        def steps(n):
            t = timing.clock()
            for i in range(n):
                w.vae_encode_crop(vae, args.size, seed=i)
            return timing.clock() - t
        steps(1)
    else:
        raise ValueError(name)
    if name in ("sine", "native"):
        steps(short)  # untimed: first-call overheads would otherwise inflate T_short only
    t_short, t_long = steps(short), steps(long)
    return {"per_step_s": (t_long - t_short) / (long - short), "peak_mb": timing.PeakMemory(cuda).read()}


def run_variant(name: str, rnd: int) -> dict:
    cmd = [sys.executable, __file__, "--variant", name] + sys.argv[1:]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    if out.returncode or not line:
        sys.exit(f"{name} (round {rnd + 1}) failed:\n{out.stderr[-4000:]}")
    return json.loads(line[-1][len("RESULT "):])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", default="all", choices=["attention", "attention+ff", "all"])
    p.add_argument("--steps-short", type=int, default=2)
    p.add_argument("--steps-long", type=int, default=6)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (at least 3)")
    p.add_argument("--work", default="/tmp/sine_bench_finetune")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps_long <= args.steps_short:
        p.error("--steps-long must be larger than --steps-short")
    if args.variant:
        print("RESULT " + json.dumps(variant(args.variant, args)), flush=True)
        return
    timing.check_repeats(args.repeats)

    def launcher(name):
        def run(rnd):
            return run_variant(name, rnd)
        return run

    t0 = time.perf_counter()
    stats = timing.interleaved({n: launcher(n) for n in VARIANTS}, repeats=args.repeats,
                               log=lambda m: print(m, flush=True))
    bare, sine, native, bank = (stats[k]["per_step_s"] for k in VARIANTS)
    import torch
    print(f"\nSINE Finetune benchmark: SD1.5 architecture, {args.size}x{args.size}, batch 1, LoRA rank {args.rank}, "
          f"layers '{args.layers}', fp32, device {'cuda' if torch.cuda.is_available() else 'cpu'}, "
          f"{args.repeats} interleaved rounds of one process per variant ({time.perf_counter() - t0:.0f} s)")
    header = ["variant"] + timing.stats_header("s/step") + ["peak MB median", "vs bare", "vs native"]
    rows = []
    for label, key in (("bare UNet fwd+bwd", "bare"), ("SINE Finetune", "sine"), ("native Train LoRA", "native")):
        r = stats[key]["per_step_s"]
        rows.append([label] + timing.stats_cells(r) + [f"{stats[key]['peak_mb'].median:.0f}",
                                                       f"{timing.ratio_of_medians(r, bare):.2f}",
                                                       f"{timing.ratio_of_medians(r, native):.2f}"])
    print(timing.table(header, rows))
    enc = bank.median
    print(f"(ratios are of medians) crop bank: one VAE encode of a {args.size}px crop takes {enc:.3f} s median "
          f"(min {bank.min:.3f}, spread {bank.spread:.3f}) = {timing.ratio_of_medians(bank, sine):.0%} of a SINE "
          f"training step; a 32-crop bank pays it 32 times once ({enc * 32:.0f} s) instead of at every step "
          f"({enc * 400:.0f} s over 400 steps, {enc * 10000:.0f} s over the paper's 10,000).")


if __name__ == "__main__":
    main()
