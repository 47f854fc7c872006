"""Reading a model tensor by tensor from its safetensors shards (for streaming mode).

With ``streaming=True`` the model is built on the meta device; only the tensors outside
the decoder blocks (embeddings, final norm, head) are loaded up front, and each block's
tensors are read from the shards when that block's turn comes and dropped after, so host
memory holds one block plus the embeddings whatever the model size.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def local_folder(path: str) -> Path:
    """The local folder of a model: the path itself, or the hub cache snapshot of an id."""
    if Path(path).is_dir():
        return Path(path)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))


class Checkpoint:
    """Tensor name -> shard file, for a folder of ``*.safetensors`` (indexed or single)."""

    def __init__(self, folder: Path):
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {k: folder / v for k, v in weight_map.items()}
        else:
            single = folder / "model.safetensors"
            if not single.is_file():
                raise ValueError(f"{folder} has no model.safetensors(.index.json): streaming needs safetensors")
            from safetensors import safe_open

            with safe_open(str(single), "pt") as f:
                self.files = dict.fromkeys(f.keys(), single)

    def load(self, keys: list[str], dtype: torch.dtype | None, device) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.files[k], []).append(k)
        out = {}
        for file, names in by_file.items():
            with safe_open(str(file), "pt", device="cpu") as f:
                for k in names:
                    t = f.get_tensor(k)
                    out[k] = (t.to(dtype) if dtype is not None and t.is_floating_point() else t).to(device)
        return out


def assign(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put ``tensor`` in place of the parameter or buffer named ``key`` (meta or not)."""
    mod_path, _, attr = key.rpartition(".")
    mod = model.get_submodule(mod_path) if mod_path else model
    if attr in mod._parameters:
        mod._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    elif attr in mod._buffers:
        mod._buffers[attr] = tensor
    else:
        raise KeyError(f"checkpoint tensor {key!r} has no place in the model")


def load_skeleton(path: str, prefix: str, dtype: torch.dtype, device, trust_remote_code: bool):
    """A model on the meta device with everything outside ``prefix`` (the blocks) loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = local_folder(path)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        lm = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    ckpt = Checkpoint(folder)
    outside = [k for k in ckpt.files if not k.startswith(prefix + ".")]
    for key, t in ckpt.load(outside, dtype, device).items():
        assign(lm, key, t)
    if getattr(config, "tie_word_embeddings", False) and lm.get_output_embeddings() is not None:
        lm.get_output_embeddings().weight = lm.get_input_embeddings().weight
    # Non-persistent buffers (rotary frequencies) are computed at construction, never
    # saved: rebuild the modules that own them, on the real device.
    for name, mod in list(lm.named_modules()):
        if name.startswith(prefix):
            continue
        if any(b is not None and b.is_meta for b in mod._buffers.values()):
            parent, _, attr = name.rpartition(".")
            rebuilt = type(mod)(config=config, device=device) if "device" in type(mod).__init__.__code__.co_varnames \
                else type(mod)(config=config)
            setattr(lm.get_submodule(parent) if parent else lm, attr, rebuilt.to(device))
    left = [n for n, p in lm.named_parameters() if p.is_meta and not n.startswith(prefix + ".")]
    if left:
        raise ValueError(f"checkpoint {folder} lacks tensors outside the blocks, e.g. {left[0]}")
    return lm.eval(), ckpt


def materialize_block(block: nn.Module, prefix: str, ckpt: Checkpoint, dtype: torch.dtype, device) -> nn.Module:
    """Load block ``prefix``'s tensors from the shards into a meta ``block`` on ``device``."""
    keys = [k for k in ckpt.files if k.startswith(prefix + ".")]
    for key, t in ckpt.load(keys, dtype, device).items():
        assign(block, key[len(prefix) + 1 :], t)
    meta = [n for n, p in block.named_parameters() if p.is_meta]
    if meta:
        raise ValueError(f"checkpoint lacks {prefix}.{meta[0]}")
    return block
