"""Import-only stand-ins for packages ComfyUI imports at module level but this pack never uses (standin.py says
which and why), and the sys.path entries that put them in reach: start-up support for running ComfyUI on a
development machine that lacks them (the tests' harness, tools/build_workflows.py). Never shipped code's concern.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
STANDIN_PACKAGES = ("torchvision", "torchaudio", "spandrel", "kornia", "av")


def import_standin_paths(python: str = sys.executable) -> list[str]:
    """The sys.path entries of tools/import_standins for the packages that `python` cannot import.

    Asked of a fresh interpreter: this process may already have stand-ins on its path. One entry per package, so
    a real torchvision beside a missing torchaudio is never shadowed, also through PYTHONPATH (which comes before
    site-packages).
    """
    found = subprocess.run([python, "-c", "import importlib.util as u; print(*[m for m in %r if u.find_spec(m)])"
                            % (STANDIN_PACKAGES,)], capture_output=True, text=True, check=True).stdout.split()
    return [str(HERE / m) for m in STANDIN_PACKAGES if m not in found]
