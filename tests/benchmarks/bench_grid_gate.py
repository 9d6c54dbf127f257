"""Measurement (not a test): patch-based fine-tuning with and without the learnable grid gate, equal steps.

    COMFYUI_PATH=/path/to/ComfyUI .venv-tests/bin/python tests/benchmarks/bench_grid_gate.py [--steps 60] [--repeats 3]

Both variants train from the same seed per round (same crops, noise and timesteps); only the SINE Patch
Resolution Config's grid_gate differs (off = the paper's unscaled grid; on = a learnable scale starting at 0, so
training starts from the base model's exact output). Rounds are interleaved (paper, gate, paper, gate, ...), each
with its own seed (7, 8, 9, ...); min / median / spread are over the rounds. Reports the mean training loss over
the first and last 10 steps and the ratio of medians (gate / paper) of the last-10 loss (random-weight SD1.5
fixture, so the numbers show the optimisation behaviour, not image quality).

The nodes are called by node id. The per-step losses come from SINE Finetune's `loss` output ({"loss": [...]},
ComfyUI's LOSS_MAP); a pack version without that output stores them in the adapter file of its disk cache
(metadata "sine_losses"), read then instead. The final gate value is read from the adapter file that SINE Save
Adapter writes (tensor "sine.grid_gate").
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import timing  # noqa: E402


def losses_of(w, outputs, models_dir: Path, before: set) -> list:
    """Per-step training losses of the SINE Finetune run that returned `outputs`."""
    loss_map = w.named_output("SINE_Finetune", outputs, "loss")
    if loss_map is not None:
        return list(loss_map["loss"])
    import safetensors  # older pack: only its disk cache entry holds them
    for f in sorted(set(models_dir.rglob("*.safetensors")) - before, key=lambda f: -f.stat().st_mtime):
        with safetensors.safe_open(str(f), "pt") as sf:
            if "sine_losses" in (sf.metadata() or {}):
                return json.loads(sf.metadata()["sine_losses"])
    sys.exit("SINE Finetune has no 'loss' output and wrote no adapter file with 'sine_losses' metadata under "
             f"{models_dir}: update this measurement to where the pack gives the per-step losses")


def saved_gate(w, adapter, name: str) -> float:
    """The grid gate of `adapter`, from the file SINE Save Adapter writes (removed afterwards)."""
    import safetensors
    out = w.call_node("SINE_SaveAdapter", sine_adapter=adapter, filename=f"bench_grid_gate/{name}")
    path = Path(w.named_output("SINE_SaveAdapter", out, "path", out[-1]))
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return float(f.get_tensor("sine.grid_gate"))
    finally:
        path.unlink(missing_ok=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (at least 3), one seed each")
    p.add_argument("--work", default="/tmp/sine_bench_gate")
    args = p.parse_args()
    timing.check_repeats(args.repeats)
    import comfy_workloads as w
    s, fx = w.start(Path(args.work))
    import folder_paths  # ComfyUI's: importable once ComfyUI is started
    models_dir = Path(folder_paths.models_dir)
    model, clip, vae = w.load_checkpoint(fx)
    image = w.source_image(fx)
    k = min(10, args.steps)

    def variant(gate: bool):
        def run(rnd):
            patch = w.call_node("SINE_PatchResolutionConfig", working_size=256, train_resolution=128,
                                min_crop_frac=0.1, max_crop_frac=1.0, whole_image_prob=0.1, grid_size=32,
                                interpolation="bilinear", grid_gate=gate, crop_bank=8)[0]
            w.clear_sine_cache()  # a fresh training run, and only this run's file to find
            before = set(models_dir.rglob("*.safetensors"))
            ft = w.sine_finetune(model, clip, vae, image, steps=args.steps, resolution=128, seed=7 + rnd, lr=1e-3,
                                 rank=8, layers="attention+ff", patch_config=patch)
            losses = losses_of(w, ft, models_dir, before)
            if len(losses) != args.steps:
                sys.exit(f"got {len(losses)} losses for {args.steps} steps")
            out = {"first": sum(losses[:k]) / k, "last": sum(losses[-k:]) / k}
            if gate:
                out["gate"] = saved_gate(w, ft[3], f"gate_seed{7 + rnd}")
            return out
        return run

    stats = timing.interleaved({"paper": variant(False), "gate": variant(True)}, repeats=args.repeats,
                               log=lambda m: print(m, flush=True))
    print(f"\nGrid gate, patch-based LoRA fine-tune, {args.steps} steps, 128 px crops of a 256 px canvas, seeds "
          f"{', '.join(str(7 + r) for r in range(args.repeats))} ({args.repeats} interleaved rounds)")
    header = ["grid"] + timing.stats_header(f"loss first {k}") + timing.stats_header(f"loss last {k}") \
        + ["final gate median"]
    rows = []
    for key, label in (("paper", "paper (unscaled)"), ("gate", "learnable gate (init 0)")):
        st = stats[key]
        rows.append([label] + timing.stats_cells(st["first"], 4) + timing.stats_cells(st["last"], 4)
                    + [f"{st['gate'].median:.4f}" if "gate" in st else ""])
    print(timing.table(header, rows))
    print(f"ratio of medians, loss last {k}: gate / paper = "
          f"{timing.ratio_of_medians(stats['gate']['last'], stats['paper']['last']):.3f}")


if __name__ == "__main__":
    main()
