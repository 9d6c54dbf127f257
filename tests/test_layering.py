"""The pack's layers, read from the source (AST; nothing is imported, no ComfyUI needed):

(a) shipped code (`__init__.py`, nodes/, sine_ops/, workflows/) imports nothing from tests/ or tools/: no import
    statement naming their modules, no `importlib.import_module` of them, and no tests/ or tools/ path put on
    sys.path (or loaded by file path);
(b) sine_ops/ imports no ComfyUI module (`comfy`, `comfy_api`, `folder_paths`, ComfyUI's or this pack's `nodes`,
    ...), not even inside a function;
(c) a file of nodes/ that defines ComfyUI nodes (classes deriving from `io.ComfyNode`) is imported by no other file
    of nodes/ but nodes/__init__.py: what nodes share lives in the glue modules, never in another node's file.

`layering_violations(root)` checks a tree; the tests run it on this repository and on scratch copies with one
rule broken, so a checker that stopped seeing a violation fails too.
"""
from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ("__init__.py", "nodes", "sine_ops", "workflows")
DEV_ONLY = ("tests", "tools")
# ComfyUI's top-level modules (its own `nodes` included: for sine_ops a relative `..nodes` is this pack's nodes/,
# which imports ComfyUI, so both resolve to the same forbidden name here).
COMFYUI_MODULES = frozenset({"comfy", "comfy_api", "comfy_execution", "comfy_extras", "comfy_config", "folder_paths",
                             "nodes", "execution", "latent_preview", "node_helpers", "server", "app"})
SYS_PATH_MUTATORS = frozenset({"append", "insert", "extend", "__setitem__", "__iadd__"})
# calls whose string arguments are file paths to load code from
PATH_LOADERS = frozenset({"addsitedir", "spec_from_file_location", "run_path", "SourceFileLoader"})
MODULE_LOADERS = frozenset({"import_module", "__import__"})


def _py_files(root: Path, top: str) -> list[Path]:
    path = root / top
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


def _dev_module_names(root: Path) -> frozenset[str]:
    """Top-level names that import something from tests/ or tools/: the folders themselves (as packages), every
    module of tests/ (pytest puts each test folder on sys.path) and the modules and packages at the top of tools/
    (its import stand-ins' inner packages are named after real ones, e.g. torchvision, so they are not counted)."""
    shipped = {p.stem for top in SHIPPED for p in _py_files(root, top)}
    names = set(DEV_ONLY)
    names |= {p.stem for p in _py_files(root, "tests")}
    tools = root / "tools"
    if tools.is_dir():
        names |= {p.stem if p.suffix == ".py" else p.name for p in tools.iterdir()
                  if (p.suffix == ".py" or p.is_dir()) and p.name != "__pycache__"}
    return frozenset(names - shipped - {"__init__"})


def _module_of(rel: str) -> str:
    """The dotted module name of a file from the pack root ("nodes/guidance.py" -> "nodes.guidance")."""
    return rel[:-len(".py")].replace("/", ".")


def _package_of(rel: str) -> list[str]:
    """The package a shipped file belongs to, as parts from the pack root ([] = the pack root itself)."""
    return rel.split("/")[:-1]


