"""Cache bytes per token of the INT8 cache vs a bf16 DynamicCache, counted from real tensors.

    python packages/glq-kvcache/benchmarks/bytes_per_token.py

One layer is filled with random bf16 states (the stored layout depends only on the length, not on
the values or on how the tokens arrived) and its tensors' bytes are summed: int8 codes, fp32
scales and zero points, bf16 residual window. Ratios hold for any number of layers and batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

try:
    from glq.kvcache.cache import GLQQuantizedLayer, KVCacheConfig
except ImportError:  # run from a checkout without installing the workspace
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from glq.kvcache.cache import GLQQuantizedLayer, KVCacheConfig

SHAPES = {"Llama-3-8B (8 KV heads, head_dim 128)": (8, 128), "SmolLM2-135M (3 KV heads, head_dim 64)": (3, 64)}


def main() -> None:
    cfg = KVCacheConfig()
    print(f"# residual_length={cfg.residual_length}, group_size={cfg.group_size}, keys {cfg.key_scheme} per channel, "
          f"values {cfg.value_scheme} per token, fp32 scales")
    print("| shape | tokens | bf16 bytes/token/layer | INT8 cache bytes/token/layer | ratio | of which scales | "
          "of which bf16 window |")
    print("|---|---|---|---|---|---|---|")
    for name, (heads, dim) in SHAPES.items():
        for tokens in (2048, 4096, 16384, 32768):
            layer = GLQQuantizedLayer(cfg)
            states = torch.randn(1, heads, tokens, dim, dtype=torch.bfloat16)
            layer.update(states, states)
            got = layer.nbytes()
            dense = layer.dense_nbytes(torch.bfloat16)
            print(f"| {name} | {tokens} | {dense / tokens:.0f} | {got['total'] / tokens:.1f} | "
                  f"{got['total'] / dense:.4f} | {got['scales'] / dense:.4f} | {got['residual'] / dense:.4f} |")


if __name__ == "__main__":
    main()
