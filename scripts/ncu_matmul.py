"""A few GLQ matmul launches for Nsight Compute to profile (4096x14336, batch 1, rates 2 and 4).

    ncu --section SpeedOfLight --section WarpStateStats -k regex:glq python3 scripts/ncu_matmul.py
"""

import torch

from glq.kernels import matmul
from glq.kernels.benchmark import make_sets

for rate in (2, 4):
    _, layers, tables = make_sets(rate, 4096, 14336, 1)
    x = torch.randn(1, 14336, device="cuda", dtype=torch.bfloat16)
    for i in range(3):
        matmul(x, layers[i % len(layers)][0], tables, layers[i % len(layers)][2])
    torch.cuda.synchronize()
