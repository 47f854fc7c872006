"""Make a GLQ folder fail to load, with a hint, when ``glq.hf`` was not imported.

Without ``import glq.hf`` transformers only logs "Unknown quantization type, got glq ... we will
skip the quantization" and loads the model unquantized: every quantized linear's ``weight`` is
missing, so it is randomly initialised and the model writes garbage. transformers runs no code of
ours on that path, but it does raise after its load report when a checkpoint tensor's shape
contradicts the model's (``ignore_mismatched_sizes=False``, the default). So a folder carries two
empty tensors:

* ``{first quantized layer}.weight``, shape (0,) int8: unquantized loading reports it as a
  size MISMATCH and raises ``RuntimeError`` instead of returning a broken model;
* :data:`HINT_KEY`, shape (0,) int8: listed as UNEXPECTED in the same report, its name tells the
  user what to do.

Both are 0 bytes of data. With ``glq.hf`` imported, the quantizer ignores them on load and
``save_pretrained`` writes them again. Folders without them load the same way.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch

from glq.hf.config import TABLES_PREFIX

HINT_KEY = f"{TABLES_PREFIX}.HINT: this is a GLQ model: run `import glq.hf` before from_pretrained"


def guard_tensors(layer_names: Iterable[str]) -> dict[str, torch.Tensor]:
    """The guard tensors of a folder whose quantized linears are ``layer_names``."""
    names = sorted(layer_names)
    if not names:
        return {}
    return {f"{names[0]}.weight": torch.empty(0, dtype=torch.int8), HINT_KEY: torch.empty(0, dtype=torch.int8)}


def ignore_patterns(layer_names: Iterable[str]) -> set[str]:
    """Regexes for transformers' ``_keys_to_ignore_on_load_unexpected`` that hide the guards."""
    names = sorted(layer_names)
    if not names:
        return set()
    return {rf"^{re.escape(names[0])}\.weight$", rf"^{re.escape(HINT_KEY)}$"}
