"""WikiText-2 perplexity of the offline SmolLM2-135M test model with and without the INT8 cache.

Needs the workspace (glq-quant for the test model and the text). Runs on the CPU in a few minutes:

    python packages/glq-kvcache/benchmarks/ppl_chunked.py --prefill 128 --chunk 16

Three numbers for the first 2048-token window of the WikiText-2 raw test split:
single pass without cache (``glq.quant.evaluate.perplexity``), the chunked protocol of
``glq.kvcache.evaluate`` with a plain ``DynamicCache``, and the same with ``GLQQuantizedCache``.
The model's weights were Q4_1-quantized by its packager: use the figures relatively.
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlen", type=int, default=2048)
    parser.add_argument("--prefill", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--residual-length", type=int, default=128)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--key-scheme", default="minmax")
    parser.add_argument("--value-scheme", default="absmax")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-dynamic", action="store_true", help="skip the chunked DynamicCache run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

    from glq.kvcache import GLQQuantizedCache
    from glq.kvcache.evaluate import chunked_perplexity
    from glq.quant.evaluate import perplexity, wikitext2_ids
    from glq.quant.models import smollm2_135m_path

    path = smollm2_135m_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).eval()
    ids = wikitext2_ids(tok)[:, : args.seqlen]
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args}")

    t0 = time.time()
    ref = perplexity(model, ids, seqlen=args.seqlen, limit=1).ppl
    print(f"single pass, no cache   ppl {ref:.4f}   ({time.time() - t0:.0f} s)")
    if not args.skip_dynamic:
        t0 = time.time()
        dyn = chunked_perplexity(model, ids, lambda: DynamicCache(config=model.config), args.prefill, args.chunk)
        print(f"chunked, DynamicCache   ppl {dyn:.4f}   ({time.time() - t0:.0f} s)")
    t0 = time.time()
    glq = chunked_perplexity(
        model, ids,
        lambda: GLQQuantizedCache(model.config, residual_length=args.residual_length, group_size=args.group_size,
                                  key_scheme=args.key_scheme, value_scheme=args.value_scheme),
        args.prefill, args.chunk)
    print(f"chunked, GLQ INT8 cache ppl {glq:.4f}   ({time.time() - t0:.0f} s)")
    base = ref if args.skip_dynamic else dyn
    print(f"relative increase vs {'single pass' if args.skip_dynamic else 'chunked DynamicCache'}: "
          f"{100 * (glq / base - 1):+.4f} %")


if __name__ == "__main__":
    main()
