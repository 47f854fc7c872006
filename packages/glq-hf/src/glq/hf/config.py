"""The GLQ on-disk format: what ``config.json``'s ``quantization_config`` holds.

A GLQ folder is a standard Hugging Face model folder. For every quantized linear
``{name}`` (e.g. ``model.layers.0.mlp.down_proj``) the safetensors hold

- ``{name}.codes_{s}``: (out, in/8) stage-``s`` codes, int16 (a 16-bit pattern) or uint8;
- ``{name}.row_scale``: (out,) float32, multiplies output row r of the decoded weight;
- ``{name}.signs_in`` (in,) and ``{name}.signs_out`` (out,): int8 ±1, the random
  Hadamard signs; float16 when the layer's ``signs_dtype`` is ``"float16"`` (fine-tuned: the
  random sign times a learned per-channel gain, applied exactly where the sign is);
- ``{name}.bias`` when the layer has one;

and, once per model, the codebook tables of every rate used, ``glq_tables.bpw{b}_stage{s}_*``
(a few KiB each), so a folder decodes the same way whatever glq-lattice version reads it.

The weight that a layer applies is

    W = diag(signs_out) · H_out · diag(row_scale) · W̃ · H_in · diag(signs_in)

where W̃[r, 8j:8j+8] = Σ_s decode_s(codes[s][r, j]) and H is the orthonormal Walsh-Hadamard
matrix, block-diagonal over ``in_blocks``/``out_blocks`` (powers of two summing to the size).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

FORMAT_VERSION = 1
SUPPORTED_BPW = (2, 3, 4, 5, 6, 7, 8)
SIGNS_DTYPES = ("int8", "float16")


def power_of_two_blocks(n: int) -> tuple[int, ...]:
    """Split ``n`` into descending powers of two (its binary digits): 960 -> (512, 256, 128, 64).

    Blocks below 8 are refused: codes group 8 weights, so every size must be a multiple of 8.
    """
    if n <= 0 or n % 8:
        raise ValueError(f"size {n} must be a positive multiple of 8")
    return tuple(1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1)


@dataclass(frozen=True)
class LayerSpec:
    """How one linear layer was quantized: everything the loader needs, nothing to guess."""

    bpw: int
    in_features: int
    out_features: int
    in_blocks: tuple[int, ...]
    out_blocks: tuple[int, ...]
    seed: int  # signs_out come from seed + 1, signs_in from in_seed if given, else from seed
    bias: bool = False
    signs_dtype: str = "int8"  # "float16": signs carry fine-tuned channel gains (written only then)
    # The seed of signs_in when layers that read one input share them (q/k/v, gate/up: their input
    # transform is computed once at inference); written only then.
    in_seed: int | None = None

    def __post_init__(self):
        if self.signs_dtype not in SIGNS_DTYPES:
            raise ValueError(f"signs_dtype={self.signs_dtype!r} is not supported; allowed: {SIGNS_DTYPES}")
        if self.bpw not in SUPPORTED_BPW:
            raise ValueError(f"bpw={self.bpw} is not supported; allowed: {SUPPORTED_BPW}")
        if self.in_features % 8:
            raise ValueError(f"in_features={self.in_features} is not a multiple of 8")
        for name, blocks, size in (("in_blocks", self.in_blocks, self.in_features),
                                   ("out_blocks", self.out_blocks, self.out_features)):
            if sum(blocks) != size or any(b & (b - 1) for b in blocks):
                raise ValueError(f"{name}={list(blocks)} must be powers of two summing to {size}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown layer fields {sorted(unknown)}")
        return cls(**{**d, "in_blocks": tuple(d["in_blocks"]), "out_blocks": tuple(d["out_blocks"])})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["in_blocks"], d["out_blocks"] = list(self.in_blocks), list(self.out_blocks)
        if self.signs_dtype == "int8":  # the defaults stay implicit: such configs read as before
            del d["signs_dtype"]
        if self.in_seed is None:
            del d["in_seed"]
        return d


@dataclass
class GLQFormat:
    """The ``quantization_config`` of a GLQ folder (format version 1)."""

    layers: dict[str, LayerSpec]
    format_version: int = FORMAT_VERSION
    codebook: str = ""  # glq.lattice's codebook identifier, for information and checks
    bpw_target: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # provenance: tool versions, calibration, ...

    def __post_init__(self):
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"GLQ format version {self.format_version} is not supported by this glq-hf "
                f"(it reads version {FORMAT_VERSION}); upgrade glq-hf"
            )

    @property
    def rates(self) -> tuple[int, ...]:
        return tuple(sorted({spec.bpw for spec in self.layers.values()}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": "glq",
            "format_version": self.format_version,
            "codebook": self.codebook,
            "bpw_target": self.bpw_target,
            "layers": {name: spec.to_dict() for name, spec in self.layers.items()},
            "extra": self.extra,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GLQFormat:
        if d.get("quant_method") != "glq":
            raise ValueError(f"quant_method is {d.get('quant_method')!r}, expected 'glq'")
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"GLQ format version {version!r} is not supported by this glq-hf "
                f"(it reads version {FORMAT_VERSION}); upgrade glq-hf"
            )
        layers = {}
        for name, spec in d.get("layers", {}).items():
            try:
                layers[name] = LayerSpec.from_dict(spec)
            except (TypeError, KeyError, ValueError) as err:
                raise ValueError(f"quantization_config layer {name!r}: {err}") from err
        return cls(layers=layers, format_version=version, codebook=d.get("codebook", ""),
                   bpw_target=d.get("bpw_target"), extra=d.get("extra", {}))


def stage_bits(bpw: int) -> tuple[int, ...]:
    """Bits of each stage of a rate: 16-bit stages, then an 8-bit one for odd rates."""
    if bpw not in SUPPORTED_BPW:
        raise ValueError(f"bpw={bpw} is not supported; allowed: {SUPPORTED_BPW}")
    return (16,) * (bpw // 2) + ((8,) if bpw % 2 else ())


def tensor_names(name: str, spec: LayerSpec) -> list[str]:
    """The safetensors keys one quantized layer owns."""
    names = [f"{name}.codes_{s}" for s in range(len(stage_bits(spec.bpw)))]
    names += [f"{name}.row_scale", f"{name}.signs_in", f"{name}.signs_out"]
    if spec.bias:
        names.append(f"{name}.bias")
    return names


TABLES_PREFIX = "glq_tables"


def table_key(bpw: int, stage: int, field: str) -> str:
    """safetensors key of one codebook table field (abs, parity, table or scale)."""
    return f"{TABLES_PREFIX}.bpw{bpw}_stage{stage}_{field}"
