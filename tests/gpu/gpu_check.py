"""GPU check (not a test; never run in CI): peak VRAM and seconds per step of SINE on CUDA, normal vs --lowvram.

    COMFYUI_PATH=/path/to/ComfyUI python tests/gpu/gpu_check.py [--repeats 3] [--modes normal,lowvram]
    COMFYUI_PATH=/path/to/ComfyUI python tests/gpu/gpu_check.py --smoke      # tiny, CPU: exercises the code only
    COMFYUI_PATH=/path/to/ComfyUI python tests/gpu/gpu_check.py --family sdxl --modes normal   # SDXL, 1024x1024

Phases, all on the random-weight SD1.5-architecture fixture checkpoint (tests/comfyui_fixtures.py), 512x512, in
the order users meet the nodes (a plain render first, then the fine-tune, then SINE sampling):
  ksampler      ComfyUI's KSampler, same model / size / steps / sampler / scheduler / seed as sine_sampling
  finetune      SINE_Finetune, LoRA (rank 16, attention layers), precision bf16 (autocast), --train-steps steps
  sine_sampling SINE_GuidedSampler, paper window (fine-tuned weight 0.3, 0.0-0.6), --sample-steps steps
  sine_sweep8   SINE_Guider -> SINE_Sweep of 8 settings (weights 0.2-0.5 x window ends 0.5, 0.7): the 8 rows in one
                batched run, --sample-steps steps; s/step of the whole sweep (all chunks, if it needed several)
  bare_unet     the UNet's forward + backward (to its input) via ComfyUI's apply_model, bf16 autocast, no adapters
  vae_encode    one VAE encode of a 512 px crop (what a fresh crop per training step would add to each step)
  user_flow     KSampler -> VAEDecode -> SINE Finetune -> SINE Guided Sampler -> VAEDecode, run twice in the
                process (the second on a new seed, so it trains again): seconds per flow
  finetune_compiled  with --compile only: the finetune phase with SINE_Finetune's compile input on (torch.compile;
                the first step compiles and is not in s/step, its cost is in the wall time)
Before the phases each child renders once with KSampler and VAEDecode, as a user does before fine-tuning, and
fine-tunes a small adapter for the sampling phases.
Per phase: peak VRAM (torch.cuda.max_memory_allocated, reset at the phase start, after ComfyUI has unloaded
every model, so it includes loading the phase's own weights), seconds per step (finetune / sampling: between the
first and last step reported to ComfyUI's progress bar; bare_unet / vae_encode: a timed loop after one untimed
call), and the phase's wall time (loading and set-up included).

ComfyUI's --lowvram is a process-level argument, so every measurement runs in a child process of one mode, and
the children are interleaved: normal, lowvram, normal, lowvram, ... (--repeats rounds). Inside a child the
phases run once as warm-up and once measured. min / median / spread (max - min) are over the rounds.

--family sdxl (default sd15; issue 19's SDXL goal): the same phases on the opt-in random-weight SDXL fixture
checkpoint (tests/comfyui_fixtures.py ensure_sdxl_checkpoint, seed 4321 as tests/comfyui/test_sdxl.py: 7 GB fp16,
~15 GB RAM to build, built by the first child on first use), at 1024x1024 (--size still overrides; --smoke stays
64 px), with SINE_Finetune's gradient_checkpointing input on in every fine-tune (finetune, user_flow and the
set-up adapter). bare_unet stays comparable: it checkpoints the same way, with the pack's own
attach_gradient_checkpointing (every UNet input and output block recomputed in the backward pass, the middle block
not), and passes SDXL's size/pooled conditioning `y`, made once by the function SINE Finetune makes it with
(nodes.model_patching.model_kwargs: width = height = --size). The report adds the finetune phase's peak VRAM
(max over rounds, per mode) against issue 19's SDXL target, <= 12288 MiB (12 GB), as met / not met. Not run on a
GPU yet.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))

import timing  # noqa: E402  (tests/benchmarks/timing.py: the one timing helper)

MODE_FLAGS = {"normal": None, "lowvram": "lowvram", "novram": "novram"}
FAMILIES = ("sd15", "sdxl")  # as comfy_workloads.FAMILIES (not imported here: the parent imports no ComfyUI)
DEFAULT_SIZE = {"sd15": 512, "sdxl": 1024}
FIXTURE_NAME = {"sd15": "SD1.5-architecture random-weight fixture", "sdxl": "SDXL-architecture random-weight fixture"}
SDXL_FINETUNE_TARGET_MIB = 12288  # issue 19: peak VRAM of an SDXL LoRA fine-tune <= 12 GB
PHASES = ("ksampler", "finetune", "sine_sampling", "sine_sweep8", "bare_unet", "vae_encode", "user_flow")
COMPILE_PHASE = "finetune_compiled"  # --compile
UNITS = {"finetune": "step", COMPILE_PHASE: "step", "sine_sampling": "step", "sine_sweep8": "step", "ksampler": "step",
         "bare_unet": "step", "vae_encode": "encode", "user_flow": "flow"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="tiny run on the CPU (64 px, 3 steps; CUDA hidden) that only exercises the code paths")
    p.add_argument("--family", default="sd15", choices=FAMILIES,
                   help="fixture checkpoint: sd15 (default) or sdxl (7 GB random-weight SDXL fixture, ~15 GB RAM "
                        "to build; 1024 px and gradient checkpointing in the fine-tunes and bare_unet)")
    p.add_argument("--size", type=int, help="image side in px (default 512, --family sdxl 1024; --smoke 64)")
    p.add_argument("--train-steps", type=int, help="SINE Finetune steps per run (default 20; --smoke 3)")
    p.add_argument("--sample-steps", type=int, help="sampling steps (default 20; --smoke 3)")
    p.add_argument("--loop", type=int, help="timed bare_unet steps / VAE encodes per round (default 10; --smoke 2)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds per mode (at least 3)")
    p.add_argument("--modes", default="normal,lowvram",
                   help=f"comma-separated, from {', '.join(MODE_FLAGS)} (each: its own child processes)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--layers", default="attention", choices=["attention", "attention+ff", "all"])
    p.add_argument("--sampler", default="euler")
    p.add_argument("--scheduler", default="normal")
    p.add_argument("--work", default="/tmp/sine_gpu_check")
    p.add_argument("--compile", action="store_true",
                   help=f"add the {COMPILE_PHASE} phase: SINE_Finetune with compile on (issue 19's moonshot: 400 "
                        "steps at 512 px in <= 15 s)")
    p.add_argument("--child-timeout", type=int, default=900, help="seconds before a child process is stopped")
    p.add_argument("--child", help=argparse.SUPPRESS)  # MODE:ROUND, internal
    a = p.parse_args(argv)
    for name, full, smoke in (("size", DEFAULT_SIZE[a.family], 64), ("train_steps", 20, 3), ("sample_steps", 20, 3),
                              ("loop", 10, 2)):
        if getattr(a, name) is None:
            setattr(a, name, smoke if a.smoke else full)
    if a.train_steps < 3 or a.sample_steps < 3 or a.loop < 1:
        p.error("--train-steps and --sample-steps must be at least 3 (per-step time skips the first step), "
                "--loop at least 1")
    if a.size % 64:
        p.error("--size must be a multiple of 64")
    a.gradient_checkpointing = a.family == "sdxl"  # SINE_Finetune's input of that name, and bare_unet's
    a.phases = PHASES + ((COMPILE_PHASE,) if a.compile else ())
    a.mode_list = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.mode_list if m not in MODE_FLAGS]
    if bad or not a.mode_list:
        p.error(f"--modes: unknown {bad}; choose from {', '.join(MODE_FLAGS)}")
    return a


# ---- child: one process, one ComfyUI VRAM mode, warm-up round + one measured round of every phase ---------------
def child(a) -> dict:
    import torch
    mode, rnd = a.child.split(":")
    rnd = int(rnd)
    import comfy_workloads as w
    s, fx = w.start(Path(a.work) / mode, MODE_FLAGS[mode], family=a.family)
    import comfy.model_management as mm
    cuda = torch.cuda.is_available()
    if not a.smoke and (not cuda or w.device().type != "cuda"):
        sys.exit("the child process sees no CUDA device")
    autocast = torch.bfloat16 if cuda else None
    precision = "bf16" if cuda else "auto"  # the pack always trains in fp32 on the CPU
    peak = timing.PeakMemory(cuda)

    model, clip, vae = w.load_checkpoint(fx)
    image = w.source_image(fx)
    pos, neg = w.encode_text(clip, w.EDIT), w.encode_text(clip, "")
    # what a user has done before fine-tuning: a plain render, decoded
    w.vae_decode(vae, w.sample("ksampler", model, positive=pos, negative=neg, size=64, steps=2, seed=rnd,
                               sampler=a.sampler, scheduler=a.scheduler))
    # the adapter the sampling phases guide with (its values do not change the cost; 64 px keeps set-up short)
    ft = w.sine_finetune(model, clip, vae, image, steps=2, resolution=64, seed=rnd, rank=a.rank, layers=a.layers,
                         precision=precision, gradient_checkpointing=a.gradient_checkpointing)
    src_cond, adapter = ft[2], ft[3]
    seed = 1000 * (rnd + 1)

    def phase(fn):
        """Run fn(stepper) from a clean GPU; fn returns seconds per unit (or None: take it from the progress bar)."""
        w.clear_sine_cache()
        w.free_models()
        peak.reset()
        t0 = timing.clock()
        with timing.StepTimer() as st:
            per_unit = fn(st)
        wall = timing.clock() - t0
        return {"s_per_unit": per_unit, "wall_s": wall, "peak_mib": peak.read()}

    def finetune_run(compile: bool):
        def run(r):
            def fn(st):
                w.sine_finetune(model, clip, vae, image, steps=a.train_steps, resolution=a.size, seed=seed + r,
                                rank=a.rank, layers=a.layers, precision=precision,
                                gradient_checkpointing=a.gradient_checkpointing, compile=compile)
                return st.per_step(a.train_steps)
            return phase(fn)
        return run

    def sampling(kind):
        def run(r):
            def fn(st):
                w.sample(kind, model, positive=pos, negative=neg, size=a.size, steps=a.sample_steps, seed=seed + r,
                         sampler=a.sampler, scheduler=a.scheduler, adapter=adapter, source_conditioning=src_cond)
                return st.per_step(a.sample_steps)
            return phase(fn)
        return run

    def sweep8(r):
        def fn(st):
            w.sweep(model, settings=8, positive=pos, negative=neg, size=a.size, steps=a.sample_steps, seed=seed + r,
                    sampler=a.sampler, scheduler=a.scheduler, adapter=adapter, source_conditioning=src_cond)
            total = max(t for _, t, _ in st.stamps)  # one bar over all chunks: sample_steps x chunks
            return st.per_step(total) * (total // a.sample_steps)
        return phase(fn)

    def bare(r):
        def fn(st):
            b = w.BareUNet(s, model, pos, a.size, autocast, gradient_checkpointing=a.gradient_checkpointing)
            b.step()  # untimed: first-call overheads
            t = timing.clock()
            for _ in range(a.loop):
                b.step()
            per = (timing.clock() - t) / a.loop
            b.close()
            return per
        return phase(fn)

    def vae_encode(r):
        def fn(st):
            w.vae_encode_crop(vae, a.size, seed=r)  # untimed: loads the VAE
            t = timing.clock()
            for i in range(a.loop):
                w.vae_encode_crop(vae, a.size, seed=r * 100 + i)
            return (timing.clock() - t) / a.loop
        return phase(fn)

    def user_flow(r):
        def fn(st):
            t = timing.clock()
            for i in range(2):
                kw = dict(positive=pos, negative=neg, size=a.size, steps=a.sample_steps, seed=seed + r + i,
                          sampler=a.sampler, scheduler=a.scheduler)
                w.vae_decode(vae, w.sample("ksampler", model, **kw))
                flow_ft = w.sine_finetune(model, clip, vae, image, steps=a.train_steps, resolution=a.size,
                                          seed=seed + r + 100 * (i + 1), rank=a.rank, layers=a.layers,
                                          precision=precision, gradient_checkpointing=a.gradient_checkpointing)
                w.vae_decode(vae, w.sample("sine", model, **kw, adapter=flow_ft[3], source_conditioning=flow_ft[2]))
            return (timing.clock() - t) / 2
        return phase(fn)

    variants = {"ksampler": sampling("ksampler"), "finetune": finetune_run(False), "sine_sampling": sampling("sine"),
                "sine_sweep8": sweep8, "bare_unet": bare, "vae_encode": vae_encode, "user_flow": user_flow,
                COMPILE_PHASE: finetune_run(True)}
    variants = {ph: variants[ph] for ph in a.phases}
    stats = timing.interleaved(variants, repeats=1, warmup=1, log=lambda m: print(f"[{mode}] {m}", flush=True))
    info = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
            "torch": torch.__version__, "comfyui": __import__("comfyui_version").__version__,
            "vram_state": mm.vram_state.name, "unet_dtype": str(model.model.get_dtype()).replace("torch.", "")}
    return {"info": info, "phases": {p: {m: st.values[0] for m, st in metrics.items()} for p, metrics in stats.items()}}


# ---- parent: interleave child processes of each mode, gather, print one table -----------------------------------
def parent_argv(argv: list[str]) -> list[str]:
    """The command line without an internal `--child MODE:ROUND` / `--child=MODE:ROUND` (other options that start
    with "--child", e.g. `--child-timeout 240`, keep their value)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == "--child":
            skip = True
        elif not x.startswith("--child="):
            out.append(x)
    return out


