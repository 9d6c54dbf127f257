"""Benchmark (not a test): seconds per training step and peak memory, all measured in one run, same model/size.

    .venv-tests/bin/python tests/benchmarks/bench_finetune.py [--size 256] [--rank 8] [--layers all]

Rows:
- bare: the UNet's forward + backward (to its input) through ComfyUI's apply_model, no adapters;
- SINE Finetune: our training step (LoRA, activation-space, AdamW), per step;
- native Train LoRA: ComfyUI's own TrainLoraNode at the same rank, precision and layers ("all": it adapts every
  weight), gradient checkpointing off for both;
- crop bank: one VAE encode of a training crop (what a per-step encode would add) vs the bank set-up.
Per-step times come from two runs with different step counts ((T_long - T_short) / (steps difference)), so
model loading and set-up are excluded. Each variant runs in its own process to read its own peak memory
(max RSS on CPU; max allocated on CUDA).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def peak_memory_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def session(work: Path):
    from comfyui_harness import ComfySession, find_comfyui
    from comfyui_fixtures import ensure_fixtures
    import importlib
    s = ComfySession(find_comfyui(), work)
    fx = ensure_fixtures(s.work / "models", s.work / "input", 1234, importlib.import_module("comfyui_version").__version__)
    return s, fx


def timed(s, graph) -> float:
    t = time.perf_counter()
    s.run(graph)
    return time.perf_counter() - t


def variant(name: str, args) -> dict:
    import torch
    from workflows_api import finetune_graph
    s, fx = session(Path(args.work) / name)
    shutil.rmtree(Path(s.folder_paths.models_dir) / "sine_cache", ignore_errors=True)  # time training, not the cache
    short, long = args.steps_short, args.steps_long
    if name == "bare":
        import comfy.model_management as mm
        s.run({"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fx["checkpoint"]}},
               "show": {"class_type": "PreviewAny", "inputs": {"source": ["ckpt", 0]}}})
        model, clip = s.node_output("ckpt", 0), s.node_output("ckpt", 1)
        with torch.inference_mode():
            cond = clip.encode_from_tokens_scheduled(clip.tokenize("photo of a sks dog"))[0][0]
        latent = args.size // 8
        with torch.inference_mode(False):
            cond = cond.clone()
            train_model = model.clone()
            glue = s.pack_module("nodes.glue")
            glue.attach_trainable_views(train_model, "diffusion_model.")
            mm.load_models_gpu([train_model], force_full_load=True)
            device = mm.get_torch_device()

            def steps(n):
                t = time.perf_counter()
                for _ in range(n):
                    x = torch.randn(1, 4, latent, latent, device=device, requires_grad=True)
                    out = train_model.model.apply_model(x, torch.tensor([5.0], device=device), c_crossattn=cond)
                    out.pow(2).mean().backward()
                return time.perf_counter() - t
            steps(1)
            t_short, t_long = steps(short), steps(long)
    elif name == "sine":
        def graph(n):
            return finetune_graph(fx["checkpoint"], fx["source_image"], steps=n, lr=1e-4, rank=args.rank,
                                  layers=args.layers, resolution=args.size, seed=n)
        t_short, t_long = timed(s, graph(short)), timed(s, graph(long))
    elif name == "native":
        def graph(n):
            return {
                "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fx["checkpoint"]}},
                "image": {"class_type": "LoadImage", "inputs": {"image": fx["source_image"]}},
                "scale": {"class_type": "ImageScale", "inputs": {"image": ["image", 0], "upscale_method": "bicubic",
                                                                 "width": args.size, "height": args.size,
                                                                 "crop": "disabled"}},
                "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["scale", 0], "vae": ["ckpt", 2]}},
                "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "photo of a sks dog", "clip": ["ckpt", 1]}},
                "train": {"class_type": "TrainLoraNode", "inputs": {
                    "model": ["ckpt", 0], "latents": ["enc", 0], "positive": ["pos", 0], "batch_size": 1,
                    "grad_accumulation_steps": 1, "steps": n, "learning_rate": 1e-4, "rank": args.rank,
                    "optimizer": "AdamW", "loss_function": "MSE", "seed": n, "training_dtype": "fp32",
                    "lora_dtype": "fp32", "algorithm": "LoRA", "gradient_checkpointing": False,
                    "existing_lora": "[None]"}},
                "show": {"class_type": "PreviewAny", "inputs": {"source": ["train", 3]}},
            }
        t_short, t_long = timed(s, graph(short)), timed(s, graph(long))
    elif name == "crop_bank":  # what a per-step VAE encode of the crop would add to every training step
        s.run({"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": fx["checkpoint"]}},
               "show": {"class_type": "PreviewAny", "inputs": {"source": ["ckpt", 2]}}})
        vae = s.node_output("ckpt", 2)
        crop = torch.rand(1, args.size, args.size, 3)

        def steps(n):
            t = time.perf_counter()
            with torch.inference_mode():
                for _ in range(n):
                    vae.encode(crop)
            return time.perf_counter() - t
        steps(1)
        t_short, t_long = steps(short), steps(long)
    return {"name": name, "per_step_s": (t_long - t_short) / (long - short), "peak_mb": peak_memory_mb()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--layers", default="all", choices=["attention", "attention+ff", "all"])
    p.add_argument("--steps-short", type=int, default=2)
    p.add_argument("--steps-long", type=int, default=6)
    p.add_argument("--work", default="/tmp/sine_bench_finetune")
    p.add_argument("--variant", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(variant(args.variant, args)))
        return
    rows = {}
    for name in ("bare", "sine", "native", "crop_bank"):
        cmd = [sys.executable, __file__, "--variant", name] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            sys.exit(f"{name} failed:\n{out.stderr[-4000:]}")
        rows[name] = json.loads(line[0][7:])
    bare, sine, native, bank = (rows[k] for k in ("bare", "sine", "native", "crop_bank"))
    print(f"\nSINE Finetune benchmark: SD1.5 architecture, {args.size}x{args.size}, batch 1, LoRA rank {args.rank}, "
          f"layers '{args.layers}', fp32, device {'cuda' if __import__('torch').cuda.is_available() else 'cpu'}")
    print(f"{'variant':<28}{'s/step':>10}{'peak MB':>10}{'vs bare':>10}{'vs native':>11}")
    for label, r in (("bare UNet fwd+bwd", bare), ("SINE Finetune", sine), ("native Train LoRA", native)):
        print(f"{label:<28}{r['per_step_s']:>10.3f}{r['peak_mb']:>10.0f}{r['per_step_s'] / bare['per_step_s']:>10.2f}"
              f"{r['per_step_s'] / native['per_step_s']:>11.2f}")
    print(f"crop bank: one VAE encode of a {args.size}px crop takes {bank['per_step_s']:.3f} s = "
          f"{bank['per_step_s'] / sine['per_step_s']:.0%} of a SINE training step; a 32-crop bank pays it 32 times "
          f"once ({bank['per_step_s'] * 32:.0f} s) instead of at every step ({bank['per_step_s'] * 400:.0f} s over "
          f"400 steps, {bank['per_step_s'] * 10000:.0f} s over the paper's 10,000).")


if __name__ == "__main__":
    main()
