"""Batch-1 decode speed of an 8B-shaped Llama: GLQ eager vs GLQ through CUDAGraphWrapper vs
bf16 (eager and graphed), plus one torch.compile measurement of the GLQ model.

Models are random-initialised straight on the GPU (glq.hf.testing.random_glq_model for GLQ;
a bf16 model of the same shape). Decode steps use a StaticCache; timing covers only the
single-token steps after the prompt, greedy (argmax on the device, no host sync per token).

Run from the repository root with the workspace on the path::

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python packages/glq-hf/benchmarks/bench_decode.py
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import llama_8b_config, versions


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_decode(step, model, cache, prompt_len: int, n_tokens: int, repeats: int = 2) -> float:
    """Tokens per second of ``n_tokens`` single-token steps through ``step`` (the last of
    ``repeats`` runs; earlier runs capture graphs / compile)."""
    from glq.hf.cuda_graph import forward_params

    name, takes_cp = forward_params(model)
    dev = model.device
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), device=dev)
    positions = [torch.tensor([prompt_len + i], device=dev) for i in range(n_tokens)]

    def call(ids, pos):
        kw = {name: cache, "position_ids": pos.unsqueeze(0)}
        if takes_cp:
            kw["cache_position"] = pos
        return step(input_ids=ids, **kw)

    rate = 0.0
    with torch.no_grad():
        for _ in range(repeats):
            cache.reset()  # in place: the static addresses a captured graph uses stay valid
            out = call(prompt, torch.arange(prompt_len, device=dev))
            tok = out.logits[:, -1].argmax(-1, keepdim=True)  # (1, 1)
            _sync()
            t0 = time.perf_counter()
            for pos in positions:
                out = call(tok, pos)
                tok = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync()
            rate = n_tokens / (time.perf_counter() - t0)
    return rate


def measure(label: str, model, args, rows: list) -> None:
    from transformers import StaticCache

    from glq.hf.cuda_graph import CUDAGraphWrapper

    max_len = args.prompt + args.tokens + 8
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    row = {"model": label, "eager_tok_s": time_decode(model, model, cache, args.prompt, args.tokens)}
    print(json.dumps(row), flush=True)
    wrapper = CUDAGraphWrapper(model)
    cache = StaticCache(config=model.config, max_cache_len=max_len)
    row["cuda_graph_tok_s"] = time_decode(wrapper, model, cache, args.prompt, args.tokens)
    row.update(graph_captures=wrapper.captures, graph_replays=wrapper.replays)
    wrapper.reset()
    rows.append(row)
    print(json.dumps(row), flush=True)


def measure_compile(label: str, model, args, rows: list) -> None:
    """torch.compile (default mode), timed after two compiling runs. ``--compile-scope layers``
    compiles each decoder layer in place (one compiled graph serves all 32 identical layers, so it
    compiles in a fraction of the whole model's time); ``model`` compiles the whole forward."""
    import torch._dynamo
    from transformers import StaticCache

    # Start from an empty compile cache: dynamo's recompile budget is per code object, so the bf16
    # model's compiles of LlamaDecoderLayer.forward would otherwise use up the GLQ model's (the
    # 2026-11-27 run lost its GLQ figure that way: every GLQ layer fell back to eager). Each layer
    # guards on its own cache layer, so layer scope compiles once per layer and input shape.
    torch._dynamo.reset()
    limit = 4 * len(model.model.layers) + 8
    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit", "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), limit))
    if args.compile_scope == "layers":
        for layer in model.model.layers:
            layer.compile()
        compiled = model
    else:
        compiled = torch.compile(model)
    cache = StaticCache(config=model.config, max_cache_len=args.prompt + args.tokens + 8)
    t0 = time.perf_counter()
    rate = time_decode(compiled, model, cache, args.prompt, args.tokens, repeats=3)
    row = next((r for r in rows if r["model"] == label), None)
    if row is None:
        rows.append(row := {"model": label})
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    row.update(compile_tok_s=rate, compile_total_s=time.perf_counter() - t0, compile_scope=args.compile_scope,
               compiled_graphs=graphs)
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = 8B)")
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--compile-only", action="store_true",
                    help="only the torch.compile row of the last rate (compiling an 8B model takes minutes)")
    ap.add_argument("--unshared", action="store_true",
                    help="also time the first rate with q/k/v and gate/up transforming their input separately")
    ap.add_argument("--compile-scope", choices=["layers", "model"], default="layers",
                    help="compile each decoder layer (fast to compile) or the whole model")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_decode needs a CUDA GPU")

    import glq.hf  # noqa: F401
    from glq.hf.testing import random_glq_model

    config = llama_8b_config(num_hidden_layers=args.layers)
    rows: list = []
    if not args.no_bf16:
        from transformers import AutoModelForCausalLM

        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
        if args.compile_only:  # the same compile scope on bf16, for comparison
            try:
                measure_compile("bf16", model, args, rows)
            except Exception as err:
                print(f"torch.compile of bf16 failed: {type(err).__name__}: {err}", flush=True)
        else:
            measure("bf16", model, args, rows)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    for i, bpw in enumerate(args.rates):
        if args.compile_only and i < len(args.rates) - 1:
            continue
        model = random_glq_model(config, bpw, device="cuda", dtype=torch.bfloat16)
        # q/k/v and gate/up run fused by default (glq.hf.linear); GLQ_HF_FUSE=0 rows are labelled -unfused
        fused = "-unfused" if os.environ.get("GLQ_HF_FUSE", "") == "0" else ""
        if not args.compile_only:
            measure(f"glq-{bpw}bpw{fused}", model, args, rows)
            if args.unshared and i == 0:  # the same model, each layer transforming its own input
                from glq.hf.linear import GLQLinear, link_shared_inputs, unfuse_siblings

                unfuse_siblings(model)  # the model came fused (the default): this row is fully unshared
                for m in model.modules():
                    if isinstance(m, GLQLinear):
                        m.shared_input = None
                measure(f"glq-{bpw}bpw-unshared", model, args, rows)
                link_shared_inputs(model)
        if i == len(args.rates) - 1 and not args.no_compile:  # last: compiling is slow and may fail
            try:
                measure_compile(f"glq-{bpw}bpw{fused}", model, args, rows)
            except Exception as err:  # report, keep the table
                print(f"torch.compile failed: {type(err).__name__}: {err}", flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    print("\n| model | eager tok/s | CUDAGraphWrapper tok/s | torch.compile tok/s |\n|---|---|---|---|")
    for r in rows:
        comp = f"{r['compile_tok_s']:.1f}" if "compile_tok_s" in r else "-"
        eager, graph = (f"{r[k]:.1f}" if k in r else "-" for k in ("eager_tok_s", "cuda_graph_tok_s"))
        print(f"| {r['model']} | {eager} | {graph} | {comp} |")
    if args.json:
        args.json.write_text(json.dumps({"versions": versions(), "layers": args.layers, "prompt": args.prompt,
                                         "tokens": args.tokens, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