def run_child(a, mode: str, rnd: int) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if a.smoke:
        env["CUDA_VISIBLE_DEVICES"] = ""  # --smoke is a CPU run even on a GPU machine
    cmd = [sys.executable, str(Path(__file__).resolve()), *parent_argv(sys.argv[1:]), "--child", f"{mode}:{rnd}"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=a.child_timeout)
    except subprocess.TimeoutExpired:
        sys.exit(f"{mode} round {rnd + 1}: child process ran past --child-timeout {a.child_timeout} s")
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    for ln in out.stdout.splitlines():
        if ln.startswith(f"[{mode}] "):
            print("  " + ln, flush=True)
    if out.returncode or not lines:
        sys.exit(f"{mode} round {rnd + 1} failed (exit {out.returncode}):\n{out.stderr[-6000:]}\n{out.stdout[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(a, infos: dict, stats: dict) -> None:
    first = next(iter(infos.values()))
    mem = "peak VRAM MiB" if not a.smoke else "max RSS MiB (process so far)"
    gc = ", gradient checkpointing (also bare_unet)" if a.gradient_checkpointing else ""
    print(f"\nSINE GPU check: {FIXTURE_NAME[a.family]}, {a.size}x{a.size}, batch 1; finetune LoRA rank "
          f"{a.rank} '{a.layers}' {'bf16 autocast' if not a.smoke else 'fp32 (CPU)'}{gc}, {a.train_steps} steps; "
          f"sampling {a.sample_steps} steps {a.sampler}/{a.scheduler}, cfg 7.5; SINE window 0.0-0.6 weight 0.3")
    print(f"device {first['device']}, torch {first['torch']}, ComfyUI {first['comfyui']}, UNet weights "
          f"{first['unet_dtype']}; {a.repeats} interleaved rounds per mode "
          f"({', '.join(m + ': vram_state ' + i['vram_state'] for m, i in infos.items())})"
          + ("  [--smoke: CPU, tiny sizes: these numbers say nothing about GPU speed]" if a.smoke else ""))
    header = ["mode / phase", "unit"] + timing.stats_header("s/unit") + ["wall s median", f"{mem} max"]
    rows = []
    for mode in a.mode_list:
        for ph in a.phases:
            m = stats[mode][f"{ph}.s_per_unit"]
            rows.append([f"{mode} / {ph}", UNITS[ph]] + timing.stats_cells(m, 4)
                        + [f"{stats[mode][f'{ph}.wall_s'].median:.2f}", f"{stats[mode][f'{ph}.peak_mib'].max:.0f}"])
    print(timing.table(header, rows))
    print("\nratios of medians (s/unit):")
    for mode in a.mode_list:
        st = {ph: stats[mode][f"{ph}.s_per_unit"] for ph in a.phases}
        print(f"  {mode}: SINE sampling / KSampler = {timing.ratio_of_medians(st['sine_sampling'], st['ksampler']):.2f}x "
              f"(target <= 1.25x); SINE Sweep of 8 settings / one SINE run = "
              f"{timing.ratio_of_medians(st['sine_sweep8'], st['sine_sampling']):.2f}x (target <= 2x); "
              f"SINE Finetune step / bare UNet fwd+bwd = "
              f"{timing.ratio_of_medians(st['finetune'], st['bare_unet']):.2f}x; one VAE encode / Finetune step = "
              f"{timing.ratio_of_medians(st['vae_encode'], st['finetune']):.2f} (the cost a fresh crop per step "
              f"would add to each step)")
        if a.compile:
            compiled = st[COMPILE_PHASE]
            print(f"  {mode}: compiled SINE Finetune step / bare UNet fwd+bwd = "
                  f"{timing.ratio_of_medians(compiled, st['bare_unet']):.2f}x, / uncompiled step = "
                  f"{timing.ratio_of_medians(compiled, st['finetune']):.2f}x; 400 steps at this size = "
                  f"{400 * compiled.median:.1f} s after the compile (target <= 15 s at 512 px; the compile itself "
                  f"is in the phase's wall time: {stats[mode][f'{COMPILE_PHASE}.wall_s'].median:.1f} s median)")
    base = a.mode_list[0]
    for mode in a.mode_list[1:]:
        parts = [f"{ph} {timing.ratio_of_medians(stats[mode][f'{ph}.s_per_unit'], stats[base][f'{ph}.s_per_unit']):.2f}x"
                 for ph in a.phases]
        print(f"  {mode} / {base} s/unit: " + ", ".join(parts))
    if a.family == "sdxl":
        report_sdxl_target(a, stats)


def report_sdxl_target(a, stats: dict) -> None:
    """Issue 19's SDXL goal: the finetune phase's peak VRAM (max over the rounds) <= SDXL_FINETUNE_TARGET_MIB."""
    where = "" if a.size == DEFAULT_SIZE["sdxl"] else \
        f" [the target is for {DEFAULT_SIZE['sdxl']}x{DEFAULT_SIZE['sdxl']}; this run is {a.size}x{a.size}]"
    print(f"\nSDXL target (issue 19): finetune peak VRAM <= {SDXL_FINETUNE_TARGET_MIB} MiB (12 GB), LoRA rank "
          f"{a.rank} '{a.layers}', gradient checkpointing{where}:")
    for mode in a.mode_list:
        peak = stats[mode]["finetune.peak_mib"]
        if a.smoke:
            verdict = "not applicable (--smoke: max RSS on the CPU, not VRAM)"
        else:
            verdict = "met" if peak.max <= SDXL_FINETUNE_TARGET_MIB else "not met"
        print(f"  {mode}: finetune peak {peak.max:.0f} MiB (max of {a.repeats} rounds; median {peak.median:.0f}) "
              f"vs {SDXL_FINETUNE_TARGET_MIB} MiB: {verdict}")


def main(argv=None):
    a = parse_args(argv)
    if a.child:
        print("RESULT " + json.dumps(child(a)), flush=True)
        return
    import torch
    if not a.smoke and not torch.cuda.is_available():
        print("gpu_check.py measures CUDA peak memory and speed, and this machine has no CUDA device "
              f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run it on a CUDA machine, or "
              "add --smoke for a tiny CPU run that only exercises the code paths.", file=sys.stderr)
        sys.exit(2)
    timing.check_repeats(a.repeats)
    print(f"gpu_check: {'SMOKE (CPU) ' if a.smoke else ''}{'SDXL ' if a.family == 'sdxl' else ''}modes "
          f"{', '.join(a.mode_list)}, {a.repeats} rounds, children interleaved by mode", flush=True)
    infos = {}

    def variant(mode):
        def run(rnd):
            t = time.perf_counter()
            res = run_child(a, mode, rnd)
            infos[mode] = res["info"]
            print(f"{mode} round {rnd + 1}/{a.repeats}: child done in {time.perf_counter() - t:.0f} s", flush=True)
            return {f"{ph}.{m}": v for ph, metrics in res["phases"].items() for m, v in metrics.items()}
        return run

    stats = timing.interleaved({m: variant(m) for m in a.mode_list}, repeats=a.repeats)
    report(a, infos, stats)


if __name__ == "__main__":
    main()
