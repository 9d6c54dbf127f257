"""Benchmark (not a test): dispatched aten operations and host syncs per step, SINE vs stock ComfyUI (issue 19).

    COMFYUI_PATH=/path/to/ComfyUI .venv-tests/bin/python tests/benchmarks/bench_op_count.py \
        [--size 64] [--steps 6] [--train-steps 3] [--channels 32]

On a fast GPU SINE's cost is the number of operations it launches, not arithmetic, and the GPU waits on the CPU.
This script counts, on the CPU, every non-view aten operation dispatched per step (tests/op_counter.py, a
TorchDispatchMode) and every host sync ("item": .item()/float(t)/bool(t); "nonzero"; "host data":
torch.tensor of Python values, a host-to-device copy on a GPU; "device copy": a .to(device) across devices, seen on
the CPU under --emulate-device-moves). Rows, all in one run and through ComfyUI's own nodes:
- KSampler: a sampling step of ComfyUI's KSampler (cond + uncond in one batch);
- SINE in the window: a step of SINE_GuidedSampler inside the paper window (fine-tuned weight 0.3, 0.0-0.6):
  3 rows (cond, uncond, fine-tuned source) in one batched forward with the LoRA routed to the third;
- SINE outside the window: a step after the window (plain CFG: nothing of SINE should run);
- bare UNet fwd+bwd: the UNet's forward and backward through apply_model on a trainable clone, no adapters;
- SINE Finetune step: a step of SINE_Finetune (LoRA rank --rank on --layers, AdamW, live previews off: they are
  measured by bench_preview.py).
Per-step counts are the differences between consecutive progress-bar updates (the first step, which holds the
set-up, is left out); min / median / spread are over the steps of a kind, ratios are of medians.

--channels 32 (the default) is the architecture proxy: the SD1.5 UNet (same blocks, layers, attention and
adapted layers, so the same operations) with model_channels 32 instead of 320, built through ComfyUI's SD15 model
class with seeded random weights: the op counts of the full model at almost no arithmetic, i.e. what a launch-
bound fast GPU sees. --channels 0 uses the fixture checkpoint's full-width UNet (slow on a CPU, same counts).
CLIP and VAE are the fixture checkpoint's.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timing  # noqa: E402

TARGETS = {"window": 1.30, "outside": 1.02, "finetune": 1.25}  # issue 19's CPU targets (ratios of op counts)
WINDOW = (0.0, 0.6)  # the paper's window, as comfy_workloads.sample uses


class StepCounts:
    """While entered: an OpCounter over everything, and its (ops, syncs) at every progress-bar update, so that
    per-step counts are the differences between updates (the hook installed before is passed on to)."""

    def __init__(self):
        from op_counter import OpCounter
        self.counter = OpCounter()
        self.marks: list[tuple[int, int, int]] = []  # (progress value, ops, syncs)

    def __enter__(self):
        import comfy.utils
        self._utils, self._previous = comfy.utils, comfy.utils.PROGRESS_BAR_HOOK
        comfy.utils.set_progress_bar_global_hook(self._hook)
        self.counter.__enter__()
        return self

    def __exit__(self, *exc):
        self.counter.__exit__(*exc)
        self._utils.set_progress_bar_global_hook(self._previous)

    def _hook(self, value, total, preview, *args, **kwargs):
        self.marks.append((int(value), *self.counter.snapshot()))
        if self._previous is not None:
            self._previous(value, total, preview, *args, **kwargs)

    def per_step(self) -> dict[int, tuple[int, int]]:
        """{step index (0-based) -> (ops, syncs)} for steps 1.. (step 0 holds the set-up)."""
        out = {}
        for (v0, o0, s0), (v1, o1, s1) in zip(self.marks, self.marks[1:]):
            if v1 == v0 + 1:
                out[v1 - 1] = (o1 - o0, s1 - s0)
        return out


def summary(values: list[float]) -> timing.Stats:
    return timing.Stats.of(values)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64, help="image side in px")
    p.add_argument("--steps", type=int, default=6, help="sampling steps (at least 2 in and 2 after the window)")
    p.add_argument("--train-steps", type=int, default=3, help="SINE Finetune steps (at least 3)")
    p.add_argument("--bare-steps", type=int, default=3, help="bare UNet forward+backward calls")
    p.add_argument("--channels", type=int, default=32, help="UNet model_channels of the proxy; 0 = the fixture's")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", default="attention", choices=["attention", "attention+ff", "all"])
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--work", default="/tmp/sine_bench_op_count")
    p.add_argument("--detail", type=int, default=0, help="also print the N most frequent ops of each row")
    args = p.parse_args()
    import torch
    import comfy_workloads as w
    from op_counter import OpCounter
    s, fx = w.start(Path(args.work))
    from comfyui_fixtures import proxy_sd15_model
    import comfy.samplers
    s.pack_module("nodes.training_run").PREVIEW_EVERY_S = None  # previews are bench_preview.py's subject
    ckpt_model, clip, vae = w.load_checkpoint(fx)
    model = ckpt_model if args.channels == 0 else proxy_sd15_model(args.channels, w.FIXTURE_SEED)
    image = w.source_image(fx)
    pos, neg, src = w.encode_text(clip, w.EDIT), w.encode_text(clip, ""), w.encode_text(clip, w.PROMPT)
    ft = w.sine_finetune(model, clip, vae, image, steps=2, resolution=args.size, seed=0, rank=args.rank,
                         layers=args.layers, lr=1e-3)
    src_cond, adapter = ft[2], ft[3]

    def sampling(kind):
        with StepCounts() as sc:
            w.sample(kind, model, positive=pos, negative=neg, size=args.size, steps=args.steps, seed=7,
                     sampler=args.sampler, scheduler=args.scheduler, adapter=adapter, source_conditioning=src_cond)
        return sc

    sampling("ksampler"), sampling("sine")  # warm-up: lazy set-up (per-device adapter copies, caches)
    ks, sine = sampling("ksampler"), sampling("sine")
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, args.scheduler, args.steps)
    start_sigma, end_sigma = (float(ms.percent_to_sigma(x)) for x in WINDOW)
    in_window = {i: end_sigma < float(sigmas[i]) <= start_sigma for i in range(args.steps)}

    rows: dict[str, list[tuple[int, int]]] = {"ksampler": list(ks.per_step().values())}
    sine_steps = sine.per_step()
    rows["window"] = [c for i, c in sine_steps.items() if in_window[i]]
    rows["outside"] = [c for i, c in sine_steps.items() if not in_window[i]]
    if not rows["window"] or not rows["outside"]:
        sys.exit(f"--steps {args.steps} leaves no measured step in or after the window; use more steps")

    bare = w.BareUNet(s, model, src, args.size)
    bare.step()  # warm-up
    bare_counts = []
    for _ in range(args.bare_steps):
        with OpCounter() as c:
            bare.step()
        bare_counts.append(c.snapshot())
    rows["bare"] = bare_counts
    bare.close()

    w.clear_sine_cache()
    with StepCounts() as fc:
        w.sine_finetune(model, clip, vae, image, steps=args.train_steps, resolution=args.size, seed=1,
                        rank=args.rank, layers=args.layers)
    rows["finetune"] = list(fc.per_step().values())
    if not rows["finetune"]:
        sys.exit("SINE Finetune reported fewer than 2 steps; use --train-steps 3 or more")

    ops = {k: summary([o for o, _ in v]) for k, v in rows.items()}
    syncs = {k: summary([n for _, n in v]) for k, v in rows.items()}
    ratio = {"window": ops["window"].median / ops["ksampler"].median,
             "outside": ops["outside"].median / ops["ksampler"].median,
             "finetune": ops["finetune"].median / ops["bare"].median}
    width = "fixture (320)" if args.channels == 0 else f"proxy {args.channels}"
    print(f"\nOp-count benchmark: SD1.5 architecture, model_channels {width}, {args.size}x{args.size}, batch 1, "
          f"{args.steps} steps {args.sampler}/{args.scheduler}, paper window {WINDOW}, LoRA rank {args.rank} on "
          f"'{args.layers}', torch {torch.__version__}")
    labels = [("KSampler step", "ksampler", None), ("SINE step in the window", "window", "ksampler"),
              ("SINE step outside the window", "outside", "ksampler"), ("bare UNet fwd+bwd", "bare", None),
              ("SINE Finetune step", "finetune", "bare")]
    header = ["per step", "n"] + timing.stats_header("ops") + ["syncs median (max)", "ratio", "target"]
    table = []
    for label, key, base in labels:
        cells = [label, str(ops[key].n), f"{ops[key].min:.0f}", f"{ops[key].median:.0f}", f"{ops[key].spread:.0f}",
                 f"{syncs[key].median:.0f} ({syncs[key].max:.0f})"]
        if base is None:
            cells += ["", ""]
        else:
            cells += [f"{ratio[key]:.3f}x vs {base}", f"<= {TARGETS[key]:.2f}x "
                                                      f"{'met' if ratio[key] <= TARGETS[key] else 'NOT met'}"]
        table.append(cells)
    print(timing.table(header, table))
    added = syncs["window"].median - syncs["ksampler"].median
    print(f"host syncs added by SINE per sampling step: {added:+.0f} in the window, "
          f"{syncs['outside'].median - syncs['ksampler'].median:+.0f} outside (target 0)")
    for key, sc in (("ksampler", ks), ("sine", sine), ("finetune", fc)):
        if sc.counter.sync_ops:
            print(f"sync ops over the whole {key} run: {dict(sc.counter.sync_ops)}")
    if args.detail:
        for key, sc in (("ksampler", ks), ("sine", sine), ("finetune", fc)):
            print(f"\nmost frequent ops, whole {key} run:")
            for name, n in sc.counter.by_op.most_common(args.detail):
                print(f"  {n:7d}  {name}")


if __name__ == "__main__":
    main()
