"""Measurement (not a test): patch-based fine-tuning with and without the learnable grid gate, equal steps.

    .venv-tests/bin/python tests/benchmarks/bench_grid_gate.py [--steps 60]

Both runs use the same seed, crops, noise and timesteps; only PatchConfig.grid_gate differs (off = the paper's
unscaled grid; on = a learnable scale starting at 0, so training starts from the base model's exact output).
Reports the mean training loss over the first and last 10 steps of each run (random-weight SD1.5 fixture, so
the numbers show the optimisation behaviour, not image quality).
"""
import argparse
import importlib
import json
import shutil
import sys
from pathlib import Path

import safetensors

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--work", default="/tmp/sine_bench_gate")
    args = p.parse_args()
    from comfyui_fixtures import ensure_fixtures
    from comfyui_harness import ComfySession, find_comfyui
    from workflows_api import finetune_graph
    s = ComfySession(find_comfyui(), Path(args.work))
    fx = ensure_fixtures(s.work / "models", s.work / "input", 1234,
                         importlib.import_module("comfyui_version").__version__)
    cache = Path(s.folder_paths.models_dir) / "sine_cache"
    shutil.rmtree(cache, ignore_errors=True)  # measure fresh training runs
    rows = {}
    for gate in (False, True):
        patch = {"working_size": 256, "train_resolution": 128, "min_crop_frac": 0.1, "max_crop_frac": 1.0,
                 "whole_image_prob": 0.1, "grid_size": 32, "interpolation": "bilinear", "grid_gate": gate,
                 "crop_bank": 8}
        before = set(cache.glob("*.safetensors")) if cache.exists() else set()
        s.run(finetune_graph(fx["checkpoint"], fx["source_image"], steps=args.steps, lr=1e-3, rank=8, seed=7,
                             layers="attention+ff", resolution=128, patch=patch))
        new = (set(cache.glob("*.safetensors")) - before) or set(cache.glob("*.safetensors"))
        entry = max(new, key=lambda f: f.stat().st_mtime)
        with safetensors.safe_open(str(entry), "pt") as f:
            losses = json.loads(f.metadata()["sine_losses"])
            gate_value = float(f.get_tensor("sine.grid_gate")) if gate else None
        rows[gate] = (sum(losses[:10]) / 10, sum(losses[-10:]) / 10, gate_value)
    print(f"\nGrid gate, patch-based LoRA fine-tune, {args.steps} steps, 128 px crops of a 256 px canvas, seed 7")
    print(f"{'grid':<26}{'loss first 10':>15}{'loss last 10':>14}{'final gate':>12}")
    for gate, (first, last, g) in rows.items():
        label = "learnable gate (init 0)" if gate else "paper (unscaled)"
        print(f"{label:<26}{first:>15.4f}{last:>14.4f}{'' if g is None else f'{g:.4f}':>12}")


if __name__ == "__main__":
    main()
