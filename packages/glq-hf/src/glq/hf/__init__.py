"""GLQ inference runtime for Hugging Face Transformers.

``import glq.hf`` registers ``quant_method: "glq"`` with transformers, after which the usual calls
work on a GLQ folder::

    import glq.hf  # noqa: F401  (registers "glq")
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda", dtype=torch.bfloat16)
    model.generate(...); model.save_pretrained(...); model.push_to_hub(...)

The import itself stays cheap: it imports neither transformers nor triton, glq.quant or datasets
and does not initialise CUDA. If transformers' quantizers are already imported it registers at
once, otherwise when transformers imports them (a one-shot import hook, ``glq.hf._register``).
The GLQ linear module, the CUDA-graph decode wrapper and the folder checks are importable from here.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from glq.hf import _register

if TYPE_CHECKING:
    from glq.hf.checks import GLQLoadError
    from glq.hf.cuda_graph import CUDAGraphWrapper
    from glq.hf.linear import GLQLinear
    from glq.hf.quantizer import GLQConfig, GLQHfQuantizer, register
    from glq.hf.tables import GLQTables

__version__ = "0.1.0"

_register.install()

_LAZY = {
    "GLQConfig": "glq.hf.quantizer",
    "GLQHfQuantizer": "glq.hf.quantizer",
    "register": "glq.hf.quantizer",
    "GLQLinear": "glq.hf.linear",
    "GLQTables": "glq.hf.tables",
    "GLQLoadError": "glq.hf.checks",
    "CUDAGraphWrapper": "glq.hf.cuda_graph",
}

__all__ = ["CUDAGraphWrapper", "GLQConfig", "GLQHfQuantizer", "GLQLinear", "GLQLoadError", "GLQTables", "register"]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'glq.hf' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
