"""Decode tokens/s of a random-initialised 8B-shaped Llama with a bf16 DynamicCache vs the INT8 cache.

Needs only torch and transformers (tested against transformers 5.24; written for 5.17 too) and a
CUDA GPU. From the repository root:

    python packages/glq-kvcache/benchmarks/bench_decode.py                     # 4k and 16k, 32 layers
    python packages/glq-kvcache/benchmarks/bench_decode.py --layers 8 --steps 16   # a quick look

For every context length and cache: prefill ``context`` random tokens in one pass, run ``warmup``
decode steps, then time ``steps`` greedy decode steps (one token each, ``logits_to_keep=1``)
between two CUDA synchronisations, ``repeats`` times alternating the caches (fastest kept).
Printed per row: decode tokens/s (batch x steps / time), ms per
step, the cache's bytes at the end (real tensor bytes: int8 codes + fp32 scales + bf16 window for
the INT8 cache) and the peak allocated GPU memory during decode.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import sys
import time
from pathlib import Path

import torch

try:
    from glq.kvcache import GLQQuantizedCache
except ImportError:  # run from a checkout without installing the workspace
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from glq.kvcache import GLQQuantizedCache


def build_model(args):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=args.layers,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=max(args.contexts) + args.warmup + args.steps + 16,
        rope_theta=500000.0,
        tie_word_embeddings=False,
    )
    cfg._attn_implementation = args.attn
    torch.manual_seed(0)
    # Build directly on the GPU in bf16: an fp32 CPU init of 8B parameters would need 32 GB of host memory.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cache_kwarg(model) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name still works, with a warning).
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def cache_bytes(cache) -> int:
    if isinstance(cache, GLQQuantizedCache):
        return cache.nbytes()["total"]
    total = 0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def run_one(model, kind: str, context: int, args) -> dict:
    from transformers import DynamicCache

    kw = cache_kwarg(model)
    if kind == "bf16 DynamicCache":
        cache = DynamicCache(config=model.config)
    else:
        cache = GLQQuantizedCache(model.config, residual_length=args.residual_length, group_size=args.group_size)
    gen = torch.Generator(device=args.device).manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (args.batch, context), device=args.device, generator=gen)
    sync(args.device)
    t0 = time.perf_counter()
    logits = model(prompt, use_cache=True, logits_to_keep=1, **{kw: cache}).logits
    sync(args.device)
    prefill_s = time.perf_counter() - t0
    token = logits[:, -1:].argmax(-1)
    for _ in range(args.warmup):
        token = model(token, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1:].argmax(-1)
    sync(args.device)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        token = model(token, use_cache=True, logits_to_keep=1, **{kw: cache}).logits[:, -1:].argmax(-1)
    sync(args.device)
    elapsed = time.perf_counter() - t0
    row = {
        "context": context,
        "cache": kind,
        "tok_s": args.batch * args.steps / elapsed,
        "ms_step": 1000 * elapsed / args.steps,
        "prefill_s": prefill_s,
        "cache_mib": cache_bytes(cache) / 2**20,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "seq": cache.get_seq_length(),
    }
    del cache, logits, prompt, token
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--layers", type=int, default=32, help="decoder layers (32 for the 8B shape)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=64, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per (context, cache), interleaved; the table keeps each one's fastest")
    parser.add_argument("--residual-length", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--attn", default="sdpa", help="attention implementation (sdpa, eager, ...)")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary (smaller only for smoke tests)")
    parser.add_argument("--device", default="cuda", help="cuda (the benchmark) or cpu (a smoke test only)")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench_decode.py needs a CUDA GPU (or --device cpu for a smoke test)")

    import transformers

    model = build_model(args)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU smoke test"
    print(f"# {name} | torch {torch.__version__} | transformers {transformers.__version__} | "
          f"random-init Llama hidden 4096, vocab {args.vocab}, {args.layers} layers, 32 heads / 8 KV heads, "
          f"head_dim 128, intermediate 14336, bf16, attn={args.attn}, batch {args.batch}, {args.steps} timed steps "
          f"after {args.warmup} warm-up | INT8 cache residual_length={args.residual_length}, "
          f"group_size={args.group_size}")
    # Eager decode at batch 1 is largely bound by the host (kernel launches), whose speed drifts
    # during a run: alternate the two caches and keep each one's fastest run, so neither gains from
    # running later.
    rows = []
    for context in args.contexts:
        best = {}
        for rep in range(args.repeats):
            for kind in ("bf16 DynamicCache", "GLQ INT8 cache"):
                r = run_one(model, kind, context, args)
                print(f"  run {rep}: {kind} @ {context}: {r['tok_s']:.1f} tok/s", flush=True)
                if kind not in best or r["tok_s"] > best[kind]["tok_s"]:
                    best[kind] = r
        rows += [best["bf16 DynamicCache"], best["GLQ INT8 cache"]]

    print()
    print("| context | cache | decode tok/s | ms/step | cache MiB | cache bytes/token | vs bf16 | "
          "peak GiB (decode) | prefill s |")
    print("|---|---|---|---|---|---|---|---|---|")
    dense = {}
    for r in rows:
        per_token = r["cache_mib"] * 2**20 / (r["seq"] * args.batch)
        if r["cache"].startswith("bf16"):
            dense[r["context"]] = (r["cache_mib"], r["tok_s"])
        ref_mib, _ = dense.get(r["context"], (r["cache_mib"], r["tok_s"]))
        print(f"| {r['context']} | {r['cache']} | {r['tok_s']:.1f} | {r['ms_step']:.2f} | {r['cache_mib']:.1f} | "
              f"{per_token:.0f} | {r['cache_mib'] / ref_mib:.3f}x | {r['peak_gib']:.2f} | {r['prefill_s']:.2f} |")


if __name__ == "__main__":
    main()
