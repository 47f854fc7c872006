"""Backend choice: one small function, ``select_backend``.

Order: the device (CPU tensors use the reference, or Triton's interpreter when forced), then the
``GLQ_KERNELS_BACKEND`` override (``cuda``, ``triton`` or ``reference``), then the default
(CUDA C if it builds, else Triton, else the reference). Falling back never happens silently: the
first fallback on a device logs a warning with the reason.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os

import torch

log = logging.getLogger("glq.kernels")

BACKENDS = ("cuda", "triton", "reference")
BACKEND_ENV = "GLQ_KERNELS_BACKEND"

_warned: set[tuple[str, str]] = set()


def _warn_once(key: str, msg: str) -> None:
    if (key, msg) not in _warned:
        _warned.add((key, msg))
        log.warning(msg)


@functools.lru_cache(maxsize=1)
def _has_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device`` (and why not)."""
    if not _has_triton():
        return False, "triton is not installed (pip install glq-kernels[triton])"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "") in ("", "0"):
            return False, "CPU tensors need TRITON_INTERPRET=1 for Triton"
        return True, ""
    if device.type != "cuda":
        return False, f"Triton runs on CUDA devices, not {device.type}"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return False, f"compute capability {major}.{minor} < 8.0"
    return True, ""


def cuda_available(device: torch.device) -> tuple[bool, str]:
    """Whether the CUDA C extension is built and loaded for ``device`` (builds on first call)."""
    if device.type != "cuda":
        return False, f"the CUDA C backend needs a CUDA tensor, got {device.type}"
    from ._build import load_extension

    return load_extension()


def _forced() -> str | None:
    v = os.environ.get(BACKEND_ENV, "").strip().lower()
    if not v:
        return None
    if v not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV}={v!r}: expected one of {BACKENDS}")
    return v


def select_backend(device: torch.device | str) -> str:
    """The backend ("cuda", "triton" or "reference") that ops on ``device`` use.

    Raises:
        RuntimeError: ``GLQ_KERNELS_BACKEND`` forces a backend that cannot run on ``device``.
    """
    device = torch.device(device)
    forced = _forced()
    if forced == "reference":
        return "reference"
    if forced is not None:
        ok, why = cuda_available(device) if forced == "cuda" else triton_available(device)
        if not ok:
            raise RuntimeError(f"{BACKEND_ENV}={forced} but it cannot run on {device}: {why}")
        return forced
    if device.type != "cuda":
        return "reference"
    ok, why = cuda_available(device)
    if ok:
        return "cuda"
    tok, twhy = triton_available(device)
    if tok:
        _warn_once(
            "triton",
            f"glq.kernels: CUDA C backend unavailable ({why}); using Triton (slower at batch 1; see notes/kernels.md)",
        )
        return "triton"
    _warn_once(
        "reference",
        f"glq.kernels: no fast backend on {device} (CUDA C: {why}; Triton: {twhy}); using the "
        "plain-PyTorch reference, which materialises dense weights and is 10-100x slower",
    )
    return "reference"
