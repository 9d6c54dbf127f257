"""The import-only stand-ins (tools/import_standins): what ComfyUI imports works, any real use fails loudly.

They let the ComfyUI tier import ComfyUI where torchvision / torchaudio / spandrel / kornia are missing; a stand-in
that quietly returned values would hide a real dependency of the code under test, so every call must raise.
"""
import subprocess
import sys
from pathlib import Path

STANDINS = Path(__file__).resolve().parent.parent / "tools" / "import_standins"


def run_with_standin(package: str, code: str) -> subprocess.CompletedProcess:
    # -I: isolated (no site-packages' real package, no user PYTHONPATH); the stand-in's folder is the only entry.
    return subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(STANDINS / package)!r})\n"
                           + code], capture_output=True, text=True)


def test_module_level_import_forms_of_comfyui_work():
    out = run_with_standin("torchaudio", (
        "import torchaudio\n"
        "import torchaudio.functional as AF\n"
        "from torchaudio.transforms import Resample\n"
        "class Sub(Resample): pass\n"                      # subclassing at import time, as model code does
        "assert torchaudio.__version__.endswith('import-standin')\n"
        "print(AF.__name__, Resample.__qualname__)\n"))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torchaudio.functional", "Resample"]
    out = run_with_standin("torchvision", "from torchvision.ops import roi_align\n"
                                          "from torchvision import transforms\nprint(transforms.Compose.__name__)\n")
    assert out.returncode == 0 and out.stdout.strip() == "Compose", out.stderr


def test_any_real_use_raises_naming_the_stand_in():
    for code in ("import torchaudio.functional as AF\nAF.resample(1, 2, 3)\n",
                 "from torchaudio.transforms import Resample\nclass Sub(Resample): pass\nSub()\n",
                 "import torchaudio\ntorchaudio.load('x.wav')\n"):
        out = run_with_standin("torchaudio", code)
        assert out.returncode != 0 and "import-only stand-in" in out.stderr, (code, out.stderr)


def test_pyav_forms_comfyui_imports_at_module_level():
    """comfy_api/latest/_ui.py and _input_impl/video_types.py @ a125cd84: `import av` and `from av.container
    import InputContainer` / `from av.subtitles.stream import SubtitleStream`; a real use raises."""
    out = run_with_standin("av", "import av\nfrom av.container import InputContainer\n"
                                 "from av.subtitles.stream import SubtitleStream\nprint(InputContainer.__name__)\n")
    assert out.returncode == 0 and out.stdout.strip() == "InputContainer", out.stderr
    out = run_with_standin("av", "import av\nav.open('clip.mp4')\n")
    assert out.returncode != 0 and "import-only stand-in" in out.stderr, out.stderr
