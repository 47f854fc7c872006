"""Transformers integration: ``quant_method: "glq"`` through its quantizer plugin API.

``register()`` (run by ``import glq.hf``) adds :class:`GLQConfig` and :class:`GLQHfQuantizer`
to transformers' registries. ``from_pretrained`` then

1. parses ``quantization_config`` into a :class:`GLQConfig` (unknown format versions fail here),
2. builds the model on the meta device; :meth:`GLQHfQuantizer._process_model_before_weight_loading`
   checks the folder's safetensors headers against the config, replaces each configured
   ``nn.Linear`` by a meta :class:`~glq.hf.linear.GLQLinear` and adds one ``glq_tables`` module,
3. loads every tensor at its stored dtype (the meta buffers carry those dtypes, and transformers
   keeps a buffer's dtype when it differs from the model's),
4. :meth:`GLQHfQuantizer._process_model_after_weight_loading` checks the small loaded tensors and
   attaches each rate's shared packed tables to its layers.
"""

from __future__ import annotations

from typing import Any

# Submodules, not the package: registration may run while transformers.quantizers' own
# __init__ is finishing (see glq.hf._register).
from transformers.quantizers.auto import register_quantization_config, register_quantizer
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from glq.hf import checks, guard
from glq.hf.config import FORMAT_VERSION, GLQFormat
from glq.hf.linear import GLQLinear, link_shared_inputs, set_code_layout, unfuse_siblings
from glq.hf.tables import TABLES_ATTR, GLQTables

QUANT_METHOD = "glq"


class GLQConfig(QuantizationConfigMixin):
    """transformers' view of a folder's ``quantization_config``: a wrapper of
    :class:`glq.hf.config.GLQFormat`, which stays the source of truth (``self.format``)."""

    def __init__(self, layers: dict | None = None, format_version: int = FORMAT_VERSION, codebook: str = "",
                 bpw_target: float | None = None, extra: dict | None = None, **kwargs: Any):
        kwargs.pop("quant_method", None)
        self.quant_method = QUANT_METHOD
        self.format = GLQFormat.from_dict({
            "quant_method": QUANT_METHOD, "format_version": format_version, "codebook": codebook,
            "bpw_target": bpw_target, "layers": layers or {}, "extra": extra or {},
        })
        # Loading attributes transformers may set (e.g. `dequantize`) are kept but not serialized.
        for k, v in kwargs.items():
            setattr(self, k, v)

    @classmethod
    def from_format(cls, fmt: GLQFormat) -> GLQConfig:
        return cls.from_dict(fmt.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return self.format.to_dict()

    def to_diff_dict(self) -> dict[str, Any]:
        return self.to_dict()


class GLQHfQuantizer(HfQuantizer):
    """Loads pre-quantized GLQ folders (GLQ quantizes offline with ``glq.quant``, not on load)."""

    requires_calibration = True
    quantization_config: GLQConfig

    def validate_environment(self, *args, **kwargs) -> None:
        if not self.pre_quantized:
            raise ValueError(
                "GLQ quantizes offline: run glq.quant.quantize(model, output_dir, bpw=...) (package glq-quant) "
                "and load the folder it writes; from_pretrained(..., quantization_config=GLQConfig) "
                "cannot quantize an unquantized model")
        device_map = kwargs.get("device_map")
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("GLQ models do not support disk offload (device_map has 'disk'); "
                             "their codes are already 2-8 bits per weight")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        fmt = self.quantization_config.format
        where = repr(getattr(model.config, "name_or_path", "") or type(model).__name__)
        linears = checks.check_model(model, fmt, where)
        if checkpoint_files:
            checks.check_checkpoint(checkpoint_files, fmt, where)
        for name, spec in fmt.layers.items():
            old = linears[name]
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            bias_dtype = old.bias.dtype if old.bias is not None else old.weight.dtype
            setattr(parent, child, GLQLinear(spec, bias_dtype=bias_dtype, device="meta"))
        model.add_module(TABLES_ATTR, GLQTables(fmt.rates, device="meta"))
        ignore = set(model._keys_to_ignore_on_load_unexpected or ())
        model._keys_to_ignore_on_load_unexpected = ignore | guard.ignore_patterns(fmt.layers)
        return model

    def _process_model_after_weight_loading(self, model, **kwargs):
        fmt = self.quantization_config.format
        where = repr(getattr(model.config, "name_or_path", "") or type(model).__name__)
        attach_tables(model, fmt, where)
        return model

    def get_state_dict_and_metadata(self, model):
        """The model's state dict plus the guard tensors (see :mod:`glq.hf.guard`), so a re-saved
        folder still refuses to load without ``import glq.hf``."""
        state_dict = model.state_dict()
        state_dict.update(guard.guard_tensors(self.quantization_config.format.layers))
        return state_dict, {}

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        # The kernels are torch.library ops with fake implementations.
        return True


def attach_tables(model, fmt: GLQFormat, where: str = "model") -> None:
    """Check the loaded tables and small tensors, then give every GLQLinear its rate's shared
    packed tables, hold the codes tiled where the CUDA C kernels run (:func:`glq.hf.linear.set_code_layout`),
    then link and fuse (unless ``GLQ_HF_FUSE=0``) sibling layers (:func:`glq.hf.linear.link_shared_inputs`).
    Raises :class:`glq.hf.checks.GLQLoadError` listing the problems."""
    tables: GLQTables = getattr(model, TABLES_ATTR)
    unfuse_siblings(model)  # attach() needs each layer's own tensors; link_shared_inputs fuses again
    problems = tables.check()
    layers = {name: mod for name, mod in model.named_modules() if isinstance(mod, GLQLinear)}
    for name in fmt.layers:
        layer = layers.get(name)
        if layer is None:
            problems.append(f"layer {name!r} was not replaced by a GLQLinear")
            continue
        if any(b.device.type == "meta" for b in layer.buffers()):
            problems.append(f"layer {name!r}: some of its tensors were never loaded")
            continue
        problems += checks.loaded_layer_problems(name, layer)
    if problems:
        raise checks.GLQLoadError(where, problems)
    tables._packed.clear()
    for name in fmt.layers:
        layers[name].attach(tables.packed(fmt.layers[name].bpw))
    set_code_layout(model)
    link_shared_inputs(model)


_registered = False


def register() -> None:
    """Register ``quant_method: "glq"`` with transformers (idempotent).

    Raises:
        RuntimeError: another package registered "glq" with different classes.
    """
    global _registered
    if _registered:
        return
    from transformers.quantizers import auto

    have_cfg = auto.AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD)
    have_q = auto.AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD)
    for have, ours in ((have_cfg, GLQConfig), (have_q, GLQHfQuantizer)):
        # A re-imported glq.hf (e.g. importlib reload) carries new class objects of the same name.
        if have is not None and have.__qualname__ != ours.__qualname__:
            raise RuntimeError(f"transformers already maps quant_method 'glq' to {have.__module__}.{have.__qualname__}")
    if have_cfg is None:
        register_quantization_config(QUANT_METHOD)(GLQConfig)
    else:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD] = GLQConfig
    if have_q is None:
        register_quantizer(QUANT_METHOD)(GLQHfQuantizer)
    else:
        auto.AUTO_QUANTIZER_MAPPING[QUANT_METHOD] = GLQHfQuantizer
    _registered = True


# Importing this module means transformers is loaded: register now. This also covers the case where
# this import is what first loaded transformers.quantizers (the import hook defers to this line).
register()
