"""GPU memory of a GLQ model: torch.cuda.max_memory_allocated after building/loading an
8B-shaped Llama at 2, 3 and 4 bpw, next to the same model's bf16 size.

Two ways to get the model onto the GPU:

* default: build the GLQ module tree straight on the GPU (glq.hf.testing.random_glq_model; the
  skeleton lives on the meta device, no bf16 weight is ever allocated);
* ``--via-folder DIR``: additionally write that model as a GLQ folder under DIR and load it
  with ``AutoModelForCausalLM.from_pretrained(DIR/..., device_map="cuda")`` in a fresh process
  state, which is what a user does (needs ~4-7 GB of disk per rate).

Run from the repository root with the workspace on the path::

    PYTHONPATH=$(ls -d packages/*/src | paste -sd:) python packages/glq-hf/benchmarks/bench_memory.py
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _models import bf16_bytes, llama_8b_config, versions

GiB = 1024**3


def _reset():
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()


def held_bytes(model) -> dict:
    """What the model holds, by kind (bytes)."""
    from glq.hf.linear import GLQLinear

    kinds = {"codes": 0, "scales_signs": 0, "unquantized": 0, "tables": 0}
    for name, t in model.state_dict().items():
        n = t.numel() * t.element_size()
        if name.startswith("glq_tables."):
            kinds["tables"] += n
        elif ".codes_" in name:
            kinds["codes"] += n
        elif name.endswith((".row_scale", ".signs_in", ".signs_out")):
            kinds["scales_signs"] += n
        else:
            kinds["unquantized"] += n
    derived = sum(b.numel() * b.element_size() for m in model.modules() if isinstance(m, GLQLinear)
                  for n, b in m.named_buffers(recurse=False) if n.startswith("_"))
    kinds["derived_float_signs"] = derived
    return kinds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=int, nargs="+", default=[2, 3, 4])
    ap.add_argument("--layers", type=int, default=32, help="decoder layers (32 = 8B)")
    ap.add_argument("--via-folder", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_memory needs a CUDA GPU")

    import glq.hf  # noqa: F401
    from glq.hf.testing import random_glq_model

    config = llama_8b_config(num_hidden_layers=args.layers)
    bf16 = bf16_bytes(config)
    rows = []
    for bpw in args.rates:
        _reset()
        model = random_glq_model(config, bpw, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
        row = {"bpw": bpw, "mode": "built on GPU", "max_allocated_GiB": torch.cuda.max_memory_allocated() / GiB,
               "allocated_GiB": torch.cuda.memory_allocated() / GiB, "bf16_GiB": bf16 / GiB,
               "held_GiB": {k: v / GiB for k, v in held_bytes(model).items()}}
        with torch.no_grad():
            torch.cuda.reset_peak_memory_stats()
            model(torch.tensor([[1, 2, 3, 4]], device="cuda"))
            torch.cuda.synchronize()
        row["max_allocated_forward4_GiB"] = torch.cuda.max_memory_allocated() / GiB
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.via_folder is not None:
            folder = args.via_folder / f"llama8b-shape-glq{bpw}"
            model.save_pretrained(folder)
            del model
            _reset()
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(folder, device_map="cuda", dtype=torch.bfloat16)
            torch.cuda.synchronize()
            row = {"bpw": bpw, "mode": "from_pretrained", "max_allocated_GiB": torch.cuda.max_memory_allocated() / GiB,
                   "allocated_GiB": torch.cuda.memory_allocated() / GiB, "bf16_GiB": bf16 / GiB}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
    summary = {"versions": versions(), "layers": args.layers, "bf16_GiB": bf16 / GiB, "rows": rows}
    print("\n| bpw | mode | max_memory_allocated (GiB) | bf16 weights (GiB) | ratio |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bpw']} | {r['mode']} | {r['max_allocated_GiB']:.2f} | {r['bf16_GiB']:.2f} | "
              f"{r['max_allocated_GiB'] / r['bf16_GiB']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
