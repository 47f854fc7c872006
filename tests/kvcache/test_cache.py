"""GLQQuantizedLayer / GLQQuantizedCache behave like transformers' own caches, on synthetic states."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache, LlamaConfig
from transformers.cache_utils import DynamicLayer

from glq.kvcache import GLQQuantizedCache, GLQQuantizedLayer, KVCacheConfig

B, H, DK, DV = 2, 3, 16, 8


def _seq(tokens, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, H, tokens, DK, generator=g) + torch.linspace(-3, 3, DK)  # offset channels
    v = torch.randn(B, H, tokens, DV, generator=g)
    return k.to(dtype), v.to(dtype)


def _feed(layer, k, v, chunks):
    out = None
    start = 0
    for n in chunks:
        out = layer.update(k[:, :, start : start + n], v[:, :, start : start + n])
        start += n
    assert start == k.shape[2]
    return out


def _state(layer):
    qk, qv = layer.quantized_keys, layer.quantized_values
    tensors = [layer.keys, layer.values]
    if qk is not None:
        tensors += [qk.codes, qk.scale, qk.zero, qv.codes, qv.scale]
    return [t for t in tensors if t is not None]


CHUNKS = [5, 1, 1, 7, 3, 1, 1, 1, 12, 2, 1, 1, 1]  # 37 tokens


@pytest.mark.parametrize(("residual", "group"), [(8, 4), (0, 1), (5, 3), (100, 4)], ids=lambda x: str(x))
def test_residual_window_is_exact_and_bounded(residual, group):
    k, v = _seq(37)
    layer = GLQQuantizedLayer(KVCacheConfig(residual_length=residual, group_size=group))
    keys, values = _feed(layer, k, v, CHUNKS)
    r = layer.residual_tokens
    assert min(37, residual) <= r < residual + group
    assert layer.quantized_length % group == 0 and layer.quantized_length + r == 37
    assert torch.equal(layer.keys, k[:, :, 37 - r :]) and torch.equal(layer.values, v[:, :, 37 - r :])
    # What this call returns for its own tokens and the window it started from is exact.
    assert keys.shape == (B, H, 37, DK) and values.shape == (B, H, 37, DV)
    exact = min(37, residual + CHUNKS[-1])
    assert torch.equal(keys[:, :, -exact:], k[:, :, -exact:])
    assert torch.equal(values[:, :, -exact:], v[:, :, -exact:])


def test_prefill_returns_its_states_exactly():
    k, v = _seq(50)
    layer = GLQQuantizedLayer(KVCacheConfig(residual_length=8, group_size=4))
    keys, values = layer.update(k, v)
    assert torch.equal(keys, k) and torch.equal(values, v)
    assert layer.quantized_length == 40 and layer.residual_tokens == 10


def test_state_does_not_depend_on_chunking():
    k, v = _seq(37)
    cfg = KVCacheConfig(residual_length=6, group_size=4)
    a, b = GLQQuantizedLayer(cfg), GLQQuantizedLayer(cfg)
    _feed(a, k, v, CHUNKS)
    _feed(b, k, v, [37])
    assert all(torch.equal(x, y) for x, y in zip(_state(a), _state(b), strict=True))


@pytest.mark.parametrize("key_scheme", ["minmax", "absmax"])
@pytest.mark.parametrize("value_scheme", ["absmax", "minmax"])
def test_dequantized_tokens_within_half_step(key_scheme, value_scheme):
    k, v = _seq(41)
    g = 4
    layer = GLQQuantizedLayer(KVCacheConfig(residual_length=8, group_size=g, key_scheme=key_scheme,
                                            value_scheme=value_scheme))
    layer.update(k[:, :, :40], v[:, :, :40])
    keys, values = layer.update(k[:, :, 40:], v[:, :, 40:])
    tq = layer.quantized_length
    assert tq == 32
    qk, qv = layer.quantized_keys, layer.quantized_values
    k_step = qk.scale.repeat_interleave(g, dim=2)
    assert ((keys[:, :, :tq] - k[:, :, :tq]).abs() <= 0.5 * k_step + 1e-5).all()
    assert ((values[:, :, :tq] - v[:, :, :tq]).abs() <= 0.5 * qv.scale + 1e-5).all()
    assert torch.equal(keys[:, :, tq:], k[:, :, tq:]) and torch.equal(values[:, :, tq:], v[:, :, tq:])


def test_bf16_states_come_back_in_bf16():
    k, v = _seq(40, dtype=torch.bfloat16)
    layer = GLQQuantizedLayer(KVCacheConfig(residual_length=8, group_size=8))
    layer.update(k[:, :, :39], v[:, :, :39])
    keys, values = layer.update(k[:, :, 39:], v[:, :, 39:])
    assert keys.dtype == values.dtype == torch.bfloat16
    rel = (keys.float() - k.float()).norm() / k.float().norm()
    assert rel < 1e-2


def test_length_and_mask_sizes_match_dynamic_layer():
    k, v = _seq(37)
    ours, ref = GLQQuantizedLayer(KVCacheConfig(residual_length=6, group_size=4)), DynamicLayer()
    assert ours.get_seq_length() == 0 and ours.get_mask_sizes(5) == ref.get_mask_sizes(5)
    start = 0
    for n in CHUNKS:
        a = ours.update(k[:, :, start : start + n], v[:, :, start : start + n])
        b = ref.update(k[:, :, start : start + n], v[:, :, start : start + n])
        start += n
        assert [t.shape for t in a] == [t.shape for t in b]
        assert ours.get_seq_length() == ref.get_seq_length() == start
        for q in (1, 7):
            assert ours.get_mask_sizes(q) == ref.get_mask_sizes(q)
        assert ours.get_mask_sizes(torch.arange(7)) == (start + 7, 0)  # earlier 5.x pass cache_position
    assert ours.get_max_length() == ref.get_max_length() == -1


def test_reorder_cache_is_an_exact_row_selection():
    k, v = _seq(37)
    cfg = KVCacheConfig(residual_length=6, group_size=4)
    beam_idx = torch.tensor([1, 1])
    a, b = GLQQuantizedLayer(cfg), GLQQuantizedLayer(cfg)
    _feed(a, k, v, CHUNKS)
    a.reorder_cache(beam_idx)
    _feed(b, k[beam_idx], v[beam_idx], CHUNKS)
    assert all(torch.equal(x, y) for x, y in zip(_state(a), _state(b), strict=True))
    # Same returned states as a DynamicLayer reordered the same way, up to quantization.
    ref = DynamicLayer()
    _feed(ref, k, v, CHUNKS)
    ref.reorder_cache(beam_idx)
    nk, nv = _seq(1, seed=3)
    ka, _ = a.update(nk, nv)
    kr, _ = ref.update(nk, nv)
    assert ka.shape == kr.shape and (ka - kr).abs().max() < 0.05


def test_batch_select_and_repeat_interleave():
    k, v = _seq(37)
    cfg = KVCacheConfig(residual_length=6, group_size=4)
    a, b, c = GLQQuantizedLayer(cfg), GLQQuantizedLayer(cfg), GLQQuantizedLayer(cfg)
    _feed(a, k, v, CHUNKS)
    a.batch_select_indices(torch.tensor([1]))
    _feed(b, k[1:], v[1:], CHUNKS)
    assert all(torch.equal(x, y) for x, y in zip(_state(a), _state(b), strict=True))
    _feed(c, k, v, CHUNKS)
    c.batch_repeat_interleave(2)
    assert c.keys.shape[0] == 2 * B and torch.equal(c.quantized_keys.codes[2], c.quantized_keys.codes[3])


def test_crop_inside_the_window_is_exact():
    k, v = _seq(37)
    cfg = KVCacheConfig(residual_length=8, group_size=4)
    ours, ref = GLQQuantizedLayer(cfg), DynamicLayer()
    _feed(ours, k, v, CHUNKS)
    _feed(ref, k, v, CHUNKS)
    assert ours.residual_tokens > 3
    ours.crop(-3)
    ref.crop(-3)
    assert ours.get_seq_length() == ref.get_seq_length() == 34
    assert torch.equal(ours.keys, k[:, :, 34 - ours.residual_tokens : 34])
    assert torch.equal(ours.values, v[:, :, 34 - ours.residual_tokens : 34])


def test_crop_that_crosses_no_flush_leaves_no_trace():
    k, v = _seq(37)
    cfg = KVCacheConfig(residual_length=8, group_size=4)
    ours, fresh = GLQQuantizedLayer(cfg), GLQQuantizedLayer(cfg)
    _feed(ours, k, v, CHUNKS)
    ours.crop(-1)  # 36 tokens hold the same 28 quantized ones as 37 do
    _feed(fresh, k[:, :, :36], v[:, :, :36], [36])
    assert all(torch.equal(x, y) for x, y in zip(_state(ours), _state(fresh), strict=True))


def test_crop_into_quantized_groups_is_bounded():
    k, v = _seq(37)
    cfg = KVCacheConfig(residual_length=8, group_size=4)
    ours = GLQQuantizedLayer(cfg)
    _feed(ours, k, v, CHUNKS)
    tq = ours.quantized_length
    step_k = ours.quantized_keys.scale.repeat_interleave(4, dim=2)
    ours.crop(-(37 - tq + 6))  # cut 6 tokens into the quantized part, mid-group
    new_len = tq - 6
    assert ours.get_seq_length() == new_len
    assert ours.quantized_length % 4 == 0 and ours.quantized_length + ours.residual_tokens == new_len
    back = ours.keys  # tokens brought back from INT8
    lo = ours.quantized_length
    assert ((back - k[:, :, lo:new_len]).abs() <= 0.5 * step_k[:, :, lo:new_len] + 1e-5).all()
    # It keeps working afterwards.
    keys, _ = ours.update(k[:, :, new_len:], v[:, :, new_len:])
    assert keys.shape[2] == 37 and ours.get_seq_length() == 37


def test_crop_edge_cases_like_dynamic_layer():
    k, v = _seq(20)
    ours = GLQQuantizedLayer(KVCacheConfig(residual_length=4, group_size=4))
    ours.crop(-3)  # uninitialised: nothing to do
    ours.update(k, v)
    before = [t.clone() for t in _state(ours)]
    ours.crop(0)
    assert all(torch.equal(x, y) for x, y in zip(before, _state(ours), strict=True))
    with pytest.raises(ValueError, match="negative number of tokens"):
        ours.crop(3)
    with pytest.raises(ValueError):
        DynamicLayer().crop(3)
    ours.crop(-100)
    assert ours.get_seq_length() == 0 and ours.quantized_length == 0


def test_reset_and_reuse():
    k, v = _seq(20)
    layer = GLQQuantizedLayer(KVCacheConfig(residual_length=4, group_size=4))
    layer.update(k, v)
    layer.reset()
    assert layer.get_seq_length() == 0 and not layer.is_initialized and layer.nbytes()["total"] == 0
    keys, _ = layer.update(k[:1], v[:1])
    assert keys.shape[0] == 1


def test_nbytes_counts_codes_scales_and_window():
    k, v = _seq(40)
    layer = GLQQuantizedLayer(KVCacheConfig(residual_length=8, group_size=8))
    layer.update(k, v)
    got = layer.nbytes()
    tq, r = layer.quantized_length, layer.residual_tokens
    assert (tq, r) == (32, 8)
    assert got["int8"] == B * H * tq * (DK + DV)
    assert got["scales"] == 4 * B * H * (2 * (tq // 8) * DK + tq)  # keys: scale + zero per group; values: scale
    assert got["residual"] == 4 * B * H * r * (DK + DV)
    assert layer.dense_nbytes(torch.bfloat16) == 2 * B * H * 40 * (DK + DV)


def _tiny_config(**kw):
    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                       num_attention_heads=2, num_key_value_heads=1, **kw)


def test_cache_builds_one_layer_per_decoder_layer():
    cache = GLQQuantizedCache(_tiny_config(), residual_length=16, group_size=8)
    assert len(cache.layers) == 3 and all(isinstance(x, GLQQuantizedLayer) for x in cache.layers)
    assert cache.get_seq_length() == 0 and not cache.is_croppable and not cache.is_compileable
    k, v = _seq(30)
    for i in range(3):
        cache.update(k, v, i)
    assert cache.get_seq_length() == 30 and cache.get_mask_sizes(2, 0) == (32, 0)
    assert cache.nbytes()["total"] == sum(x.nbytes()["total"] for x in cache.layers)
    ref = DynamicCache()
    for i in range(3):
        ref.update(k, v, i)
    cache.reorder_cache(torch.tensor([1, 0]))
    cache.crop(-2)
    ref.crop(-2)
    assert cache.get_seq_length() == ref.get_seq_length() == 28


def test_unsupported_configurations_raise_clearly():
    from transformers import Gemma2Config, MistralConfig, T5Config

    with pytest.raises(ValueError, match=r"full-attention layers only.*sliding_attention"):
        GLQQuantizedCache(MistralConfig(num_hidden_layers=2, sliding_window=64))
    with pytest.raises(ValueError, match=r"full-attention layers only.*sliding_attention"):
        GLQQuantizedCache(Gemma2Config(num_hidden_layers=2))
    with pytest.raises(ValueError, match="decoder-only"):
        GLQQuantizedCache(T5Config())
    with pytest.raises(ValueError, match=r"nbits=4 is not supported"):
        GLQQuantizedCache(_tiny_config(), nbits=4)
    with pytest.raises(ValueError, match=r"residual_length=-1 must be >= 0"):
        GLQQuantizedCache(_tiny_config(), residual_length=-1)
    with pytest.raises(ValueError, match=r"group_size=0 must be >= 1"):
        GLQQuantizedCache(_tiny_config(), group_size=0)
    with pytest.raises(TypeError, match="residual_length must be an int"):
        GLQQuantizedCache(_tiny_config(), residual_length=12.5)
    with pytest.raises(ValueError, match="key_scheme must be one of"):
        GLQQuantizedCache(_tiny_config(), key_scheme="fp8")
    layer = GLQQuantizedLayer()
    with pytest.raises(TypeError, match="floating point"):
        layer.update(torch.zeros(1, 1, 2, 4, dtype=torch.int32), torch.zeros(1, 1, 2, 4, dtype=torch.int32))
    layer.update(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))
    with pytest.raises(ValueError, match=r"holds \(B, H, Dk, Dv\)=\(1, 1, 4, 4\) states, got \(1, 2, 4, 4\)"):
        layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 4))
    with pytest.raises(TypeError, match=r"holds torch\.float32 states"):
        layer.update(torch.zeros(1, 1, 1, 4, dtype=torch.bfloat16), torch.zeros(1, 1, 1, 4, dtype=torch.bfloat16))
