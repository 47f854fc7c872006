"""``model.generate(..., cache=GLQQuantizedCache(...))`` on real Llama models."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from glq.kvcache import GLQQuantizedCache, GLQQuantizedLayer
from glq.kvcache.evaluate import cache_kwarg_name, chunked_nll

# Small enough that a 40-token prompt already has quantized groups.
SMALL = {"residual_length": 8, "group_size": 8}
# Large enough that nothing is ever quantized: must match DynamicCache bit for bit.
NEVER = {"residual_length": 10_000, "group_size": 8}


@pytest.fixture(scope="module")
def tiny(tiny_llama_path):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    # Random init gives near-flat logits; sharpen them so greedy choices are not coin flips.
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    return model


def _prompt(batch=1, length=40, seed=0):
    return torch.randint(3, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, ids, cache, mask=None, **kw):
    kw.setdefault("max_new_tokens", 24)
    kw.setdefault("do_sample", False)
    kw.setdefault("output_logits", True)
    return model.generate(ids, attention_mask=mask if mask is not None else torch.ones_like(ids), pad_token_id=0,
                          return_dict_in_generate=True, **{cache_kwarg_name(model): cache}, **kw)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def test_greedy_matches_dynamic_cache_without_quantized_tokens(tiny):
    ids = _prompt()
    ours = _generate(tiny, ids, GLQQuantizedCache(tiny.config, **NEVER))
    ref = _generate(tiny, ids, DynamicCache(config=tiny.config))
    assert torch.equal(ours.sequences, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(ours.logits, ref.logits, strict=True))


def test_greedy_with_quantized_tokens_is_close(tiny):
    ids = _prompt()
    cache = GLQQuantizedCache(tiny.config, **SMALL)
    ours = _generate(tiny, ids, cache)
    ref = _generate(tiny, ids, DynamicCache(config=tiny.config))
    assert cache.layers[0].quantized_length >= 48  # old tokens really were read from INT8
    assert cache.get_seq_length() == ours.sequences.shape[1] - 1
    # Compare logits up to the first differing token (afterwards the continuations differ).
    same = (ours.sequences[0, 40:] == ref.sequences[0, 40:]).long().cumprod(0).sum().item()
    assert same >= 8
    for a, b in list(zip(ours.logits, ref.logits, strict=True))[: same + 1]:
        assert _rel(a, b) < 1e-2


def test_batch_with_left_padding(tiny):
    ids = _prompt(batch=2)
    mask = torch.ones_like(ids)
    mask[1, :13] = 0  # row 1 is a 27-token prompt, left-padded
    ids[1, :13] = 0
    ours = _generate(tiny, ids, GLQQuantizedCache(tiny.config, **SMALL), mask)
    ref = _generate(tiny, ids, DynamicCache(config=tiny.config), mask)
    assert _rel(ours.logits[0], ref.logits[0]) < 1e-2
    # The padded row alone, unpadded, gives the same first-step logits.
    alone = _generate(tiny, ids[1:, 13:], GLQQuantizedCache(tiny.config, **SMALL), max_new_tokens=1)
    assert _rel(ours.logits[0][1], alone.logits[0][0]) < 1e-4


def test_sampling(tiny):
    ids = _prompt(batch=2)
    torch.manual_seed(1)
    ours = _generate(tiny, ids, GLQQuantizedCache(tiny.config, **NEVER), do_sample=True, top_k=20)
    torch.manual_seed(1)
    ref = _generate(tiny, ids, DynamicCache(config=tiny.config), do_sample=True, top_k=20)
    assert torch.equal(ours.sequences, ref.sequences)
    torch.manual_seed(1)
    quantized = _generate(tiny, ids, GLQQuantizedCache(tiny.config, **SMALL), do_sample=True, top_k=20)
    assert quantized.sequences.shape == (2, 64)


def test_beam_search_reorders_the_cache(tiny):
    ids = _prompt()
    kw = {"num_beams": 3, "max_new_tokens": 12, "output_logits": False}
    ours = _generate(tiny, ids, GLQQuantizedCache(tiny.config, **NEVER), **kw)
    ref = _generate(tiny, ids, DynamicCache(config=tiny.config), **kw)
    assert torch.equal(ours.sequences, ref.sequences)
    cache = GLQQuantizedCache(tiny.config, residual_length=4, group_size=4)
    quantized = _generate(tiny, ids, cache, **kw)
    assert quantized.sequences.shape[1] <= 52 and cache.layers[0].quantized_length > 0


# transformers 5.24 deprecates the keyword in favour of cache=; older 5.x only knows it, so it must keep working.
@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
def test_past_key_values_keyword_also_works(tiny):
    ids = _prompt()
    cache = GLQQuantizedCache(tiny.config, **SMALL)
    out = tiny.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=4,
                        do_sample=False, pad_token_id=0)
    assert out.shape == (1, 44) and cache.get_seq_length() == 43


class _FakeQuantLinear(torch.nn.Module):
    """Stand-in for a weight-quantized linear (4-bit round-to-nearest): not an nn.Linear."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight.detach()
        scale = w.abs().amax(dim=1, keepdim=True) / 7
        self.register_buffer("codes", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scale", scale)

    def forward(self, x):
        return torch.nn.functional.linear(x, self.codes.to(x.dtype) * self.scale)


def test_weight_quantized_model(tiny_llama_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32).eval()
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, _FakeQuantLinear(getattr(layer.self_attn, name)))
    ids = _prompt()
    ours = _generate(model, ids, GLQQuantizedCache(model.config, **SMALL), max_new_tokens=4)
    ref = _generate(model, ids, DynamicCache(config=model.config), max_new_tokens=4)
    assert _rel(ours.logits[-1], ref.logits[-1]) < 1e-2


