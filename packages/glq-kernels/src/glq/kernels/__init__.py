"""GLQ compute kernels: fused decode-matmul and fast Hadamard transforms.

Each op has a plain-PyTorch reference beside its CUDA C and Triton backends.
Importing this package neither compiles anything nor initialises CUDA (nor imports torch): the
names below load on first use.

Public API::

    from glq.kernels import matmul, hadamard, dequantize, pack_tables, glq_linear
    tables = pack_tables(stages)                # per-stage tables -> PackedTables
    y = matmul(x, codes, tables, row_scale)     # (..., in) fp16/bf16 -> (..., out)
    w = dequantize(codes, tables, row_scale)    # dense (out, in) float32
    z = hadamard(x, block_sizes=(512, 64), signs=None)
    y = glq_linear(x, codes, tables, row_scale, in_signs, out_signs)
    tcodes = tile_codes(codes)                  # the layout the CUDA kernels read fastest
    y = matmul(x, tcodes, tables, row_scale, tiled=True)  # same bits as on row-major codes

Op families live in ``qmatmul/`` and ``fwht/`` (reference and Triton backends) and ``csrc/``
(CUDA C); the folders are not named ``matmul``/``hadamard`` because importing a subpackage would
shadow the functions of those names.

Environment: ``GLQ_KERNELS_BACKEND=cuda|triton|reference`` forces a backend;
``GLQ_KERNELS_NO_BUILD=1`` skips the CUDA C build.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "matmul": "api",
    "hadamard": "api",
    "dequantize": "api",
    "glq_linear": "api",
    "glq_linear_reference": "api",
    "glq_linear_rotated": "api",
    "default_blocks": "api",
    "can_tile": "layout",
    "tile_codes": "layout",
    "untile_codes": "layout",
    "pack_tables": "_tables",
    "PackedTables": "_tables",
    "RATE_STAGES": "_tables",
    "select_backend": "_backend",
    "BACKENDS": "_backend",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'glq.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{mod}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
