"""SQNR of INT8 keys and values of SmolLM2-135M for each layout and scale rule.

    python packages/glq-kvcache/benchmarks/layout_sqnr.py

Runs the first 2048 tokens of WikiText-2 (raw test) through the offline test model (weights Q4_1
from its packager) with a DynamicCache, then quantizes every layer's keys and values per channel
(groups of 128 tokens) and per token, with absmax and minmax scales, and prints the mean and worst
SQNR over the 30 layers. The choice it informs: keys per channel + minmax, values per token + absmax.
"""

from __future__ import annotations

import torch


def sqnr_db(x: torch.Tensor, y: torch.Tensor) -> float:
    x, y = x.double(), y.double()
    return float(10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum()))


def main() -> None:
    torch.set_num_threads(2)
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from glq.kvcache.evaluate import cache_kwarg_name
    from glq.kvcache.quant import (
        SCHEMES,
        dequantize_per_channel,
        dequantize_per_token,
        quantize_per_channel,
        quantize_per_token,
    )
    from glq.quant.evaluate import wikitext2_ids
    from glq.quant.models import smollm2_135m_path

    path = smollm2_135m_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = wikitext2_ids(tok)[:, :2048]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, use_cache=True, **{cache_kwarg_name(model): cache})
    results: dict[tuple[str, str, str], list[float]] = {}
    for layer in cache.layers:
        for name, x in (("keys", layer.keys), ("values", layer.values)):
            for scheme in SCHEMES:
                per_channel = dequantize_per_channel(quantize_per_channel(x, 128, scheme), 128)
                per_token = dequantize_per_token(quantize_per_token(x, scheme))
                results.setdefault((name, "per channel (G=128)", scheme), []).append(sqnr_db(x, per_channel))
                results.setdefault((name, "per token", scheme), []).append(sqnr_db(x, per_token))
    print("| tensor | layout | scale | mean SQNR dB | worst layer dB |")
    print("|---|---|---|---|---|")
    for (name, layout, scheme), vals in sorted(results.items()):
        print(f"| {name} | {layout} | {scheme} | {sum(vals) / len(vals):.2f} | {min(vals):.2f} |")


if __name__ == "__main__":
    main()