def test_chunked_nll_through_the_cache(tiny):
    ids = _prompt(length=96)
    ref, n = chunked_nll(tiny, ids, DynamicCache(config=tiny.config), prefill=16, chunk=8)
    with torch.no_grad():
        single = tiny(ids).logits[0, :-1].float()
    direct = float(torch.nn.functional.cross_entropy(single, ids[0, 1:], reduction="sum"))
    assert n == 95 and math.isclose(ref, direct, rel_tol=1e-5)
    cache = GLQQuantizedCache(tiny.config, **SMALL)
    ours, _ = chunked_nll(tiny, ids, cache, prefill=16, chunk=8)
    assert cache.layers[0].quantized_length == 88  # 96 tokens, window of 8
    assert abs(ours / ref - 1) < 5e-3


@pytest.mark.slow
def test_smollm2_greedy_and_perplexity(smollm2_path):
    """SmolLM2-135M-Instruct (weights Q4_1 from its packager): same greedy text, ppl within 0.5%."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    text = ("The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
            "combined movable metal type, oil-based ink and a screw press. Within a few decades ") * 2
    enc = tok(text, return_tensors="pt")
    cache = GLQQuantizedCache(model.config, residual_length=16, group_size=16)
    ours = model.generate(**enc, max_new_tokens=16, do_sample=False, **{cache_kwarg_name(model): cache})
    ref = model.generate(**enc, max_new_tokens=16, do_sample=False)
    assert cache.layers[0].quantized_length >= 64
    assert torch.equal(ours, ref)

    from glq.quant.evaluate import wikitext2_ids

    ids = wikitext2_ids(tok)[:, :384]
    dyn, n = chunked_nll(model, ids, DynamicCache(config=model.config), prefill=32, chunk=64)
    q, _ = chunked_nll(model, ids, GLQQuantizedCache(model.config, residual_length=32, group_size=32),
                       prefill=32, chunk=64)
    assert math.exp(q / n) / math.exp(dyn / n) - 1 < 5e-3


def test_layers_are_glq_layers(tiny):
    cache = GLQQuantizedCache(tiny.config)
    assert all(isinstance(layer, GLQQuantizedLayer) for layer in cache.layers)
