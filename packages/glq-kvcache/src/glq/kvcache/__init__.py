"""INT8 KV cache for Hugging Face Transformers (keys per channel, values per token).

``from glq.kvcache import GLQQuantizedCache``; ``import glq.kvcache`` alone imports neither torch
nor transformers: the names below load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__all__ = [
    "GLQQuantizedCache",
    "GLQQuantizedLayer",
    "KVCacheConfig",
    "QTensor",
    "dequantize_per_channel",
    "dequantize_per_token",
    "quantize_per_channel",
    "quantize_per_token",
]

_HOMES = {
    "GLQQuantizedCache": "cache",
    "GLQQuantizedLayer": "cache",
    "KVCacheConfig": "cache",
    "QTensor": "quant",
    "dequantize_per_channel": "quant",
    "dequantize_per_token": "quant",
    "quantize_per_channel": "quant",
    "quantize_per_token": "quant",
}

if TYPE_CHECKING:
    from glq.kvcache.cache import GLQQuantizedCache, GLQQuantizedLayer, KVCacheConfig
    from glq.kvcache.quant import (
        QTensor,
        dequantize_per_channel,
        dequantize_per_token,
        quantize_per_channel,
        quantize_per_token,
    )


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'glq.kvcache' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"glq.kvcache.{home}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
