"""WikiText-2 perplexity with the standard protocol.

The test string is ``"\\n\\n".join(rows)`` of the raw test split, tokenized once;
it is cut into non-overlapping windows of ``seqlen`` tokens (the tail shorter than a
window is dropped, as GPTQ, QuIP# and AQLM do) and perplexity is
exp(mean next-token negative log-likelihood) over every predicted token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Perplexity:
    ppl: float
    windows: int
    seqlen: int
    tokens: int  # tokens in the whole test string, before windowing


def wikitext2_ids(tokenizer) -> torch.Tensor:
    """(1, T) token ids of the standard WikiText-2 raw test string."""
    from glq.quant.data import wikitext2_test_text

    return tokenizer(wikitext2_test_text(), return_tensors="pt").input_ids


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, seqlen: int = 2048, limit: int | None = None,
               progress: bool = False) -> Perplexity:
    """Perplexity of ``model`` on ``ids`` (1, T) over non-overlapping ``seqlen`` windows.

    ``limit`` evaluates only the first ``limit`` windows (quick runs).
    """
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise ValueError(f"ids must have shape (1, T), got {tuple(ids.shape)}")
    total = ids.shape[1] // seqlen
    if total == 0:
        raise ValueError(f"{ids.shape[1]} tokens are fewer than one window of seqlen={seqlen}")
    n = total if limit is None else min(limit, total)
    device = next(model.parameters()).device
    nll = 0.0
    iterator = range(n)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, desc="perplexity", unit="window")
    for i in iterator:
        window = ids[:, i * seqlen : (i + 1) * seqlen].to(device)
        logits = model(window, use_cache=False).logits.float()
        # Sum (not mean) in float64 so the result does not depend on window count rounding.
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], window[0, 1:], reduction="sum")
        nll += float(loss.double())
    return Perplexity(ppl=math.exp(nll / (n * (seqlen - 1))), windows=n, seqlen=seqlen, tokens=ids.shape[1])
