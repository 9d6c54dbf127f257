"""Import-only stand-in for spandrel: tools/import_standins/standin.py says why, and when it is on the path."""
import importlib.util as _util
import pathlib as _pathlib
import sys as _sys

if "sine_import_standin" not in _sys.modules:
    _spec = _util.spec_from_file_location("sine_import_standin", _pathlib.Path(__file__).parents[2] / "standin.py")
    _sys.modules["sine_import_standin"] = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_sys.modules["sine_import_standin"])
_sys.modules["sine_import_standin"].make_standin(__name__)
