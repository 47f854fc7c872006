"""fwht_fast_kernel against fwht_kernel (forced by misaligned signs) at batch 1 and 16, fp16, graph
replays: scripts/gpu_run.sh python3 scripts/fwht_probe.py"""

import torch

from glq.kernels._build import load_extension
from glq.kernels.api import default_blocks
from glq.kernels.benchmark import time_graph


def misaligned(t: torch.Tensor) -> torch.Tensor:
    flat = torch.empty(t.numel() + 4, dtype=t.dtype, device=t.device)
    out = flat[1:t.numel() + 1]
    out.copy_(t)
    return out


def row(n: int, batch: int) -> str:
    logs = [b.bit_length() - 1 for b in default_blocks(n)]
    s = torch.randint(0, 2, (n,), device="cuda").float() * 2 - 1
    su = misaligned(s)
    xs = [torch.randn(batch, n, device="cuda").half() for _ in range(8)]
    fast = time_graph(lambda i: torch.ops.glq_cuda.hadamard(xs[i], logs, s, None), len(xs))
    slow = time_graph(lambda i: torch.ops.glq_cuda.hadamard(xs[i], logs, su, None), len(xs))
    return f"| {n} {tuple(1 << v for v in logs)} | {batch} | {fast * 1e6:.1f} | {slow * 1e6:.1f} |"


if __name__ == "__main__":
    ok, why = load_extension()
    assert ok, why
    print("| N (blocks) | batch | fwht_fast_kernel us | fwht_kernel us |\n|---|---|---|---|")
    for n in (4096, 8192, 14336, 16384, 28672):
        for batch in (1, 16):
            print(row(n, batch), flush=True)
