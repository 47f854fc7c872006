"""Test helpers: valid GLQ folders and layers with random contents, without the quantizer.

``random_glq_folder`` turns an unquantized Hugging Face model folder into a GLQ folder whose
quantized linears hold random codes, signs and scales (sized so activations keep roughly the
original weights' scale) and whose tables are glq.lattice's real ones when it ships them, else
random but valid. The model it loads into is nonsense, but every loading, saving and kernel path
is the real one.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from glq.hf.config import FORMAT_VERSION, GLQFormat, LayerSpec, power_of_two_blocks, stage_bits, table_key
from glq.hf.guard import guard_tensors
from glq.hf.tables import GLQTables

_SKIP_COPY = {"config.json", "model.safetensors.index.json"}


def random_stage_tables(bpw: int, generator: torch.Generator | None = None) -> list[dict]:
    """Random but valid stage tables of one rate (unit-RMS first stage, smaller later ones)."""
    g = generator or torch.Generator().manual_seed(1000 + bpw)
    stages = []
    for s, bits in enumerate(stage_bits(bpw)):
        scale = 0.25 ** s
        if bits == 16:
            abs_ = torch.randn(512, 8, generator=g).abs() + 0.05  # no zero entries, as in the real tables
            parity = torch.randint(0, 2, (512,), generator=g, dtype=torch.uint8)
            stages.append({"bits": 16, "abs": abs_, "parity": parity, "scale": scale})
        else:
            stages.append({"bits": 8, "table": torch.randn(256, 8, generator=g), "scale": scale})
    return stages


def stage_tables(bpw: int, source: str = "auto") -> list[dict]:
    """Stage tables of one rate as dicts: glq.lattice's (``"lattice"``), random (``"random"``),
    or glq.lattice's when its table file is installed (``"auto"``)."""
    if source not in ("auto", "lattice", "random"):
        raise ValueError(f"source must be 'auto', 'lattice' or 'random' rather than {source!r}")
    if source != "random":
        try:
            from glq.lattice import codec

            tables = codec(bpw).tables()
        except FileNotFoundError:
            if source == "lattice":
                raise
        else:
            return [{"bits": t.bits, "abs": t.abs, "parity": None if t.parity is None else t.parity.to(torch.uint8),
                     "table": t.table, "scale": float(t.scale)} for t in tables]
    return random_stage_tables(bpw)


def table_tensors(rates: Sequence[int], source: str = "auto") -> dict[str, torch.Tensor]:
    """The ``glq_tables.*`` tensors of a folder using ``rates``."""
    out = {}
    for bpw in sorted(set(rates)):
        for s, st in enumerate(stage_tables(bpw, source)):
            out[table_key(bpw, s, "scale")] = torch.tensor([float(st["scale"])], dtype=torch.float32)
            if st["bits"] == 16:
                out[table_key(bpw, s, "abs")] = st["abs"].to(torch.float32).contiguous()
                out[table_key(bpw, s, "parity")] = st["parity"].to(torch.uint8).contiguous()
            else:
                out[table_key(bpw, s, "table")] = st["table"].to(torch.float32).contiguous()
    return out


