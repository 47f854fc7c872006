"""Build and load the CUDA C extension (JIT with ninja on first use, cached on disk).

The sources are ``csrc/glq_kernels.cu`` (torch-free) and ``csrc/binding.cpp`` (torch/library.h).
They are compiled for the local GPU's architecture only, into torch's extension cache
(``TORCH_EXTENSIONS_DIR``), under a name that hashes the sources and flags, so an edited source
rebuilds and an unchanged one loads in about a second. Where nvcc offers it, the one .cu file is
compiled with ``--split-compile=0`` (its optimizer runs on every CPU core): 41.6 -> 26.9 s on a 2-core
machine, with every kernel's SASS unchanged (compared with cuobjdump); more cores gain more.

Environment:
    GLQ_KERNELS_NO_BUILD=1   never compile; the CUDA backend is then unavailable (logged once).
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import threading
from importlib import resources

import torch

log = logging.getLogger("glq.kernels")

_lock = threading.Lock()
_state: dict[str, object] = {}

NO_BUILD_ENV = "GLQ_KERNELS_NO_BUILD"
# Developer builds with per-CTA timelines of the small-batch kernel (scripts/trace_probe.py); the flag
# is part of the build's hash, so a traced build never replaces the normal one.
TRACE_ENV = "GLQ_KERNELS_TRACE"


def _sources() -> list[str]:
    root = resources.files("glq.kernels") / "csrc"
    return [str(root / "glq_kernels.cu"), str(root / "binding.cpp")]


SPLIT_COMPILE = "--split-compile"


def nvcc_options(nvcc: str) -> str:
    """``nvcc --help`` of the toolkit's compiler ("" if it cannot run): which options it knows."""
    try:
        return subprocess.run([nvcc, "--help"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def cuda_flags(arch: str, split_compile: bool = False) -> list[str]:
    """nvcc flags for compute capability ``arch`` (e.g. ``"90"``); ``split_compile`` runs the device
    optimizer on every CPU core (older nvcc releases lack the option)."""
    flags = [
        "-O3",
        "-std=c++17",
        f"-gencode=arch=compute_{arch},code=sm_{arch}",
        "-lineinfo",
    ]
    return [*flags, f"{SPLIT_COMPILE}=0"] if split_compile else flags


def load_extension() -> tuple[bool, str]:
    """Build (first time) and load the extension; returns (available, reason if not).

    Never raises: a failed build is logged with its cause, and callers fall back.
    """
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"]), str(_state["why"])
        ok, why = _load()
        _state["ok"], _state["why"] = ok, why
        if not ok:
            log.warning("glq.kernels: CUDA C backend unavailable: %s", why)
        return ok, why


def _load() -> tuple[bool, str]:
    if os.environ.get(NO_BUILD_ENV, "") not in ("", "0"):
        return False, f"{NO_BUILD_ENV} is set"
    if hasattr(torch.ops, "glq_cuda") and hasattr(torch.ops.glq_cuda, "matmul"):
        return True, ""
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    try:
        from torch.utils import cpp_extension
    except ImportError as e:  # pragma: no cover - part of torch
        return False, f"torch.utils.cpp_extension unavailable: {e}"
    if cpp_extension.CUDA_HOME is None:
        return False, "no CUDA toolkit found (set CUDA_HOME to the folder holding bin/nvcc)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0 (mma.m16n8k16 bf16 needs sm_80)"
    arch = f"{major}{minor}"
    nvcc = os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    flags = cuda_flags(arch, split_compile=SPLIT_COMPILE in nvcc_options(nvcc))
    cflags = ["-O3"]
    if os.environ.get(TRACE_ENV, "") not in ("", "0"):  # developer build: v4 timelines
        flags.append("-DGLQ_TRACE")
        cflags.append("-DGLQ_TRACE")
    srcs = _sources()
    h = hashlib.sha256()
    for path in [*srcs, os.path.join(os.path.dirname(srcs[0]), "glq_kernels.h")]:
        with open(path, "rb") as f:
            h.update(f.read())
    h.update(" ".join(flags).encode())
    h.update(torch.__version__.encode())
    name = f"glq_kernels_cuda_{h.hexdigest()[:12]}"
    old_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
    try:
        cpp_extension.load(
            name=name,
            sources=srcs,
            extra_cflags=cflags,
            extra_cuda_cflags=flags,
            extra_include_paths=[os.path.dirname(srcs[0])],
            is_python_module=False,
            verbose=os.environ.get("GLQ_KERNELS_VERBOSE_BUILD", "") not in ("", "0"),
        )
    except Exception as e:  # a compiler error, missing ninja, ...: report it, fall back
        return False, f"build failed: {type(e).__name__}: {str(e)[-2000:]}"
    finally:
        if old_arch is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = old_arch
    if not hasattr(torch.ops.glq_cuda, "matmul"):
        return False, "extension loaded but registered no glq_cuda ops"
    return True, ""
