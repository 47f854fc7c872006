"""What a GLQ folder holds: per-layer rates, true size against bf16, format, allocation.

Reads ``config.json`` and the safetensors headers only (no tensor data), so it takes the
same time on folders of any size.
"""

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from glq.hf import config as _format
from glq.hf.config import GLQFormat, tensor_names

# Codebook tables stored once per folder (``glq_tables.*`` in format 1).
_TABLES_PREFIX = getattr(_format, "TABLES_PREFIX", "glq_tables") + "."

_DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
                "U16": 2, "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Tensor:
    shape: tuple[int, ...]
    nbytes: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_safetensors_headers(folder: Path) -> dict[str, Tensor]:
    """Name -> shape and stored bytes of every tensor in the folder's ``*.safetensors`` files."""
    tensors: dict[str, Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))  # header length, little-endian u64
            header = json.loads(f.read(size))
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            begin, end = meta["data_offsets"]
            tensors[name] = Tensor(tuple(meta["shape"]), end - begin)
    return tensors


def folder_info(folder: str | Path) -> dict:
    """Everything ``glq info`` prints, as a JSON-ready dict.

    Raises ``FileNotFoundError`` for a folder without ``config.json`` and ``ValueError``
    for one that is not a GLQ folder.
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json (not a model folder)")
    config = json.loads(config_path.read_text())
    qc = config.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "glq":
        method = qc.get("quant_method") if isinstance(qc, dict) else None
        raise ValueError(f"{folder} is not a GLQ folder (quantization_config quant_method is {method!r})")
    fmt = GLQFormat.from_dict(qc)
    tensors = read_safetensors_headers(folder)
    if not tensors:
        raise ValueError(f"{folder} has no *.safetensors files")

    owned: set[str] = set()
    layers = []
    for name, spec in fmt.layers.items():
        keys = tensor_names(name, spec)
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise ValueError(f"layer {name} lacks tensors {missing} in the safetensors files")
        owned.update(keys)
        weights = spec.in_features * spec.out_features
        nbytes = sum(tensors[k].nbytes for k in keys)
        layers.append({"name": name, "bpw": spec.bpw, "in": spec.in_features, "out": spec.out_features,
                       "bytes": nbytes, "bits_per_weight": 8 * nbytes / weights})
    tables = {k for k in tensors if k.startswith(_TABLES_PREFIX)}
    other = {k: t for k, t in tensors.items() if k not in owned and k not in tables}

    quant_weights = sum(spec.in_features * spec.out_features for spec in fmt.layers.values())
    quant_bytes = sum(layer["bytes"] for layer in layers)
    biases = sum(spec.out_features for spec in fmt.layers.values() if spec.bias)
    total_bytes = sum(t.nbytes for t in tensors.values())
    # bf16 reference: every parameter the folder represents at 2 bytes (quantized layers
    # counted at their full in x out size, codebook tables not at all).
    params = quant_weights + biases + sum(t.numel for t in other.values())
    by_rate = Counter(spec.bpw for spec in fmt.layers.values())
    weights_by_rate = Counter()
    for spec in fmt.layers.values():
        weights_by_rate[spec.bpw] += spec.in_features * spec.out_features
    return {
        "folder": str(folder),
        "architecture": (config.get("architectures") or ["?"])[0],
        "format_version": fmt.format_version,
        "codebook": fmt.codebook,
        "bpw_target": fmt.bpw_target,
        "quantized_layers": len(fmt.layers),
        "quantized_weights": quant_weights,
        # Nominal = the rates' weighted mean; true = stored bits (codes, scales, signs, bias) per weight.
        "nominal_bpw": sum(spec.bpw * spec.in_features * spec.out_features for spec in fmt.layers.values())
        / max(quant_weights, 1),
        "true_bpw": 8 * quant_bytes / max(quant_weights, 1),
        "allocation": {str(rate): {"layers": by_rate[rate], "weights": weights_by_rate[rate]}
                       for rate in sorted(by_rate)},
        "size_bytes": total_bytes,
        "quantized_bytes": quant_bytes,
        "codebook_table_bytes": sum(tensors[k].nbytes for k in tables),
        "other_bytes": sum(t.nbytes for t in other.values()),
        "bf16_bytes": 2 * params,
        "compression_vs_bf16": 2 * params / total_bytes,
        "layers": layers,
        "extra": fmt.extra,
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB"


def format_info(info: dict, per_layer: bool = True) -> str:
    """Human-readable report of ``folder_info``."""
    lines = [
        f"GLQ folder {info['folder']} ({info['architecture']})",
        f"  format version   {info['format_version']}   codebook {info['codebook'] or '-'}",
        f"  target bpw       {info['bpw_target'] if info['bpw_target'] is not None else '-'}",
        f"  quantized layers {info['quantized_layers']} ({info['quantized_weights']:,} weights)",
        f"  bits per weight  {info['nominal_bpw']:.3f} nominal, {info['true_bpw']:.3f} true (codes, scales, signs)",
        f"  size             {_mb(info['size_bytes'])} on disk vs {_mb(info['bf16_bytes'])} in bf16 "
        f"({info['compression_vs_bf16']:.2f}x smaller)",
        f"                   quantized linears {_mb(info['quantized_bytes'])}, codebook tables "
        f"{_mb(info['codebook_table_bytes'])}, other tensors {_mb(info['other_bytes'])}",
        "  allocation       "
        + ", ".join(f"{rate} bpw: {a['layers']} layers" for rate, a in info["allocation"].items()),
    ]
    if per_layer and info["layers"]:
        width = max(len(layer["name"]) for layer in info["layers"])
        lines += ["", f"  {'layer':<{width}}  {'out x in':>13}  bpw  true bpw  {'bytes':>10}"]
        for layer in info["layers"]:
            shape = f"{layer['out']}x{layer['in']}"
            lines.append(f"  {layer['name']:<{width}}  {shape:>13}  {layer['bpw']:>3}  {layer['bits_per_weight']:>8.3f}"
                         f"  {layer['bytes']:>10,}")
    return "\n".join(lines)
