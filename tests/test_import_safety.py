"""The pack imports without ComfyUI (pytest, packaging tools), and sine_ops needs nothing but torch."""
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_pack_root_imports_without_comfyui_and_registers_nothing():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sine_pack', {str(ROOT / '__init__.py')!r},"
        f" submodule_search_locations=[{str(ROOT)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['sine_pack'] = m; spec.loader.exec_module(m)\n"
        "assert not hasattr(m, 'comfy_entrypoint'), 'registered nodes without ComfyUI'\n"
        "assert 'comfy' not in sys.modules and 'comfy_api' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr


def test_sine_ops_imports_with_torch_alone():
    code = (
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import pkgutil, importlib, sine_ops\n"
        "for m in pkgutil.iter_modules(sine_ops.__path__): importlib.import_module('sine_ops.' + m.name)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'folder_paths', 'nodes', "
        "'torchvision', 'PIL')]\n"
        "assert not bad, bad\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
