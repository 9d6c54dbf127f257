"""tests/gpu/gpu_check.py's command line on the way to its child processes (pure: no GPU, no ComfyUI, no torch).

The parent runs each round in a child process with its own options plus an internal `--child MODE:ROUND`
(`parent_argv`, `run_child`). Issue 18: `--child-timeout 240` (value as a separate word) reached the child as a stray
argument and the child exited with a usage error. Both spellings must reach the child intact; only `--child` and
its value are dropped. Issue 19: `--family sdxl` / `--family=sdxl` reaches the child the same way, sets the SDXL
defaults (1024 px unless --size or --smoke, gradient checkpointing) and adds the SDXL VRAM target to the report.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

GPU_DIR = Path(__file__).resolve().parent / "gpu"

# gpu_check puts tests/benchmarks first on sys.path when imported (for its `timing` helper): keep that out of the
# rest of the session.
_saved_path = list(sys.path)
sys.path.insert(0, str(GPU_DIR))
try:
    import gpu_check  # noqa: E402
finally:
    sys.path[:] = _saved_path


@pytest.mark.parametrize("argv", [
    ["--child-timeout", "240"],
    ["--child-timeout=240"],
    ["--repeats", "3", "--child-timeout", "240", "--modes", "normal,lowvram"],
    ["--smoke", "--child-timeout=240", "--size", "64"],
    ["--family", "sdxl", "--child-timeout", "240"],
    ["--family=sdxl", "--child-timeout=240", "--modes", "normal"],
])
def test_child_timeout_survives_in_both_spellings(argv):
    assert gpu_check.parent_argv(argv) == argv
    assert gpu_check.parse_args(gpu_check.parent_argv(argv)).child_timeout == 240


@pytest.mark.parametrize("argv, kept", [
    (["--child", "normal:0"], []),
    (["--child=lowvram:2"], []),
    (["--child-timeout", "240", "--child", "normal:1", "--smoke"], ["--child-timeout", "240", "--smoke"]),
    (["--child=novram:0", "--child-timeout=240"], ["--child-timeout=240"]),
    (["--smoke", "--child", "lowvram:0", "--child-timeout", "240", "--repeats", "4"],
     ["--smoke", "--child-timeout", "240", "--repeats", "4"]),
    (["--family", "sdxl", "--child", "normal:0"], ["--family", "sdxl"]),
    (["--child=lowvram:1", "--family=sdxl", "--child-timeout", "240"], ["--family=sdxl", "--child-timeout", "240"]),
])
def test_internal_child_flag_is_dropped_with_its_value(argv, kept):
    assert gpu_check.parent_argv(argv) == kept
    assert gpu_check.parse_args(kept).child is None


@pytest.mark.parametrize("spelling, family", [
    (["--child-timeout", "240"], []),
    (["--child-timeout=240"], []),
    (["--child-timeout", "240"], ["--family", "sdxl"]),
    (["--child-timeout=240"], ["--family=sdxl"]),
])
def test_run_child_command_line_parses_in_the_child(monkeypatch, spelling, family):
    """The command run_child starts: the parent's options unchanged, then one `--child MODE:ROUND`; it parses."""
    argv = ["--smoke", *spelling, *family, "--modes", "normal,lowvram"]
    monkeypatch.setattr(sys, "argv", ["gpu_check.py", *argv])
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["cmd"], seen["kwargs"] = cmd, kwargs
        return SimpleNamespace(returncode=0, stdout='RESULT {"info": {}, "phases": {}}\n', stderr="")

    monkeypatch.setattr(gpu_check.subprocess, "run", fake_run)
    a = gpu_check.parse_args(argv)
    assert gpu_check.run_child(a, "lowvram", 1) == {"info": {}, "phases": {}}
    cmd = seen["cmd"]
    assert cmd[:2] == [sys.executable, str(GPU_DIR / "gpu_check.py")]
    assert cmd[2:] == [*argv, "--child", "lowvram:1"]
    child = gpu_check.parse_args(cmd[2:])
    assert (child.child, child.child_timeout, child.smoke, child.mode_list) == ("lowvram:1", 240, True,
                                                                                ["normal", "lowvram"])
    expected_family = "sdxl" if family else "sd15"
    assert (child.family, child.gradient_checkpointing, child.size) == (expected_family, bool(family), 64)
    assert seen["kwargs"]["timeout"] == 240
    assert seen["kwargs"]["env"]["CUDA_VISIBLE_DEVICES"] == ""  # --smoke hides CUDA from the child


def test_import_needs_no_comfyui_and_no_torch():
    """Importing gpu_check (as this test does) loads neither ComfyUI, the pack, nor torch: all that happens in main()
    or in the child."""
    code = ("import sys; sys.path.insert(0, %r); import gpu_check; "
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'torch', 'comfy', 'comfy_api', 'folder_paths', 'comfyui_harness', 'comfy_workloads', 'nodes', "
            "'sine_ops'})))" % str(GPU_DIR))
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == ""


