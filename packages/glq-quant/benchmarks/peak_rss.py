"""Peak host memory (RSS) of a quantization run, with and without streaming.

Each configuration runs in its own process; the peak RSS is read from getrusage of that process.

    python packages/glq-quant/benchmarks/peak_rss.py --bpw 2 --nsamples 16 --seqlen 512
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = """
import json, resource, sys, time
from glq.quant import quantize
args = json.loads(sys.argv[1])
t = time.perf_counter()
quantize(**args, progress=False)
print(json.dumps({"seconds": round(time.perf_counter() - t, 1),
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--bpw", type=float, default=2)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    from glq.quant.models import resolve_model

    path = resolve_model(args.model)  # convert once, outside the measured processes
    for streaming in (False, True):
        with tempfile.TemporaryDirectory() as tmp:
            run = {"model": path, "output_dir": f"{tmp}/glq", "bpw": args.bpw, "nsamples": args.nsamples,
                   "seqlen": args.seqlen, "device": args.device, "streaming": streaming}
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(run)], capture_output=True, text=True,
                                 check=True)
            print(json.dumps({"streaming": streaming, **json.loads(out.stdout.strip().splitlines()[-1]),
                              "bpw": args.bpw, "nsamples": args.nsamples, "seqlen": args.seqlen}), flush=True)


if __name__ == "__main__":
    main()
