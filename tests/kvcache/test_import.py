"""``import glq.kvcache`` is cheap: no torch, no transformers, no CUDA until a name is used."""

from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
import glq.kvcache
assert "torch" not in sys.modules and "transformers" not in sys.modules, "eager import"
from glq.kvcache import GLQQuantizedCache
import torch
assert not torch.cuda.is_initialized(), "CUDA initialised at import"
print("ok")
"""


def test_import_is_lazy_and_cuda_free():
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


def test_unknown_name():
    import glq.kvcache

    try:
        glq.kvcache.NoSuchThing  # noqa: B018
    except AttributeError as err:
        assert "NoSuchThing" in str(err)
    else:
        raise AssertionError("expected AttributeError")