@pytest.mark.parametrize("argv, family, size, checkpointing", [
    ([], "sd15", 512, False),
    (["--smoke"], "sd15", 64, False),
    (["--size", "768"], "sd15", 768, False),
    (["--family", "sd15"], "sd15", 512, False),
    (["--family", "sdxl"], "sdxl", 1024, True),
    (["--family=sdxl"], "sdxl", 1024, True),
    (["--family", "sdxl", "--smoke"], "sdxl", 64, True),
    (["--family=sdxl", "--size", "768"], "sdxl", 768, True),
    (["--smoke", "--family", "sdxl", "--size=128"], "sdxl", 128, True),
])
def test_family_defaults(argv, family, size, checkpointing):
    """sd15 stays the default (512 px, no checkpointing); sdxl: 1024 px unless --size / --smoke, checkpointing on."""
    a = gpu_check.parse_args(argv)
    assert (a.family, a.size, a.gradient_checkpointing) == (family, size, checkpointing)
    assert (a.train_steps, a.sample_steps) == ((3, 3) if "--smoke" in argv else (20, 20))


@pytest.mark.parametrize("argv, message", [
    (["--family", "sd3"], "--family: invalid choice"),
    (["--family=SDXL"], "--family: invalid choice"),
    (["--family", "sdxl", "--size", "1000"], "--size must be a multiple of 64"),
])
def test_family_rejects_bad_values(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        gpu_check.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def _fake_run(a, peak_mib: float):
    """infos and stats as main() passes them to report(): every phase 0.1 s/unit, finetune peak `peak_mib`."""
    Stats = gpu_check.timing.Stats
    stats = {}
    for mode in a.mode_list:
        m = {}
        for ph in a.phases:
            m[f"{ph}.s_per_unit"] = Stats.of([0.1] * a.repeats)
            m[f"{ph}.wall_s"] = Stats.of([1.0] * a.repeats)
            m[f"{ph}.peak_mib"] = Stats.of([peak_mib - 10, peak_mib, peak_mib - 5] if ph == "finetune"
                                           else [100.0] * a.repeats)
        stats[mode] = m
    info = {"device": "fake", "torch": "0", "comfyui": "0", "vram_state": "NORMAL_VRAM", "unet_dtype": "float16"}
    return {mode: info for mode in a.mode_list}, stats


def test_sd15_report_has_no_sdxl_lines(capsys):
    a = gpu_check.parse_args([])
    gpu_check.report(a, *_fake_run(a, 20000.0))
    out = capsys.readouterr().out
    assert ("\nSINE GPU check: SD1.5-architecture random-weight fixture, 512x512, batch 1; finetune LoRA rank 16 "
            "'attention' bf16 autocast, 20 steps; sampling 20 steps euler/normal, cfg 7.5; SINE window 0.0-0.6 "
            "weight 0.3\n") in out
    assert "SDXL" not in out and "checkpointing" not in out and "met" not in out


@pytest.mark.parametrize("peak, verdict", [(12288.0, "met"), (9000.0, "met"), (12289.0, "not met")])
def test_sdxl_report_prints_vram_target(capsys, peak, verdict):
    a = gpu_check.parse_args(["--family", "sdxl"])
    gpu_check.report(a, *_fake_run(a, peak))
    out = capsys.readouterr().out
    assert "SINE GPU check: SDXL-architecture random-weight fixture, 1024x1024, batch 1" in out
    assert "gradient checkpointing (also bare_unet)" in out
    assert "SDXL target (issue 19): finetune peak VRAM <= 12288 MiB (12 GB)" in out
    for mode in ("normal", "lowvram"):
        assert f"  {mode}: finetune peak {peak:.0f} MiB (max of 3 rounds; median {peak - 5:.0f}) vs 12288 MiB: " \
               f"{verdict}\n" in out


def test_sdxl_smoke_report_does_not_judge_rss(capsys):
    a = gpu_check.parse_args(["--family=sdxl", "--smoke", "--modes", "normal"])
    gpu_check.report(a, *_fake_run(a, 100.0))
    out = capsys.readouterr().out
    assert "[the target is for 1024x1024; this run is 64x64]" in out
    assert "vs 12288 MiB: not applicable (--smoke: max RSS on the CPU, not VRAM)" in out


def test_compile_phase_only_with_the_flag(capsys):
    """--compile adds the finetune_compiled phase (SINE_Finetune's compile input) and its ratios; without it the
    report has neither."""
    plain = gpu_check.parse_args([])
    assert gpu_check.COMPILE_PHASE not in plain.phases
    gpu_check.report(plain, *_fake_run(plain, 100.0))
    assert "compiled" not in capsys.readouterr().out

    a = gpu_check.parse_args(gpu_check.parent_argv(["--compile", "--modes", "normal"]))
    assert a.phases[-1] == gpu_check.COMPILE_PHASE
    gpu_check.report(a, *_fake_run(a, 100.0))
    out = capsys.readouterr().out
    assert "normal / finetune_compiled" in out
    assert ("  normal: compiled SINE Finetune step / bare UNet fwd+bwd = 1.00x, / uncompiled step = 1.00x; 400 "
            "steps at this size = 40.0 s after the compile (target <= 15 s at 512 px; the compile itself is in the "
            "phase's wall time: 1.0 s median)") in out
