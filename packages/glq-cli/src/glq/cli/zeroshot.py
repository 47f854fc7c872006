"""Zero-shot multiple-choice scoring, computed the way lm-evaluation-harness does.

For each (context, continuation) request the score is the summed log-probability of the
continuation's tokens given the context (lm-eval's ``loglikelihood``):

- tokenization (lm-eval's ``HFLM._encode_pair``): trailing spaces of the context move to
  the front of the continuation; ``context + continuation`` is encoded whole and the
  continuation's tokens are what follows the context's own encoding; no special tokens.
  An empty context is replaced by the BOS token (EOS if the tokenizer has none).
- the model sees ``(context + continuation)[:-1]``, left-truncated to its maximum length.

Metrics per item: ``acc`` = [argmax of the log-likelihoods is the gold choice];
``acc_norm`` = the same with each log-likelihood divided by the character length of its
choice string (lm-eval's ``completion_len = len(choice)``). Ties go to the first choice
(``numpy.argmax``). Standard errors are lm-eval's: sqrt(p (1 - p) / (n - 1)).

``loglikelihoods`` batches requests (longest first, left-padded, one forward per
batch); ``loglikelihood_reference`` is the plain one-request-at-a-time oracle.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch

from glq.cli.tasks import Item

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


def encode_pair(tokenizer, context: str, continuation: str) -> Pair:
    """Token ids of one request, split the way lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], whole
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx) :]


def _max_length(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", None) or 2048)


def _window(pair: Pair, max_length: int) -> tuple[list[int], int]:
    """Model input ``(ctx + cont)[:-1]`` cut to ``max_length`` from the left, and where the
    continuation's predictions start in it."""
    ctx, cont = pair
    if not cont:
        raise ValueError("a continuation must have at least one token")
    full = (ctx + cont)[-(max_length + 1) :]
    return full[:-1], len(full) - 1 - len(cont)


@torch.no_grad()
def loglikelihood_reference(model, pair: Pair) -> float:
    """Summed log-probability of ``pair``'s continuation, one unpadded forward (the oracle)."""
    ids, start = _window(pair, _max_length(model))
    device = next(model.parameters()).device
    logits = model(torch.tensor([ids], device=device), use_cache=False).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)
    cont = pair[1]
    return float(sum(logprobs[start + j, tok] for j, tok in enumerate(cont)))


@torch.no_grad()
def loglikelihoods(model, pairs: Sequence[Pair], batch_size: int = 32, progress: bool = False,
                   desc: str = "loglikelihood") -> list[float]:
    """Summed continuation log-probabilities of every pair, in input order.

    Requests are sorted longest first (as lm-eval does, so padding stays small) and
    left-padded, with an attention mask and shifted position ids, so that every row's
    continuation ends at the last position: the model then computes vocabulary logits for
    the last few positions only (``logits_to_keep``). With a 49k vocabulary and short
    answers that skips about a fifth of SmolLM2-135M's work and most of its memory traffic.
    Each row equals its unpadded forward up to float summation order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")
    max_length = _max_length(model)
    windows = [_window(p, max_length) for p in pairs]
    order = sorted(range(len(pairs)), key=lambda i: -len(windows[i][0]))
    device = next(model.parameters()).device
    keeps_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    out = [0.0] * len(pairs)
    batches = range(0, len(order), batch_size)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=desc, unit="batch")
    for b in batches:
        rows = order[b : b + batch_size]
        width = len(windows[rows[0]][0])
        keep = max(len(pairs[i][1]) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)  # (B, L) left-padded with token 0
        mask = torch.zeros(len(rows), width, dtype=torch.long)  # (B, L) 1 on real tokens
        for r, i in enumerate(rows):
            seq = windows[i][0]
            ids[r, width - len(seq) :] = torch.tensor(seq)
            mask[r, width - len(seq) :] = 1
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # (B, L) each row starts at position 0
        kwargs = {"logits_to_keep": keep} if keeps_logits else {}
        logits = model(ids.to(device), attention_mask=mask.to(device), position_ids=positions.to(device),
                       use_cache=False, **kwargs).logits[:, -keep:]  # (B, keep, V)
        for r, i in enumerate(rows):
            cont = pairs[i][1]
            # log_softmax only over the continuation's positions: the vocabulary is large.
            logprobs = torch.log_softmax(logits[r, keep - len(cont) :].float(), dim=-1)
            target = torch.tensor(cont, device=logprobs.device)
            out[i] = float(logprobs.gather(1, target[:, None]).sum())
    return out


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda j: (values[j], -j))


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")


def accuracy(items: Sequence[Item], lls: Sequence[Sequence[float]], with_norm: bool = True) -> dict[str, float]:
    """``acc`` (and ``acc_norm``) with standard errors from per-item choice log-likelihoods."""
    if len(items) != len(lls) or not items:
        raise ValueError(f"{len(items)} items but {len(lls)} score lists (need at least one item)")
    n = len(items)
    acc = sum(_argmax(ll) == it.gold for it, ll in zip(items, lls, strict=True)) / n
    result = {"acc": acc, "acc_stderr": _stderr(acc, n)}
    if with_norm:
        normed = [[v / len(c) for v, c in zip(ll, it.choices, strict=True)] for it, ll in zip(items, lls, strict=True)]
        acc_norm = sum(_argmax(ll) == it.gold for it, ll in zip(items, normed, strict=True)) / n
        result |= {"acc_norm": acc_norm, "acc_norm_stderr": _stderr(acc_norm, n)}
    result["n"] = n
    return result


def score_items(model, tokenizer, items: Sequence[Item], batch_size: int = 32, progress: bool = False,
                desc: str = "loglikelihood") -> list[list[float]]:
    """Per-item lists of choice log-likelihoods: every request of every item in one batched pass."""
    pairs = [encode_pair(tokenizer, ctx, cont) for it in items for ctx, cont in it.requests]
    flat = loglikelihoods(model, pairs, batch_size=batch_size, progress=progress, desc=desc)
    out, k = [], 0
    for it in items:
        out.append(flat[k : k + len(it.requests)])
        k += len(it.requests)
    return out


def evaluate_task(model, tokenizer, items: Sequence[Item], with_norm: bool = True, batch_size: int = 32,
                  progress: bool = False, desc: str = "loglikelihood") -> dict[str, float]:
    """acc (and acc_norm) of ``model`` on ``items``."""
    return accuracy(items, score_items(model, tokenizer, items, batch_size, progress, desc), with_norm)
