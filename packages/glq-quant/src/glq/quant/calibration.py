"""Calibration batches: ``nsamples`` windows of ``seqlen`` tokens from a text source."""

from __future__ import annotations

import torch


def calibration_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """(nsamples, seqlen) token ids: random windows of the tokenized calibration text.

    Windows start at seeded random offsets (GPTQ's sampling), so two runs with the
    same seed see the same tokens. Too little text is an error that says how much
    there is, not a silent repeat.
    """
    from glq.quant.data import calibration_text

    if nsamples < 1 or seqlen < 2:
        raise ValueError(f"need nsamples >= 1 and seqlen >= 2, got nsamples={nsamples}, seqlen={seqlen}")
    ids = tokenizer(calibration_text(source), return_tensors="pt").input_ids[0]
    needed = nsamples * seqlen
    if ids.numel() < needed:
        raise ValueError(
            f"calibration text {str(source)!r} has {ids.numel():,} tokens, fewer than "
            f"nsamples x seqlen = {nsamples} x {seqlen} = {needed:,}"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seqlen + 1, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])
