"""Where the decoder blocks and their linear layers are, for any Llama-like model.

One small description per architecture family instead of a code path each: the
blocks are the model's ``nn.ModuleList`` of ``num_hidden_layers`` modules, and the
linears inside a block are grouped by the input they read (q/k/v share one, gate/up
another), found by watching one forward pass rather than by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

# Explicit block paths for families we test; anything else is found by search.
KNOWN_BLOCK_PATHS = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "qwen3": "model.layers",
    "smollm3": "model.layers",
}


@dataclass(frozen=True)
class BlockLayout:
    path: str  # dotted path of the ModuleList, e.g. "model.layers"
    count: int


def find_blocks(model: nn.Module) -> BlockLayout:
    n = getattr(model.config, "num_hidden_layers", None)
    path = KNOWN_BLOCK_PATHS.get(getattr(model.config, "model_type", ""))
    if path is not None:
        return BlockLayout(path, len(model.get_submodule(path)))
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return BlockLayout(name, n)
    raise ValueError(
        f"cannot find the decoder blocks of {type(model).__name__}: no nn.ModuleList of "
        f"num_hidden_layers={n} modules (add its model_type to glq.quant.arch.KNOWN_BLOCK_PATHS)"
    )


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Every nn.Linear inside a block, by its name relative to the block."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def group_by_input(block: nn.Module, run_block) -> list[list[str]]:
    """Group the block's linears by the tensor they read, with one forward pass.

    ``run_block()`` runs the block once on real input. Linears that receive the very
    same tensor (q/k/v, gate/up) share one Hessian.
    """
    linears = block_linears(block)
    seen: dict[int, list[str]] = {}
    order: list[int] = []
    keep: list[torch.Tensor] = []  # hold the inputs so their ids stay unique during the pass

    def hook(name):
        def fn(_module, args):
            x = args[0]
            key = id(x)
            if key not in seen:
                seen[key] = []
                order.append(key)
                keep.append(x)
            seen[key].append(name)
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in linears.items()]
    try:
        run_block()
    finally:
        for h in handles:
            h.remove()
    groups = [seen[k] for k in order]
    missing = set(linears) - {n for g in groups for n in g}
    if missing:
        raise ValueError(f"linears never called in a forward pass: {sorted(missing)}")
    return groups
