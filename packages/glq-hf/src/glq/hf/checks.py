"""Load-time checks of a GLQ folder: a broken folder fails in ``from_pretrained`` with the layer
and the problem named, not later with garbage output.

Two passes, both cheap:

* :func:`check_checkpoint` reads only the safetensors headers (names, shapes, dtypes) before any
  weight is loaded: missing tensors, shapes that contradict the config, code dtypes that do not
  match their stage (an int16 code in an 8-bit stage indexes beyond its 256-row table),
  tables with the wrong number of rows.
* :func:`check_loaded` reads the small tensors after loading: signs must be ±1, row scales
  finite, tables valid. Codes themselves need no value check: with the right dtype every
  16-bit code (512 patterns x 128 sign sets) and every uint8 code names a table row.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from glq.hf.config import TABLES_PREFIX, GLQFormat, LayerSpec, stage_bits, table_key
from glq.hf.tables import table_fields

# safetensors header dtype strings
_ST_DTYPES = {torch.int16: "I16", torch.uint8: "U8", torch.int8: "I8", torch.float32: "F32"}
_FLOAT_ST = {"F16", "BF16", "F32", "F64"}
MAX_LISTED = 12


class GLQLoadError(ValueError):
    """A GLQ folder that cannot be loaded as its config describes. ``problems`` lists each one."""

    def __init__(self, where: str, problems: Sequence[str]):
        self.problems = list(problems)
        shown = "\n  - ".join(self.problems[:MAX_LISTED])
        more = f"\n  ... and {len(self.problems) - MAX_LISTED} more" if len(self.problems) > MAX_LISTED else ""
        super().__init__(f"GLQ folder {where} cannot be loaded: {len(self.problems)} problem(s)\n  - {shown}{more}")


def read_headers(files: Iterable[str]) -> dict[str, tuple[tuple[int, ...], str]]:
    """key -> (shape, safetensors dtype string) of every tensor in the files, headers only."""
    from safetensors import safe_open

    out = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open is not a mapping
                sl = h.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype())
    return out


def _expect(problems: list[str], headers, key: str, shape, dtypes: set[str], layer: str, why: str) -> None:
    if key not in headers:
        problems.append(f"layer {layer!r}: tensor {key!r} is missing ({why})")
        return
    got_shape, got_dtype = headers[key]
    if got_shape != tuple(shape):
        problems.append(f"layer {layer!r}: {key!r} has shape {got_shape} but the config needs {tuple(shape)} ({why})")
    if got_dtype not in dtypes:
        problems.append(f"layer {layer!r}: {key!r} is {got_dtype} but must be {' or '.join(sorted(dtypes))} ({why})")


def layer_problems(name: str, spec: LayerSpec, headers) -> list[str]:
    """What contradicts ``spec`` among one layer's tensors (from :func:`read_headers`)."""
    problems: list[str] = []
    out, groups = spec.out_features, spec.in_features // 8
    bits = stage_bits(spec.bpw)
    for s, b in enumerate(bits):
        dt = torch.int16 if b == 16 else torch.uint8
        why = (f"stage {s} of bpw={spec.bpw} is {b}-bit: (out_features={out}, in_features/8={groups}) "
               f"{_ST_DTYPES[dt]} codes")
        _expect(problems, headers, f"{name}.codes_{s}", (out, groups), {_ST_DTYPES[dt]}, name, why)
    extra = f"{name}.codes_{len(bits)}"
    if extra in headers:
        problems.append(f"layer {name!r}: has {extra!r} but bpw={spec.bpw} has only {len(bits)} stage(s); "
                        "the config's rate contradicts the codes")
    _expect(problems, headers, f"{name}.row_scale", (out,), {"F32"}, name, f"out_features={out}")
    signs = {"int8": "I8", "float16": "F16"}[spec.signs_dtype]
    _expect(problems, headers, f"{name}.signs_in", (spec.in_features,), {signs}, name,
            f"in_features={spec.in_features}, signs_dtype={spec.signs_dtype}")
    _expect(problems, headers, f"{name}.signs_out", (out,), {signs}, name,
            f"out_features={out}, signs_dtype={spec.signs_dtype}")
    if spec.bias:
        _expect(problems, headers, f"{name}.bias", (out,), _FLOAT_ST, name, "the config says bias=true")
    elif f"{name}.bias" in headers:
        problems.append(f"layer {name!r}: the folder has {name}.bias but the config says bias=false")
    return problems


def table_problems(rates: Iterable[int], headers) -> list[str]:
    problems: list[str] = []
    for bpw in rates:
        for s, b in enumerate(stage_bits(bpw)):
            for field, (shape, dtype) in table_fields(b).items():
                key = table_key(bpw, s, field)
                why = f"bpw={bpw} stage {s} is {b}-bit"
                if field == "abs":
                    why += "; 16-bit codes index 512 patterns (code >> 7)"
                elif field == "table":
                    why += "; uint8 codes index 256 rows"
                _expect(problems, headers, key, shape, {_ST_DTYPES[dtype]}, TABLES_PREFIX, why)
    return problems


def check_checkpoint(files: Sequence[str], fmt: GLQFormat, where: str) -> None:
    """Raise :class:`GLQLoadError` if the files' headers contradict ``fmt``."""
    headers = read_headers(files)
    problems = table_problems(fmt.rates, headers)
    for name, spec in fmt.layers.items():
        problems += layer_problems(name, spec, headers)
    if problems:
        raise GLQLoadError(where, problems)


def check_model(model: nn.Module, fmt: GLQFormat, where: str) -> dict[str, nn.Linear]:
    """The model's linear of every configured layer; raise if one is absent or has other sizes."""
    modules = dict(model.named_modules())
    found, problems = {}, []
    for name, spec in fmt.layers.items():
        mod = modules.get(name)
        if mod is None:
            problems.append(f"layer {name!r}: the {type(model).__name__} has no module of that name")
        elif not isinstance(mod, nn.Linear):
            problems.append(f"layer {name!r}: is a {type(mod).__name__} in the model, not an nn.Linear")
        elif (mod.in_features, mod.out_features) != (spec.in_features, spec.out_features):
            problems.append(
                f"layer {name!r}: the config says in_features={spec.in_features}, out_features={spec.out_features} "
                f"but the model's linear has in_features={mod.in_features}, out_features={mod.out_features}")
        elif (mod.bias is not None) != spec.bias:
            problems.append(f"layer {name!r}: the config says bias={spec.bias} but the model's linear "
                            f"has{' a' if mod.bias is not None else ' no'} bias")
        else:
            found[name] = mod
    if problems:
        raise GLQLoadError(where, problems)
    return found


@torch.no_grad()
def loaded_layer_problems(name: str, layer) -> list[str]:
    """Value checks of one loaded ``GLQLinear``'s small tensors (signs, row scales)."""
    problems = []
    for attr in ("signs_in", "signs_out"):
        s = getattr(layer, attr)
        if s.is_floating_point():  # fine-tuned gains: any finite, non-zero value
            bad = ~torch.isfinite(s) | (s == 0)
            rule = "finite and non-zero (float16 signs carry fine-tuned gains)"
        else:
            bad = (s != 1) & (s != -1)
            rule = "±1"
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            problems.append(f"layer {name!r}: {attr} must be {rule} but element {i} is {s[i].item()}")
    rs = layer.row_scale
    if not bool(torch.isfinite(rs).all()):
        i = int((~torch.isfinite(rs)).nonzero()[0, 0])
        problems.append(f"layer {name!r}: row_scale[{i}] is {float(rs[i])}, not finite")
    return problems
