"""Which kernels' programmatic dependent launches help or hurt: the full GLQ linear (fp16) timed with
GLQ_KERNELS_PDL set to each value below (read at every launch, so at graph capture). Usage on a GPU
machine: scripts/gpu_run.sh python3 scripts/pdl_probe.py"""

import os

import torch

from glq.kernels import glq_linear
from glq.kernels.benchmark import make_sets, time_graph

SETTINGS = ["1", "0", "fwht", "small,batched,mma", "fwht,small", "fwht,batched", "batched"]


def probe(out_f: int, in_f: int, batch: int, rate: int) -> str:
    n, layers, tables = make_sets(rate, out_f, in_f, batch)
    x = torch.randn(batch, in_f, device="cuda", dtype=torch.float16)
    s_in = torch.randint(0, 2, (in_f,), device="cuda").float() * 2 - 1
    s_out = torch.randint(0, 2, (out_f,), device="cuda").float() * 2 - 1
    times = []
    for setting in SETTINGS:
        os.environ["GLQ_KERNELS_PDL"] = setting
        times.append(time_graph(lambda i: glq_linear(x, layers[i][0], tables, layers[i][2], s_in, s_out), n))
    del os.environ["GLQ_KERNELS_PDL"]
    return f"| {out_f}x{in_f} | {batch} | {rate} | " + " | ".join(f"{t * 1e6:.1f}" for t in times) + " |"


if __name__ == "__main__":
    print("| out x in | batch | rate | " + " | ".join(f"PDL={s}" for s in SETTINGS) + " |")
    print("|---|---|---|" + "---|" * len(SETTINGS))
    for case in [(4096, 14336, 16, 2), (4096, 14336, 8, 2), (4096, 14336, 1, 2), (4096, 4096, 16, 2),
                 (4096, 14336, 16, 4)]:
        print(probe(*case), flush=True)
