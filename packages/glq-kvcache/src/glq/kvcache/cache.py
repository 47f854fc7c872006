"""``GLQQuantizedCache``: a Transformers cache that keeps keys and values in INT8.

Per layer, tokens ``[0, Tq)`` are stored quantized (``Tq`` a multiple of ``group_size``; keys per
channel, values per token, see ``glq.kvcache.quant``) and tokens ``[Tq, T)`` are stored exactly in
the model's dtype (the *residual window*). After every ``update`` the window holds at least
``residual_length`` tokens (or all of them, for shorter sequences) and fewer than
``residual_length + group_size``: whole groups of ``group_size`` tokens are quantized as they age
out of it. Group boundaries sit at multiples of ``group_size`` counted from the first token, so the
stored state depends only on the sequence, never on how it was split into ``update`` calls.

``update`` returns the dequantized old tokens, then the window and the new tokens exactly, all in
the model's dtype; tokens quantized during this call are first read dequantized by the next call.
A single prefill therefore attends in full precision, as in KIVI and transformers' own
``QuantizedCache``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from glq.kvcache.quant import (
    SCHEMES,
    QTensor,
    dequantize_per_channel,
    dequantize_per_token,
    qtensor_cat,
    qtensor_map,
    qtensor_nbytes,
    quantize_per_channel,
    quantize_per_token,
)


@dataclass(frozen=True)
class KVCacheConfig:
    """Settings of the INT8 KV cache, validated on creation.

    Attributes:
        residual_length: most recent tokens always kept in full precision (>= 0).
        group_size: tokens per key-scale group, and the unit in which tokens are quantized (>= 1).
        key_scheme: ``"minmax"`` (default) or ``"absmax"`` scales for keys (per channel).
        value_scheme: ``"absmax"`` (default) or ``"minmax"`` scales for values (per token).
        nbits: bits per stored element; only 8 is implemented.
    """

    residual_length: int = 128
    group_size: int = 128
    key_scheme: str = "minmax"
    value_scheme: str = "absmax"
    nbits: int = 8
    version: int = 1

    def __post_init__(self):
        for name in ("residual_length", "group_size", "nbits"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__} ({value!r})")
        if self.residual_length < 0:
            raise ValueError(f"residual_length={self.residual_length} must be >= 0")
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size} must be >= 1")
        if self.nbits != 8:
            raise ValueError(
                f"nbits={self.nbits} is not supported: GLQQuantizedCache stores INT8 (nbits=8). For 2 or 4 bits "
                "use transformers' QuantizedCache (quanto or hqq backend)."
            )
        for name in ("key_scheme", "value_scheme"):
            if getattr(self, name) not in SCHEMES:
                raise ValueError(f"{name} must be one of {SCHEMES}, got {getattr(self, name)!r}")
        if self.version != 1:
            raise ValueError(f"unknown KVCacheConfig version={self.version} (this glq-kvcache reads version 1)")


class GLQQuantizedLayer(CacheLayerMixin):
    """One attention layer's INT8 cache.

    Stored state (B batch, H KV heads, Dk/Dv head dims, Tq quantized tokens, R window tokens):

    - ``keys``, ``values``: (B, H, R, Dk|Dv) in the model dtype, the residual window (exact).
    - ``quantized_keys``: codes (B, H, Tq, Dk) int8, scale/zero (B, H, Tq / group_size, Dk) fp32.
    - ``quantized_values``: codes (B, H, Tq, Dv) int8, scale/zero (B, H, Tq, 1) fp32.

    Every batch row has its own scales, so beam reordering and batch selection are exact
    index selections of the stored tensors.
    """

    is_compileable = False
    # `crop` back into quantized groups brings their tokens back dequantized, not exactly as they
    # were, so a rollback may leave a trace; transformers then refuses assisted decoding with a
    # clear message, as it does for its own quantized caches.
    is_croppable = False
    is_sliding = False

    def __init__(self, config: KVCacheConfig | None = None, **kwargs):
        super().__init__()
        self.config = config if config is not None else KVCacheConfig()
        self.quantized_keys: QTensor | None = None
        self.quantized_values: QTensor | None = None
        self.cumulative_length = 0

    def __repr__(self):
        return (f"{type(self).__name__}(seq={self.cumulative_length}, quantized={self.quantized_length}, "
                f"residual_length={self.config.residual_length}, group_size={self.config.group_size})")

    # -- state ---------------------------------------------------------------------------------

    @property
    def quantized_length(self) -> int:
        """Tokens stored in INT8 (a multiple of ``group_size``)."""
        return 0 if self.quantized_keys is None else self.quantized_keys.codes.shape[2]

    @property
    def residual_tokens(self) -> int:
        """Tokens stored in full precision."""
        return 0 if self.keys is None else self.keys.shape[2]

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        """Record dtype, device and shapes from the first states; start an empty window."""
        value_states = key_states if value_states is None else value_states
        self._check_states(key_states, value_states, first=True)
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, dk = key_states.shape
        dv = value_states.shape[-1]
        self.keys = key_states.new_empty((b, h, 0, dk))  # (B, H, 0, Dk)
        self.values = value_states.new_empty((b, h, 0, dv))  # (B, H, 0, Dv)
        self.is_initialized = True

    def _check_states(self, key_states: torch.Tensor, value_states: torch.Tensor, first: bool = False) -> None:
        for name, t in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{name} must be a (B, H, T, D) tensor, got {shape}")
            if not t.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {t.dtype}")
        if key_states.shape[:3] != value_states.shape[:3]:
            raise ValueError(f"key_states {tuple(key_states.shape)} and value_states {tuple(value_states.shape)} "
                             "differ in batch, heads or tokens")
        if key_states.dtype != value_states.dtype:
            raise TypeError(f"key_states are {key_states.dtype} but value_states are {value_states.dtype}")
        if first:
            return
        if key_states.dtype != self.dtype:
            raise TypeError(f"this cache holds {self.dtype} states, got {key_states.dtype}")
        expected_k = (self.keys.shape[0], self.keys.shape[1], self.keys.shape[3])
        got_k = (key_states.shape[0], key_states.shape[1], key_states.shape[3])
        expected_v, got_v = self.values.shape[3], value_states.shape[3]
        if expected_k != got_k or expected_v != got_v:
            raise ValueError(f"this cache holds (B, H, Dk, Dv)={(*expected_k, expected_v)} states, "
                             f"got {(*got_k, got_v)}")

    # -- the transformers layer API --------------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (B, H, T, Dk) keys and (B, H, T, Dv) values; return all states so far.

        Returns:
            keys (B, H, S, Dk) and values (B, H, S, Dv), S = previous length + T, in the model
            dtype: dequantized INT8 tokens first, then the residual window and the new tokens exactly.
        """
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        else:
            self._check_states(key_states, value_states)
        cfg = self.config
        new = key_states.shape[2]
        tq = self.quantized_length

        if tq == 0:
            keys_out = torch.cat([self.keys, key_states], dim=2)
            values_out = torch.cat([self.values, value_states], dim=2)
        else:
            b, h, r, dk = self.keys.shape
            dv = self.values.shape[3]
            total = tq + r + new
            keys_out = torch.empty((b, h, total, dk), dtype=self.dtype, device=key_states.device)  # (B, H, S, Dk)
            values_out = torch.empty((b, h, total, dv), dtype=self.dtype, device=key_states.device)  # (B, H, S, Dv)
            dequantize_per_channel(self.quantized_keys, cfg.group_size, self.dtype, out=keys_out[:, :, :tq])
            dequantize_per_token(self.quantized_values, self.dtype, out=values_out[:, :, :tq])
            keys_out[:, :, tq : tq + r].copy_(self.keys)
            values_out[:, :, tq : tq + r].copy_(self.values)
            keys_out[:, :, tq + r :].copy_(key_states)
            values_out[:, :, tq + r :].copy_(value_states)

        window = keys_out.shape[2] - tq
        flush = max(0, (window - cfg.residual_length) // cfg.group_size) * cfg.group_size
        win_k = keys_out[:, :, tq:]
        win_v = values_out[:, :, tq:]
        if flush:
            qk = quantize_per_channel(win_k[:, :, :flush], cfg.group_size, cfg.key_scheme)
            qv = quantize_per_token(win_v[:, :, :flush], cfg.value_scheme)
            self.quantized_keys = qk if self.quantized_keys is None else qtensor_cat([self.quantized_keys, qk])
            self.quantized_values = qv if self.quantized_values is None else qtensor_cat([self.quantized_values, qv])
        # A copy, not a view: a view would keep the whole returned (dequantized) buffer alive.
        self.keys = win_k[:, :, flush:].clone()
        self.values = win_v[:, :, flush:].clone()
        self.cumulative_length += new
        return keys_out, values_out

    def get_seq_length(self, *args, **kwargs) -> int:
        """Tokens seen so far (quantized + residual)."""
        return self.cumulative_length

    def get_mask_sizes(self, query_length, *args, **kwargs) -> tuple[int, int]:
        """(kv_length, kv_offset) for the attention mask of a query of ``query_length`` tokens.

        Accepts an int (transformers >= 5.2x) or the ``cache_position`` tensor (earlier 5.x).
        """
        if isinstance(query_length, torch.Tensor):
            query_length = query_length.shape[0]
        return self.cumulative_length + int(query_length), 0

    def get_max_length(self) -> int:
        """No maximum: the cache grows with the sequence."""
        return -1

    get_max_cache_shape = get_max_length  # the name earlier transformers 5.x releases call

    def reset(self) -> None:
        """Drop all states; the next ``update`` starts afresh."""
        self.keys = self.values = None
        self.quantized_keys = self.quantized_values = None
        self.cumulative_length = 0
        self.is_initialized = False

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.keys = fn(self.keys)
        self.values = fn(self.values)
        if self.quantized_keys is not None:
            self.quantized_keys = qtensor_map(self.quantized_keys, fn)
            self.quantized_values = qtensor_map(self.quantized_values, fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the batch rows for beam search (exact: every row has its own scales)."""
        if self.is_initialized:
            idx = beam_idx.to(self.keys.device)
            self._map(lambda t: t.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat every batch row ``repeats`` times."""
        if self.is_initialized:
            self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices``."""
        if self.is_initialized:
            self._map(lambda t: t[indices, ...])

    def offload(self):
        """Move every stored tensor to the CPU."""
        if self.is_initialized:
            self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self):
        """Move every stored tensor back to the layer's device."""
        if self.is_initialized and self.keys.device != self.device:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative count, as transformers' caches take).

        Tokens left in the window stay exact. If the cut falls inside the quantized part, the
        surviving tokens of the cut group come back into the window dequantized (error <= scale / 2).
        """
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        new_len = max(self.cumulative_length + tokens_to_remove, 0)
        tq = self.quantized_length
        if new_len >= tq:
            keep = new_len - tq
            self.keys = self.keys[:, :, :keep].clone()
            self.values = self.values[:, :, :keep].clone()
        else:
            g = self.config.group_size
            keep_q = (new_len // g) * g
            keys = dequantize_per_channel(self._slice_keys(keep_q, tq), g, self.dtype)
            values = dequantize_per_token(self._slice_values(keep_q, tq), self.dtype)
            self.keys = keys[:, :, : new_len - keep_q].contiguous()
            self.values = values[:, :, : new_len - keep_q].contiguous()
            if keep_q == 0:
                self.quantized_keys = self.quantized_values = None
            else:
                self.quantized_keys = self._slice_keys(0, keep_q)
                self.quantized_values = self._slice_values(0, keep_q)
        self.cumulative_length = new_len

    def _slice_keys(self, start: int, stop: int) -> QTensor:
        g = self.config.group_size
        q = self.quantized_keys
        groups = slice(start // g, stop // g)
        zero = None if q.zero is None else q.zero[:, :, groups].clone()
        return QTensor(q.codes[:, :, start:stop].clone(), q.scale[:, :, groups].clone(), zero)

    def _slice_values(self, start: int, stop: int) -> QTensor:
        q = self.quantized_values
        zero = None if q.zero is None else q.zero[:, :, start:stop].clone()
        return QTensor(q.codes[:, :, start:stop].clone(), q.scale[:, :, start:stop].clone(), zero)

    # -- accounting ----------------------------------------------------------------------------

    def nbytes(self) -> dict[str, int]:
        """Bytes held: ``int8`` codes, ``scales`` (scales + zero points), ``residual`` window, ``total``."""
        if not self.is_initialized:
            return {"int8": 0, "scales": 0, "residual": 0, "total": 0}
        codes = 0
        if self.quantized_keys is not None:
            codes = self.quantized_keys.codes.numel() + self.quantized_values.codes.numel()
        meta = qtensor_nbytes(self.quantized_keys) + qtensor_nbytes(self.quantized_values) - codes
        residual = self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()
        return {"int8": codes, "scales": meta, "residual": residual, "total": codes + meta + residual}

    def dense_nbytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes a plain ``DynamicLayer`` in ``dtype`` would hold for the same tokens."""
        if not self.is_initialized:
            return 0
        b, h, _, dk = self.keys.shape
        dv = self.values.shape[3]
        itemsize = torch.empty((), dtype=dtype).element_size()
        return b * h * self.cumulative_length * (dk + dv) * itemsize


def _layer_types(config) -> list[str]:
    """Attention type of every decoder layer, as transformers names them."""
    types = getattr(config, "layer_types", None)
    if types is not None:
        return list(types)
    n = config.num_hidden_layers
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return ["sliding_attention"] * n
    if getattr(config, "attention_chunk_size", None) is not None:
        return ["chunked_attention"] * n
    return ["full_attention"] * n


class GLQQuantizedCache(Cache):
    """Drop-in Transformers cache storing keys per channel and values per token in INT8.

    Example::

        cache = GLQQuantizedCache(model.config, residual_length=128)
        out = model.generate(**inputs, cache=cache)  # `past_key_values=cache` on older transformers

    Args:
        config: the model's ``PretrainedConfig`` (its text/decoder part is used). Every layer must
            be a full-attention layer of a decoder-only model.
        residual_length: most recent tokens always kept exactly in the model dtype.
        group_size: tokens per key-scale group; tokens are quantized ``group_size`` at a time.
        key_scheme, value_scheme: ``"minmax"`` or ``"absmax"`` (see ``glq.kvcache.quant``).
        nbits: must be 8.

    Raises:
        ValueError: for an encoder-decoder model, sliding-window, chunked, linear or shared-KV
            layers, or invalid settings (the message names the offending values).
    """

    def __init__(self, config, residual_length: int = 128, group_size: int = 128, key_scheme: str = "minmax",
                 value_scheme: str = "absmax", nbits: int = 8):
        kv_config = KVCacheConfig(residual_length=residual_length, group_size=group_size, key_scheme=key_scheme,
                                  value_scheme=value_scheme, nbits=nbits)
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"GLQQuantizedCache supports decoder-only models; {type(config).__name__} is "
                             "encoder-decoder")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        if getattr(text, "num_hidden_layers", None) is None:
            raise ValueError(f"{type(text).__name__} has no num_hidden_layers: is it a decoder config?")
        types = _layer_types(text)
        if getattr(text, "kv_sharing_modes", None) is not None:
            modes = text.kv_sharing_modes
            types = ["shared_kv" if mode == "reuse" else t for t, mode in zip(types, modes, strict=True)]
        unsupported = sorted(set(types) - {"full_attention"})
        if unsupported:
            raise ValueError(f"GLQQuantizedCache supports full-attention layers only; {type(text).__name__} has "
                             f"layer types {unsupported}")
        self.kv_config = kv_config
        super().__init__(layers=[GLQQuantizedLayer(kv_config) for _ in range(text.num_hidden_layers)])

    def nbytes(self) -> dict[str, int]:
        """Bytes held by all layers, by kind (see ``GLQQuantizedLayer.nbytes``)."""
        totals = {"int8": 0, "scales": 0, "residual": 0, "total": 0}
        for layer in self.layers:
            for k, v in layer.nbytes().items():
                totals[k] += v
        return totals

    def dense_nbytes(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """Bytes a plain ``DynamicCache`` in ``dtype`` would hold for the same tokens."""
        return sum(layer.dense_nbytes(dtype) for layer in self.layers)
