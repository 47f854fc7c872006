"""Perplexity read through a cache: the window is fed in chunks, so attention reads cached states.

Protocol (``chunked_perplexity``): a (1, S) window is split into a prefill of ``prefill`` tokens
followed by chunks of ``chunk`` tokens; each chunk is one forward pass that appends to the cache
and attends to everything before it through it. Logits of all passes are concatenated and the
perplexity is exp(mean NLL) over the S - 1 next-token predictions, summed in float64, as
``glq.quant.evaluate.perplexity`` does for a single pass. With a plain ``DynamicCache`` this
matches the single-pass perplexity up to float rounding; with ``GLQQuantizedCache`` every chunk
reads the tokens that have aged out of the residual window as dequantized INT8.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable

import torch


def cache_kwarg_name(model) -> str:
    """``"cache"`` on transformers versions whose forward takes it, else ``"past_key_values"``."""
    params = inspect.signature(type(model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def chunked_nll(model, ids: torch.Tensor, cache, prefill: int, chunk: int) -> tuple[float, int]:
    """Summed next-token NLL of ``ids`` (1, S) fed as ``prefill`` then ``chunk``-token passes.

    Returns ``(nll_sum, predictions)`` with ``predictions = S - 1``.
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must have shape (1, S), got {tuple(ids.shape)}")
    seq = ids.shape[1]
    if not 1 <= prefill <= seq or chunk < 1:
        raise ValueError(f"need 1 <= prefill <= S and chunk >= 1, got prefill={prefill}, chunk={chunk}, S={seq}")
    kwarg = cache_kwarg_name(model)
    device = next(model.parameters()).device
    ids = ids.to(device)
    nll = 0.0
    bounds = [0, prefill, *range(prefill + chunk, seq, chunk), seq]
    for start, stop in itertools.pairwise(bounds):
        if stop <= start:
            continue
        piece = ids[:, start:stop]
        logits = model(piece, use_cache=True, **{kwarg: cache}).logits.float()  # (1, stop - start, V)
        targets = ids[0, start + 1 : stop + 1]  # the last position of the window predicts nothing
        logits = logits[0, : targets.shape[0]]
        nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum").double())
    return nll, seq - 1


def chunked_perplexity(model, ids: torch.Tensor, make_cache: Callable[[], object], prefill: int = 128,
                       chunk: int = 16) -> float:
    """exp(mean NLL) of ``ids`` (1, S) under the chunked protocol with a fresh ``make_cache()``."""
    nll, n = chunked_nll(model, ids, make_cache(), prefill, chunk)
    return math.exp(nll / n)
