"""The workspace's shape: six namespaced distributions, cheap CUDA-free imports, pins."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MEMBERS = ["lattice", "kernels", "quant", "hf", "kvcache", "cli"]
# Which other members each one may pull in: the point of the split is that the
# inference runtime (glq-hf) never needs the quantization toolkit.
ALLOWED_MEMBER_DEPS = {
    "lattice": set(),
    "kernels": set(),
    "hf": {"lattice", "kernels"},
    "quant": {"lattice", "kernels", "hf"},
    "kvcache": set(),
    "cli": {"quant", "hf", "kvcache"},
}


def _pyproject(member: str) -> dict:
    return tomllib.loads((ROOT / "packages" / f"glq-{member}" / "pyproject.toml").read_text())


@pytest.mark.parametrize("member", MEMBERS)
def test_member_layout(member):
    pkg = ROOT / "packages" / f"glq-{member}"
    meta = _pyproject(member)["project"]
    assert meta["name"] == f"glq-{member}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", meta["version"])
    assert (pkg / "README.md").read_text().strip()
    assert (pkg / "src" / "glq" / member / "__init__.py").is_file()
    # glq is an implicit namespace package: a stray glq/__init__.py would shadow the others.
    assert not (pkg / "src" / "glq" / "__init__.py").exists()
    assert not (ROOT / "glq").exists()


@pytest.mark.parametrize("member", MEMBERS)
def test_member_dependencies_have_ranges(member):
    deps = _pyproject(member)["project"]["dependencies"]
    for dep in deps:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0)
        if name.startswith("glq-"):
            assert name.removeprefix("glq-") in ALLOWED_MEMBER_DEPS[member], f"{member} must not need {name}"
            assert ">=" in dep and "<" in dep.replace("<=", ""), f"{dep!r} needs a version range"
    if member != "quant":
        assert not any(d.startswith("datasets") for d in deps), f"glq-{member} must not need datasets"


def test_lock_is_ignored_and_pins_are_exact():
    assert "uv.lock" in (ROOT / ".gitignore").read_text().split()
    root = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins = root["tool"]["uv"]["constraint-dependencies"]
    names = {re.match(r"[A-Za-z0-9_.-]+", p).group(0) for p in pins}
    for needed in ["torch", "triton", "transformers", "safetensors", "datasets", "ninja", "pytest", "gguf"]:
        assert needed in names, f"{needed} is not pinned"
    assert all("==" in p for p in pins)


def test_imports_do_not_initialise_cuda():
    code = (
        "import torch\n"
        "def boom(*a, **k): raise RuntimeError('CUDA initialised at import')\n"
        "torch.cuda._lazy_init = boom\n"
        "torch.cuda.init = boom\n"
        + "".join(f"import glq.{m}\n" for m in MEMBERS)
        + "assert not torch.cuda.is_initialized()\n"
        "import sys\n"
        "heavy = [m for m in ('datasets', 'triton', 'transformers') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # The packages' own imports stay cheap: none of these heavy modules is pulled in.
    assert out.stdout.strip() == "", f"importing glq.* pulled in: {out.stdout.strip()}"


@pytest.mark.slow
@pytest.mark.parametrize("member", MEMBERS)
def test_member_imports_alone(member, tmp_path):
    """`uv sync --package X` into a fresh environment holds X's declared dependencies only."""
    uv = shutil.which("uv")
    cmd = [uv] if uv else [sys.executable, "-m", "uv"]
    if subprocess.run([*cmd, "--version"], capture_output=True).returncode != 0:
        pytest.skip("uv is not installed")
    env = dict(os.environ, UV_PROJECT_ENVIRONMENT=str(tmp_path / "venv"))
    env.pop("VIRTUAL_ENV", None)
    subprocess.run([*cmd, "sync", "--package", f"glq-{member}", "--no-dev", "--quiet"],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    python = tmp_path / "venv" / "bin" / "python"
    # The suite's TRITON_INTERPRET=1 makes `import triton` need numpy, which no member
    # declares; a user's import runs without it.
    env.pop("TRITON_INTERPRET", None)
    others = [m for m in MEMBERS if m != member]
    # Import every submodule, not just the package: an undeclared dependency usually
    # hides in a module the package's __init__ does not touch.
    code = (
        "import importlib, pkgutil\n"
        f"import glq.{member} as pkg\n"
        "for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "    importlib.import_module(info.name)\n"
        "import importlib.util as u\n"
        f"present = [m for m in {others!r} if u.find_spec('glq.' + m) is not None]\n"
        "print(','.join(present))\n"
    )
    out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    present = set(filter(None, out.stdout.strip().split(",")))
    assert present <= _transitive(member), f"glq-{member} installed undeclared members: {present}"


def _transitive(member: str) -> set[str]:
    seen: set[str] = set()
    todo = list(ALLOWED_MEMBER_DEPS[member])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(ALLOWED_MEMBER_DEPS[m])
    return seen


@pytest.mark.parametrize("member", [m for m in MEMBERS if any(
    f.suffix not in (".py", ".pyc") for f in (ROOT / "packages" / f"glq-{m}" / "src").rglob("*") if f.is_file())])
def test_wheel_ships_every_file_of_its_package(member, tmp_path):
    """The built wheel holds every file under the member's src, data included: the CUDA sources the
    kernels compile at first use, the codebook tables, the shipped texts and task data. (glq 0.2.10's
    wheel left its CUDA sources out, so installed users only ever ran its Triton path.)"""
    import zipfile

    uv = shutil.which("uv")
    cmd = [uv] if uv else [sys.executable, "-m", "uv"]
    if subprocess.run([*cmd, "--version"], capture_output=True).returncode != 0:
        pytest.skip("uv is not installed")
    subprocess.run([*cmd, "build", "--package", f"glq-{member}", "--wheel", "--out-dir", str(tmp_path), "--quiet"],
                   cwd=ROOT, check=True, timeout=600)
    (wheel,) = tmp_path.glob("*.whl")
    src = ROOT / "packages" / f"glq-{member}" / "src"
    want = {f.relative_to(src).as_posix() for f in src.rglob("*")
            if f.is_file() and "__pycache__" not in f.parts and f.suffix != ".pyc"}
    names = set(zipfile.ZipFile(wheel).namelist())
    assert not want - names, sorted(want - names)


def test_ruff_is_clean():
    """The root ruff settings hold for every package and test (the lint the README names)."""
    ruff = shutil.which("ruff") or (Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    out = subprocess.run([str(ruff), "check", "--output-format", "concise", str(ROOT)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-3000:]
