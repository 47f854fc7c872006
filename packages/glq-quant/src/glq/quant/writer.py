"""Writing a GLQ folder: sharded safetensors, config with quantization_config, tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from glq.hf.config import GLQFormat, table_key

MAX_SHARD_BYTES = 2 * 1024**3


def table_tensors(codes: dict) -> dict[str, torch.Tensor]:
    """Every stage table of every rate used, under ``glq_tables.*`` keys."""
    out: dict[str, torch.Tensor] = {}
    for bpw, code in sorted(codes.items()):
        for s, t in enumerate(code.tables()):
            out[table_key(bpw, s, "scale")] = torch.tensor([float(t.scale)], dtype=torch.float32)
            if t.bits == 16:
                out[table_key(bpw, s, "abs")] = t.abs.to(torch.float32).contiguous()
                out[table_key(bpw, s, "parity")] = t.parity.to(torch.uint8).contiguous()
            else:
                out[table_key(bpw, s, "table")] = t.table.to(torch.float32).contiguous()
    return out


def codebook_id(rates) -> str:
    """Short content hash of the tables used, recorded so a mismatch is detectable."""
    from glq.lattice import codec

    h = hashlib.sha256()
    for bpw in rates:
        for t in codec(bpw).tables():
            for field in ("abs", "parity", "table"):
                value = getattr(t, field, None)
                if value is not None:
                    h.update(value.to(torch.float32).contiguous().numpy().tobytes())
            h.update(str(float(t.scale)).encode())
    return f"glq-lattice:{h.hexdigest()[:16]}"


def write_folder(out: Path, config, tokenizer, tensors: dict[str, torch.Tensor], fmt: GLQFormat) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(tensors):
        t = tensors[key]
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > MAX_SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    cfg = config.to_dict()
    cfg["quantization_config"] = fmt.to_dict()
    (out / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    tokenizer.save_pretrained(out)