def random_layer_tensors(name: str, spec: LayerSpec, weight_rms: float = 0.02,
                         generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Random codes, signs and scales of one layer (its ``{name}.*`` tensors)."""
    g = generator or torch.Generator().manual_seed(spec.seed)
    out, groups = spec.out_features, spec.in_features // 8
    t: dict[str, torch.Tensor] = {}
    for s, bits in enumerate(stage_bits(spec.bpw)):
        if bits == 16:
            t[f"{name}.codes_{s}"] = torch.randint(-32768, 32768, (out, groups), generator=g, dtype=torch.int32).to(
                torch.int16)
        else:
            t[f"{name}.codes_{s}"] = torch.randint(0, 256, (out, groups), generator=g, dtype=torch.int32).to(
                torch.uint8)
    # Decoded vectors have RMS about 1 (first stage), so row_scale sets the weights' RMS.
    t[f"{name}.row_scale"] = weight_rms * (0.5 + torch.rand(out, generator=g))
    t[f"{name}.signs_in"] = (torch.randint(0, 2, (spec.in_features,), generator=g) * 2 - 1).to(torch.int8)
    t[f"{name}.signs_out"] = (torch.randint(0, 2, (out,), generator=g) * 2 - 1).to(torch.int8)
    if spec.bias:
        t[f"{name}.bias"] = 0.02 * torch.randn(out, generator=g)
    return t


def layer_spec(in_features: int, out_features: int, bpw: int, seed: int = 0, bias: bool = False,
               signs_dtype: str = "int8") -> LayerSpec:
    return LayerSpec(bpw=bpw, in_features=in_features, out_features=out_features,
                     in_blocks=power_of_two_blocks(in_features), out_blocks=_out_blocks(out_features),
                     seed=seed, bias=bias, signs_dtype=signs_dtype)


def _out_blocks(n: int) -> tuple[int, ...]:
    # Output sizes need no multiple of 8 (codes group inputs); the smallest block may be below 8.
    return tuple(1 << b for b in range(n.bit_length() - 1, -1, -1) if n >> b & 1)


def random_glq_linear(in_features: int, out_features: int, bpw: int, *, bias: bool = False, seed: int = 0,
                      tables: str = "auto", device: torch.device | str = "cpu", signs_dtype: str = "int8"):
    """A standalone ``GLQLinear`` with random contents and its own tables (for kernel-level tests).

    ``signs_dtype="float16"`` gives fine-tuned-style signs: ±1 times random gains in [0.5, 1.5).
    """
    from glq.hf.linear import GLQLinear

    spec = layer_spec(in_features, out_features, bpw, seed=seed, bias=bias, signs_dtype=signs_dtype)
    layer = GLQLinear(spec, device=device)
    for key, value in random_layer_tensors("l", spec, weight_rms=1.0).items():
        getattr(layer, key.split(".", 1)[1]).copy_(value)
    if signs_dtype == "float16":
        g = torch.Generator().manual_seed(seed + 1)
        for signs in (layer.signs_in, layer.signs_out):
            signs.mul_((torch.rand(signs.shape, generator=g) + 0.5).to(signs.dtype))
    holder = GLQTables.from_stages({bpw: stage_tables(bpw, tables)}).to(device)
    return layer.attach(holder.packed(bpw))


def quantizable_linears(model: nn.Module) -> list[str]:
    """Names of the model's ``nn.Linear`` modules a GLQ folder may quantize: all but the output
    embedding (commonly tied to the input embedding, and the most sensitive to error)."""
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [name for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and m is not out_emb and m.in_features % 8 == 0]


def random_glq_folder(src: str | Path, out: str | Path,
                      rates: int | Sequence[int] | Mapping[str, int] | Callable[[str], int] = 2, *,
                      tables: str = "auto", seed: int = 0, guard: bool = True,
                      tensors_hook: Callable[[dict[str, torch.Tensor]], None] | None = None,
                      config_hook: Callable[[dict], None] | None = None) -> Path:
    """Write a valid GLQ folder with random codes from the unquantized HF folder ``src``.

    Args:
        src: a model folder ``from_pretrained`` reads (safetensors).
        out: the folder to write (created).
        rates: one bpw for every linear, a sequence cycled over the linears in order, a mapping
            name -> bpw (unnamed linears stay unquantized), or a function name -> bpw (None: skip).
        tables: "auto", "lattice" or "random" (see :func:`stage_tables`).
        seed: base seed of the random contents.
        guard: add the tensors that make loading without ``import glq.hf`` fail (:mod:`glq.hf.guard`).
        tensors_hook / config_hook: called on the tensors dict / config dict before writing, so
            tests can break a folder on purpose.

    Returns:
        ``out`` as a Path.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    src, out = Path(src), Path(out)
    config = AutoConfig.from_pretrained(src)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = quantizable_linears(skeleton)
    modules = dict(skeleton.named_modules())

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensors[k] = h.get_tensor(k)

    def rate_of(i: int, name: str) -> int | None:
        if isinstance(rates, int):
            return rates
        if isinstance(rates, Mapping):
            return rates.get(name)
        if callable(rates):
            return rates(name)
        return list(rates)[i % len(rates)]

    layers: dict[str, LayerSpec] = {}
    for i, name in enumerate(names):
        bpw = rate_of(i, name)
        if bpw is None or f"{name}.weight" not in tensors:
            continue
        m = modules[name]
        spec = layer_spec(m.in_features, m.out_features, int(bpw), seed=seed * 100_003 + i, bias=m.bias is not None)
        w = tensors.pop(f"{name}.weight")
        b = tensors.pop(f"{name}.bias", None)
        rms = float(w.float().pow(2).mean().sqrt())
        lt = random_layer_tensors(name, spec, weight_rms=rms, generator=torch.Generator().manual_seed(spec.seed))
        if b is not None:
            lt[f"{name}.bias"] = b
        tensors.update(lt)
        layers[name] = spec
    # Layers reading one input share its signs, as glq.quant writes them (glq.hf then transforms
    # that input once per group).
    first: dict[tuple[str, str], str] = {}
    for name, spec in list(layers.items()):
        parent, _, child = name.rpartition(".")
        head = first.setdefault((parent, _INPUT_GROUPS.get(child, child)), name)
        if head != name and layers[head].in_features == spec.in_features:
            tensors[f"{name}.signs_in"] = tensors[f"{head}.signs_in"].clone()
            layers[name] = dataclasses.replace(spec, in_seed=layers[head].seed)
    if not layers:
        raise ValueError(f"no linear of {src} was chosen for quantization by rates={rates!r}")
    fmt = GLQFormat(layers=layers, format_version=FORMAT_VERSION, codebook=f"glq.hf.testing:{tables}",
                    extra={"generator": "glq.hf.testing.random_glq_folder", "seed": seed})
    tensors.update(table_tensors(fmt.rates, tables))
    if guard:
        tensors.update(guard_tensors(layers))
    cfg = config.to_dict()
    cfg["quantization_config"] = fmt.to_dict()
    if tensors_hook is not None:
        tensors_hook(tensors)
    if config_hook is not None:
        config_hook(cfg)

    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in _SKIP_COPY:
            shutil.copy2(f, out / f.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return out


# Llama-family projections that read one input (glq.quant finds these groups by tracing a block).
_INPUT_GROUPS = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "gate_proj": "gate_up", "up_proj": "gate_up"}


def random_glq_model(config, rates: int | Mapping[str, int] | Callable[[str], int | None] = 2, *,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
                     tables: str = "auto", seed: int = 0, shared_input_signs: bool = True):
    """A causal LM of ``config``'s shape with random GLQ layers, built straight on ``device``.

    The skeleton is made on the meta device and only the GLQ tensors (codes, scales, signs), the
    unquantized parameters and one set of tables are ever allocated: an 8B-shaped model at
    2 bpw fits where its bf16 weights would not. Unquantized parameters get N(0, 0.02) (vectors:
    ones), so activations stay finite; the text it writes is noise.

    Args:
        config: a transformers config of a causal LM.
        rates: one bpw for every quantizable linear, a mapping name -> bpw, or a function.
        device / dtype: where and in which float dtype to build.
        tables: "auto", "lattice" or "random" (see :func:`stage_tables`).
        shared_input_signs: sibling layers of equal input width (q/k/v, gate/up) get the same
            input signs, as glq.quant writes them, so glq.hf transforms their input once.
    """
    from transformers import AutoModelForCausalLM

    from glq.hf.linear import GLQLinear
    from glq.hf.quantizer import GLQConfig, attach_tables
    from glq.hf.tables import TABLES_ATTR

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    specs: dict[str, LayerSpec] = {}
    for i, name in enumerate(quantizable_linears(model)):
        bpw = rates if isinstance(rates, int) else rates.get(name) if isinstance(rates, Mapping) else rates(name)
        if bpw is None:
            continue
        m = model.get_submodule(name)
        specs[name] = layer_spec(m.in_features, m.out_features, int(bpw), seed=seed * 100_003 + i,
                                 bias=m.bias is not None)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, GLQLinear(specs[name], bias_dtype=dtype, device="meta"))
    fmt = GLQFormat(layers=specs, codebook=f"glq.hf.testing:{tables}", extra={"generator": "random_glq_model"})
    model.add_module(TABLES_ATTR, GLQTables(fmt.rates, device="meta"))
    model.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.02, generator=g)
            else:
                p.fill_(1.0)
        for name in specs:
            layer = model.get_submodule(name)
            for c, bits in zip(layer.codes, layer.bits, strict=True):
                lo, hi = (-32768, 32768) if bits == 16 else (0, 256)
                c.copy_(torch.randint(lo, hi, c.shape, generator=g, device=device, dtype=torch.int32))
            layer.row_scale.uniform_(0.01, 0.03, generator=g)
            for signs in (layer.signs_in, layer.signs_out):
                signs.copy_(torch.randint(0, 2, signs.shape, generator=g, device=device, dtype=torch.int32) * 2 - 1)
            if layer.bias is not None:
                layer.bias.zero_()
        if shared_input_signs:
            first: dict[tuple[str, str], torch.Tensor] = {}
            for name in specs:
                layer = model.get_submodule(name)
                parent, _, child = name.rpartition(".")
                key = (parent, _INPUT_GROUPS.get(child, child))
                if key in first:
                    layer.signs_in.copy_(first[key])
                else:
                    first[key] = layer.signs_in
        holder = getattr(model, TABLES_ATTR)
        for key, value in table_tensors(fmt.rates, tables).items():
            getattr(holder, key.split(".", 1)[1]).copy_(value)
    # Non-persistent buffers computed at construction (rotary inv_freq) were left empty by
    # to_empty: rebuild those modules on the device.
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name, m in list(model.named_modules()):
        if type(m).__name__.endswith("RotaryEmbedding"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, type(m)(config=text_config).to(device))
    model.config.quantization_config = GLQConfig.from_format(fmt)
    attach_tables(model, fmt)
    return model.eval()
