"""The rooms and the direction of their imports: the library never imports a job, the sim never
imports the model, and no module imports inside a function except an optional dependency."""

import ast
import importlib.machinery
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder -> the import name it is installed as (pyproject.toml's package-dir)
ROOMS = {"vla": "vla", "policies": "vla.policies", "sim": "vla.sim", "ros_nodes": "vla.ros_nodes",
         "kernels": "vla.kernels"}
CORE = "vla.core"  # vla/*.py outside vla.jobs and vla.serving, and vla.cli
# what each room may import from this package
ALLOWED = {
    "vla.kernels": {"vla.kernels"},
    "vla.sim": {"vla.sim"},
    CORE: {CORE, "vla.kernels"},
    "vla.policies": {"vla.policies", CORE, "vla.kernels"},
    "vla.serving": {"vla.serving", CORE, "vla.sim"},  # the env server runs a suite's env (MetaWorld)
    "vla.jobs": {"vla.jobs", "vla.policies", "vla.serving", "vla.sim", CORE, "vla.kernels"},
    "vla.ros_nodes": {"vla.ros_nodes", "vla.serving", "vla.sim", CORE},
    "vla.cli": {"vla.jobs", "vla.policies", "vla.serving", "vla.sim", CORE, "vla.kernels", "vla.ros_nodes"},
}
CORE_MODULES = {p.stem for p in (ROOT / "vla").glob("*.py")} - {"cli", "__init__"}


def room_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "vla":
        return ""
    if len(parts) == 1 or parts[1] in CORE_MODULES:
        return CORE
    return "vla." + parts[1]


def modules():
    for folder, name in ROOMS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            dotted = ".".join([name, *rel.parts]).removesuffix(".__init__")
            yield dotted, path


def test_every_room_is_found():
    found = {room_of(m) for m, _ in modules()}
    assert {CORE, "vla.jobs", "vla.serving", "vla.sim", "vla.kernels", "vla.policies", "vla.ros_nodes", "vla.cli"} <= found


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda x: str(x).rsplit("/", 1)[-1])
def test_imports_point_one_way_and_sit_at_the_top(module, path):
    tree = ast.parse(path.read_text())
    room = room_of(module)
    lines = path.read_text().splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
        for name in names:
            target = room_of(name)
            if target:
                assert target in ALLOWED[room], f"{module} ({room}) imports {name} ({target})"
        if node.col_offset > 0:  # inside a function or class body
            assert "optional" in lines[node.lineno - 1], f"{module}:{node.lineno} imports {names} inside a function"


def test_the_kernels_folder_does_not_shadow_hfs_kernels_from_the_repository_root():
    """Python started in the repository root (`python -m pytest`, `python -c`, a REPL) has the root on
    sys.path, where `kernels/` once shadowed HF's `kernels` package: transformers >= 5.25 imports it, and
    every test failed to collect with "cannot import name 'CUDAProperties' from 'kernels'"."""
    code = ("import kernels, vla.kernels\n"
            "from transformers import Idefics3Model\n"
            "print(kernels.__file__, vla.kernels.__file__, sep='\\n')")
    outside_the_root = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    has_hf_kernels = importlib.machinery.PathFinder.find_spec("kernels", outside_the_root)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if has_hf_kernels is None:  # transformers < 5.25 without HF's kernels: the folder must not pose as it either
        assert "ModuleNotFoundError: No module named 'kernels'" in out.stderr, out.stderr
        return
    assert out.returncode == 0, out.stderr
    top_level, ours = out.stdout.split()
    assert not Path(top_level).resolve().is_relative_to(ROOT / "kernels"), top_level
    assert Path(ours).resolve() == ROOT / "kernels" / "__init__.py"
