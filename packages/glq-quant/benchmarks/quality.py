"""Quality table: quantize the offline SmolLM2-135M at several rates, WikiText-2 perplexity of each.

Protocol (../shared/ANCHORS.md section 3): calibration = shipped wikipedia text, nsamples x seqlen
= 128 x 2048; evaluation = WikiText-2 raw test, "\\n\\n".join(rows), non-overlapping 2048-token
windows, the first 40 and all 148, fp32. The test model's weights were Q4_1-quantized by its
packager: figures are for relative comparison (Δ = ppl / ppl_unquantized - 1).

    python packages/glq-quant/benchmarks/quality.py --device cuda --rates 2 3 4 2.5 3.5 --out results.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--rates", nargs="+", type=float, default=[2, 3, 4])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--tune-iters", type=int, default=0)
    ap.add_argument("--finetune-epochs", type=int, nargs="+", default=[2],
                    help="block fine-tuning epochs; several values run every rate once per value")
    ap.add_argument("--finetune-model-epochs", type=int, default=None,
                    help="whole-model fine-tuning epochs (default: the pipeline's, 2 where it fits)")
    ap.add_argument("--windows", type=int, default=None, help="evaluate only this many windows")
    ap.add_argument("--min-bpw", type=int, default=None, help="lowest rate a fractional target may use")
    ap.add_argument("--max-bpw", type=int, default=None, help="highest rate a fractional target may use")
    ap.add_argument("--out", default=None, help="write the rows as JSON here")
    ap.add_argument("--keep", default=None, help="keep the GLQ folders under this folder")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glq.quant.evaluate import perplexity, wikitext2_ids
    from glq.quant.models import resolve_model
    from glq.quant.pipeline import quantize_with_model

    path = resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    ids = wikitext2_ids(tok)

    def evaluate(model) -> dict:
        model = model.to(args.device).eval()
        r40 = perplexity(model, ids, limit=min(40, args.windows or 40))
        full = r40 if args.windows is not None and args.windows <= 40 else perplexity(model, ids, limit=args.windows)
        model.to("cpu")
        return {"ppl40": r40.ppl, "ppl_all": full.ppl, "windows_all": full.windows}

    rows = []
    base = evaluate(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32))
    rows.append({"model": "unquantized (fp32)", **base})
    print(json.dumps(rows[-1]), flush=True)
    for rate, ft in [(r, e) for r in args.rates for e in args.finetune_epochs]:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(args.keep) / f"glq-{rate:g}bpw-ft{ft}" if args.keep else Path(tmp) / "glq"
            start = time.perf_counter()
            summary, model = quantize_with_model(
                args.model, out, bpw=rate, nsamples=args.nsamples, seqlen=args.seqlen, device=args.device,
                tune_iters=args.tune_iters, min_bpw=args.min_bpw, max_bpw=args.max_bpw, progress=False,
                finetune_epochs=ft, finetune_model_epochs=args.finetune_model_epochs)
            seconds = time.perf_counter() - start
            model_epochs = next((v["finetune_model"]["epochs"] for v in summary["layers"].values()
                                 if "finetune_model" in v), 0)
            res = evaluate(model)
            rows.append({
                "model": f"glq {rate:g} bpw" + (f", fine-tuned {ft} ep." if ft else "")
                + (f", model-tuned {model_epochs} ep." if model_epochs else ""),
                "bpw_codes": summary["bpw_codes"],
                "bpw_with_overhead": summary["bpw_with_overhead"], "quantized_bytes": summary["quantized_bytes"],
                **res, "delta_all": res["ppl_all"] / base["ppl_all"] - 1, "seconds": round(seconds, 1),
                "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
                "tune_iters": args.tune_iters,
                **{k: v for k, v in summary.items() if k.startswith("model_tuning_held_out")},
            })
            print(json.dumps(rows[-1]), flush=True)
    print("| model | bpw (codes) | bpw (with scales, signs) | ppl (40) | ppl (all) | Δ (all) | time |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r.get('bpw_codes', '-') if 'bpw_codes' not in r else round(r['bpw_codes'], 3)} | "
              f"{round(r['bpw_with_overhead'], 3) if 'bpw_with_overhead' in r else '-'} | {r['ppl40']:.2f} | "
              f"{r['ppl_all']:.2f} | {r.get('delta_all', 0):.3f} | {r.get('seconds', '-')} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
