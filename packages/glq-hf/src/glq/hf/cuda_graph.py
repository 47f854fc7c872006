"""``CUDAGraphWrapper``: replay one captured CUDA graph per batch-1 single-token decode step.

At batch 1 a decoder layer is a dozen small kernels; launching them costs about as much as running
them, so eager decoding is launch-bound. A CUDA graph replays the whole step with one launch.

The graph is captured for one static KV cache object (transformers' ``StaticCache``: fixed
addresses, in-place updates) and static input buffers that each call refills. Everything else
(prefill, batch > 1, a dynamic cache, extra arguments, CPU) runs the model eagerly, so the
wrapper can be used for the whole generation loop::

    cache = StaticCache(config=model.config, max_cache_len=1024)
    step = CUDAGraphWrapper(model)
    out = step(input_ids=prompt, cache=cache, position_ids=torch.arange(n, device=dev)[None])  # eager
    ...
    out = step(input_ids=next_tok, cache=cache, position_ids=pos[None])  # graph replay

:func:`decode` is such a loop (greedy or sampling).
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

log = logging.getLogger("glq.hf")

# Keyword arguments a captured step accepts (with these values); anything else runs eagerly.
_ALLOWED = {"use_cache": (True, None), "return_dict": (True, None), "attention_mask": (None,)}
# transformers renamed `past_key_values` to `cache` (5.2x) and dropped `cache_position` from most
# models' forward; the wrapper takes either spelling and passes what the model's forward names.
_CACHE_NAMES = ("cache", "past_key_values")


def forward_params(model: nn.Module) -> tuple[str, bool]:
    """(name of the model's cache argument, whether its forward takes ``cache_position``)."""
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    return name, "cache_position" in params


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    cache: Any
    input_ids: torch.Tensor  # (1, 1) int64
    position_ids: torch.Tensor  # (1, 1) int64
    cache_position: torch.Tensor  # (1,) int64
    output: Any  # the model output of the captured step (static tensors)


class CUDAGraphWrapper:
    """Call it like the model; batch-1 single-token steps on a static cache replay a CUDA graph.

    Args:
        model: a causal LM on a CUDA device (any model works; GLQ models are the point).
        warmup: eager runs on a side stream before capture (lets kernels pick their configs and
            allocate workspaces outside the graph).

    The cache may be passed as ``cache=`` or ``past_key_values=`` (the model gets the name its
    forward takes). The first eligible call captures (a few eager-step costs); a new cache object
    re-captures and drops the old graph. ``captures`` and ``replays`` count what happened, and
    ``last_fallback`` says why the last eager call was not replayed.
    """

    def __init__(self, model: nn.Module, *, warmup: int = 2):
        self.model = model
        self.warmup = warmup
        self._captured: _Captured | None = None
        self._cache_name, self._takes_cache_position = forward_params(model)
        self.captures = 0
        self.replays = 0
        self.last_fallback: str | None = None

    def __getattr__(self, name: str) -> Any:
        # config, device, generation_config, ... come from the model
        if name == "model":
            raise AttributeError(name)
        return getattr(self.model, name)

    def reset(self) -> None:
        """Drop the captured graph (and its hold on the cache)."""
        self._captured = None

    def _eligible(self, input_ids, cache, cache_position, position_ids, kwargs) -> str | None:
        """None if the call can replay the graph, else why not."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.device.type != "cuda":
            return "input_ids is not a CUDA tensor"
        if input_ids.shape != (1, 1):
            return f"input_ids shape {tuple(input_ids.shape)} is not (1, 1)"
        if cache is None or not getattr(cache, "is_compileable", False):
            return "the cache is not a static cache"
        if cache_position is not None and (cache_position.shape != (1,) or cache_position.device != input_ids.device):
            return "cache_position is not a (1,) tensor on the input's device"
        if position_ids is not None and (position_ids.shape != (1, 1) or position_ids.device != input_ids.device):
            return "position_ids is not a (1, 1) tensor on the input's device"
        for k, v in kwargs.items():
            if k not in _ALLOWED or not any(v is a or v == a for a in _ALLOWED[k]):
                return f"argument {k}={v!r}"
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.model.parameters()):
            return "autograd is enabled"
        return None

    def __call__(self, input_ids: torch.Tensor | None = None, **kwargs: Any):
        given = [n for n in _CACHE_NAMES if n in kwargs]
        cache = kwargs.get(given[0]) if given else None
        rest = {k: v for k, v in kwargs.items() if k not in (*_CACHE_NAMES, "cache_position", "position_ids")}
        cache_position, position_ids = kwargs.get("cache_position"), kwargs.get("position_ids")
        why = "both cache= and past_key_values= given" if len(given) > 1 else None
        why = why or self._eligible(input_ids, cache, cache_position, position_ids, rest)
        if why is not None:
            self.last_fallback = why
            return self.model(input_ids=input_ids, **self._model_kwargs(kwargs))
        dev = input_ids.device
        if cache_position is None:
            seen = cache.get_seq_length()  # a device tensor on static caches of transformers >= 5.2x
            cache_position = torch.as_tensor(seen, device=dev).reshape(1)
        if position_ids is None:
            position_ids = cache_position.reshape(1, 1)
        cap = self._captured
        if cap is None or cap.cache is not cache:
            cap = self._capture(input_ids, cache, cache_position, position_ids)
        else:
            cap.input_ids.copy_(input_ids)
            cap.position_ids.copy_(position_ids)
            cap.cache_position.copy_(cache_position)
        cap.graph.replay()
        self.replays += 1
        out = cap.output
        # A clone, so a caller keeping logits across steps does not see the next replay's values.
        return type(out)(**{**out, "logits": out["logits"].clone()})

    def _model_kwargs(self, kwargs: dict) -> dict:
        """kwargs with the cache under the name the model's forward takes."""
        kwargs = dict(kwargs)
        for n in _CACHE_NAMES:
            if n in kwargs and n != self._cache_name:
                kwargs[self._cache_name] = kwargs.pop(n)
        if not self._takes_cache_position:
            kwargs.pop("cache_position", None)
        return kwargs

    @torch.no_grad()
    def _capture(self, input_ids, cache, cache_position, position_ids) -> _Captured:
        self._captured = None
        static_ids = input_ids.clone()
        static_pos_ids = position_ids.to(torch.int64).clone()
        static_pos = cache_position.to(torch.int64).clone()
        kw = {self._cache_name: cache, "position_ids": static_pos_ids, "use_cache": True}
        if self._takes_cache_position:
            kw["cache_position"] = static_pos

        def step():
            return self.model(input_ids=static_ids, **kw)

        # Warm-up steps write this token's keys/values at the current position, which the replay
        # below writes again identically; caches that count tokens on the device (transformers
        # >= 5.2x StaticLayer.cumulative_length) are rewound after each so the count stays right.
        def counters():
            return [t for t in (getattr(layer, "cumulative_length", None) for layer in getattr(cache, "layers", ()))
                    if isinstance(t, torch.Tensor)]

        before = counters()
        saved = [t.clone() for t in before]
        side = torch.cuda.Stream(device=input_ids.device)
        side.wait_stream(torch.cuda.current_stream(input_ids.device))
        with torch.cuda.stream(side):
            for _ in range(max(1, self.warmup)):
                step()
                for t, s in zip(before, saved, strict=True):
                    t.copy_(s)
        torch.cuda.current_stream(input_ids.device).wait_stream(side)
        after = counters()
        if len(after) != len(before) or any(a is not b for a, b in zip(after, before, strict=False)):
            raise RuntimeError("CUDAGraphWrapper: the static cache must be initialised (run the prefill through "
                               "the wrapper or the model first) before a decode step is captured")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = step()
        self.captures += 1
        log.info("CUDAGraphWrapper: captured a decode step (cache %s)", type(cache).__name__)
        self._captured = _Captured(graph, cache, static_ids, static_pos_ids, static_pos, out)
        return self._captured


@torch.no_grad()
def decode(step, input_ids: torch.Tensor, cache, max_new_tokens: int, *, do_sample: bool = False,
           temperature: float = 1.0, top_k: int | None = None, generator: torch.Generator | None = None,
           eos_token_id: int | None = None) -> torch.Tensor:
    """Batch-1 decode loop through ``step`` (a model or a :class:`CUDAGraphWrapper`).

    Args:
        step: a causal LM or a wrapper of one.
        input_ids: (1, n) prompt.
        cache: a fresh ``StaticCache`` (or any cache) for this sequence.
        max_new_tokens: tokens to generate.
        do_sample / temperature / top_k / generator: sampling (greedy when ``do_sample`` is False).
        eos_token_id: stop early on this token (costs a host sync per token).

    Returns:
        (1, n + generated) token ids.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"decode takes a (1, n) prompt rather than {tuple(input_ids.shape)}")
    model = step.model if isinstance(step, CUDAGraphWrapper) else step
    cache_name, takes_cache_position = forward_params(model)
    dev = input_ids.device
    n = input_ids.shape[1]

    def call(ids: torch.Tensor, pos: torch.Tensor):
        kw = {cache_name: cache, "position_ids": pos.unsqueeze(0)}
        if takes_cache_position:
            kw["cache_position"] = pos
        return step(input_ids=ids, **kw)

    out = call(input_ids, torch.arange(n, device=dev))
    tokens = [input_ids]
    for i in range(max_new_tokens):
        logits = out.logits[:, -1, :].float()  # (1, vocab)
        if do_sample:
            logits = logits / max(temperature, 1e-6)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)  # (1, 1)
        else:
            nxt = logits.argmax(-1, keepdim=True)  # (1, 1)
        tokens.append(nxt)
        if i == max_new_tokens - 1 or (eos_token_id is not None and int(nxt) == eos_token_id):
            break
        out = call(nxt, torch.tensor([n + i], device=dev))
    return torch.cat(tokens, dim=1)