def _imported_modules(tree: ast.AST, package: list[str]):
    """(line, module) for every import statement, anywhere in the file, relative imports resolved from the pack
    root ("nodes.guidance"); `from M import a` yields M and M.a (a may be a submodule). Relative imports above the
    pack root (into custom_nodes/) are left out."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                if up > len(package):
                    continue
                base = package[:len(package) - up] + (node.module.split(".") if node.module else [])
            else:
                base = node.module.split(".")
            module = ".".join(base)
            if module:
                yield node.lineno, module
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, ".".join(base + [alias.name])


def _call_name(call: ast.Call) -> str | None:
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def _is_sys_path(node: ast.AST) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name)
            and node.value.id == "sys")


def _bindings(tree: ast.AST) -> dict[str, list[ast.AST]]:
    """name -> the expressions assigned to it anywhere in the file (for loops: the iterable), to follow a path
    built in a variable (`for folder in ("workflows", "tools"): sys.path.append(str(ROOT / folder))`)."""
    out: dict[str, list[ast.AST]] = {}

    def bind(target, value):
        for t in ast.walk(target):
            if isinstance(t, ast.Name):
                out.setdefault(t.id, []).append(value)

    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                bind(target, node.value)
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and node.value is not None:
            bind(node.target, node.value)
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            bind(node.target, node.iter)
    return out


def _strings(exprs: list[ast.AST], bindings: dict[str, list[ast.AST]]) -> set[str]:
    """Every string constant in `exprs`, following names to what the file assigns them (transitively)."""
    found, seen, todo = set(), set(), list(exprs)
    while todo:
        for node in ast.walk(todo.pop()):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                found.add(node.value)
            elif isinstance(node, ast.Name) and node.id not in seen:
                seen.add(node.id)
                todo.extend(bindings.get(node.id, []))
    return found


def _names_dev_folder(text: str) -> bool:
    return any(part in DEV_ONLY for part in text.replace("\\", "/").split("/"))


def _path_uses(tree: ast.AST):
    """(line, what, argument expressions) of each sys.path change, file-path code loader and import_module call."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = _call_name(node)
            args = list(node.args) + [k.value for k in node.keywords]
            if isinstance(node.func, ast.Attribute) and _is_sys_path(node.func.value) and name in SYS_PATH_MUTATORS:
                yield node.lineno, "path", args
            elif name in PATH_LOADERS:
                yield node.lineno, "path", args
            elif name in MODULE_LOADERS and node.args:
                yield node.lineno, "module", node.args[:1]
        elif isinstance(node, (ast.Assign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                if _is_sys_path(t) or isinstance(t, ast.Subscript) and _is_sys_path(t.value):
                    yield node.lineno, "path", [node.value]


def _defines_nodes(tree: ast.AST) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for base in node.bases:
                if (isinstance(base, ast.Attribute) and base.attr == "ComfyNode"
                        or isinstance(base, ast.Name) and base.id == "ComfyNode"):
                    return True
    return False


def layering_violations(root: Path) -> list[str]:
    """Every break of rules (a)-(c) in the tree at `root`, one line each ("path:line: what")."""
    dev = _dev_module_names(root)
    trees = {_rel(root, p): ast.parse(p.read_text(encoding="utf-8"), filename=str(p))
             for top in SHIPPED for p in _py_files(root, top)}
    node_files = {_module_of(rel) for rel, tree in trees.items()
                  if rel.startswith("nodes/") and rel != "nodes/__init__.py" and _defines_nodes(tree)}
    problems = []
    for rel, tree in trees.items():
        package = _package_of(rel)
        imports = list(_imported_modules(tree, package))
        for line, module in imports:  # (a)
            if module.split(".")[0] in dev:
                problems.append(f"{rel}:{line}: imports {module} (shipped code must not import tests/ or tools/)")
        bindings = _bindings(tree)
        for line, what, args in _path_uses(tree):  # (a), by sys.path or by name/path at run time
            for text in sorted(_strings(args, bindings)):
                if (_names_dev_folder(text) if what == "path" else text.split(".")[0] in dev):
                    problems.append(f"{rel}:{line}: loads code from {text!r} (shipped code must not use tests/ or "
                                    "tools/)")
        if rel.startswith("sine_ops/"):  # (b)
            for line, module in imports:
                if module.split(".")[0] in COMFYUI_MODULES:
                    problems.append(f"{rel}:{line}: imports {module} (sine_ops is plain torch: no ComfyUI module)")
        if rel.startswith("nodes/") and rel != "nodes/__init__.py":  # (c)
            own = _module_of(rel)
            for line, module in imports:
                if module in node_files and module != own:
                    problems.append(f"{rel}:{line}: imports the node file {module} (only nodes/__init__.py "
                                    "imports node files; share code through a glue module)")
    return sorted(set(problems))


def test_the_pack_keeps_its_layers():
    assert layering_violations(REPO_ROOT) == []


def test_node_files_are_found():
    """Rule (c) sees the files that define nodes (else it would pass while checking nothing)."""
    found = {_rel(REPO_ROOT, p) for p in _py_files(REPO_ROOT, "nodes")
             if _defines_nodes(ast.parse(p.read_text(encoding="utf-8")))}
    assert {"nodes/guidance.py", "nodes/finetune.py"} <= found and "nodes/guided_prediction.py" not in found


@pytest.fixture(scope="module")
def scratch_source(tmp_path_factory) -> Path:
    """The repository's Python files (shipped and dev), copied: a tree to break one rule in at a time."""
    root = tmp_path_factory.mktemp("layering_source")
    for top in SHIPPED + DEV_ONLY:
        for p in _py_files(REPO_ROOT, top):
            dest = root / _rel(REPO_ROOT, p)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
    assert layering_violations(root) == []
    return root


BROKEN = [
    # (a) import statements, absolute and relative, top level and inside a function
    ("nodes/errors.py", "from ..tests.reference_forms import merged_weight\n", "imports tests.reference_forms"),
    ("sine_ops/config.py", "def f():\n    import reference_forms\n", "imports reference_forms"),
    ("workflows/headless.py", "from import_standins import import_standin_paths\n", "imports import_standins"),
    ("__init__.py", "import tools.build_workflows\n", "imports tools.build_workflows"),
    ("nodes/previews.py", "import importlib\nx = importlib.import_module('comfyui_harness')\n",
     "loads code from 'comfyui_harness'"),
    # (a) sys.path and file-path loading
    ("workflows/comfy_runtime.py", "sys.path.append(str(PACK_ROOT / 'tools'))\n", "loads code from 'tools'"),
    ("workflows/headless.py", "for _d in ('workflows', 'tests'):\n    sys.path.insert(0, str(PACK_ROOT / _d))\n",
     "loads code from 'tests'"),
    ("nodes/disk_cache.py", "import sys\n_HERE = '../tools/import_standins'\nsys.path[:0] = [_HERE]\n",
     "loads code from '../tools/import_standins'"),
    ("nodes/cache_key.py", "import importlib.util\n"
                           "spec = importlib.util.spec_from_file_location('x', 'tests/op_counter.py')\n",
     "loads code from 'tests/op_counter.py'"),
    # (b) ComfyUI in sine_ops, absolute, relative (the pack's nodes/), lazy
    ("sine_ops/adapters.py", "import folder_paths\n", "imports folder_paths"),
    ("sine_ops/training.py", "def f():\n    import comfy.model_management\n", "imports comfy.model_management"),
    ("sine_ops/sweep.py", "from ..nodes import errors\n", "imports nodes"),
    ("sine_ops/guidance.py", "from comfy_api.latest import io\n", "imports comfy_api.latest"),
    # (c) a node file imported by another file of nodes/, in each import form
    ("nodes/adapter_glue.py", "from . import patch\n", "imports the node file nodes.patch"),
    ("nodes/memory_guard.py", "from .lora_import import SineLoraAsAdapter\n",
     "imports the node file nodes.lora_import"),
    ("nodes/sweep.py", "from ..nodes.guidance import GuidanceEntry\n", "imports the node file nodes.guidance"),
]


@pytest.mark.parametrize("rel,code,message", BROKEN, ids=[f"{r}:{m}" for r, _, m in BROKEN])
def test_a_broken_rule_is_reported(scratch_source, tmp_path, rel, code, message):
    root = tmp_path / "tree"
    shutil.copytree(scratch_source, root)
    path = root / rel
    path.write_text(path.read_text(encoding="utf-8") + "\n" + code, encoding="utf-8")
    problems = layering_violations(root)
    assert problems and all(p.startswith(f"{rel}:") for p in problems), problems
    assert any(message in p for p in problems), problems


@pytest.mark.parametrize("rel,code", [
    ("tools/build_workflows.py", "import reference_forms\n"),           # dev code may use dev code
    ("tests/reference_forms.py", "import nodes.guidance\n"),             # tests import anything
    ("nodes/__init__.py", "from .guidance import SineGuiderNode\n"),      # the registry imports node files
    ("nodes/sweep.py", "from . import guided_prediction\n"),            # glue modules are shared
    ("workflows/headless.py", "import sys\nsys.path.append('workflows')\n"),
])
def test_allowed_imports_are_not_reported(scratch_source, tmp_path, rel, code):
    root = tmp_path / "tree"
    shutil.copytree(scratch_source, root)
    path = root / rel
    path.write_text(path.read_text(encoding="utf-8") + "\n" + code, encoding="utf-8")
    assert layering_violations(root) == []
