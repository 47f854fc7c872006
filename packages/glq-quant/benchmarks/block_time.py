"""Quantization time of one random-initialised Llama-3-8B-shaped decoder block on a GPU.

hidden 4096, intermediate 14336, 32 heads / 8 KV heads, SmolLM2's tokenizer (vocab 49152);
calibration nsamples x seqlen of the shipped wikipedia text (default 128 x 2048, as for real runs).
Reports seconds for the whole run and per block (the embedding and writing are included once); the
progress bars (stderr) show each step's rate and ETA, so a run cut short still tells how far it got.

    python packages/glq-quant/benchmarks/block_time.py --bpw 2 4 --blocks 1
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bpw", nargs="+", type=float, default=[2])
    ap.add_argument("--blocks", type=int, default=1)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--tokenizer", default="smollm2-135m")
    args = ap.parse_args()

    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from glq.quant.models import resolve_model
    from glq.quant.pipeline import quantize_with_model

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "llama8b-shaped"
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.blocks,
                          num_attention_heads=32, num_key_value_heads=8, vocab_size=49152,
                          max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg).to(torch.bfloat16)
        model.save_pretrained(src)
        del model
        AutoTokenizer.from_pretrained(resolve_model(args.tokenizer)).save_pretrained(src)
        for bpw in args.bpw:
            torch.cuda.synchronize()
            start = time.perf_counter()
            summary, _ = quantize_with_model(str(src), Path(tmp) / f"q{bpw}", bpw=bpw, nsamples=args.nsamples,
                                             seqlen=args.seqlen, device="cuda", progress=True)
            seconds = time.perf_counter() - start
            layer_s = sum(v["seconds"] for v in summary["layers"].values())
            print(json.dumps({"bpw": bpw, "blocks": args.blocks, "seconds_total": round(seconds, 1),
                              "seconds_in_layer_quantization": round(layer_s, 1),
                              "minutes_per_block": round(seconds / 60 / args.blocks, 2),
                              "gpu": torch.cuda.get_device_name(), "nsamples": args.nsamples,
                              "seqlen": args.seqlen}), flush=True)


if __name__ == "__main__":
    main()
