"""GPU correctness of the CUDA C and Triton backends against the plain-PyTorch references.

Run on a GPU machine: ``pytest tests/kernels -m cuda``. Select cases by id, e.g. ``-k "r2-"``.
"""

from __future__ import annotations

import pytest
import torch

from glq.kernels import dequantize, glq_linear, glq_linear_reference, hadamard
from glq.kernels.fwht.reference import hadamard_reference
from glq.kernels.testing import (
    exact_matmul,
    kernel_numerics_model,
    kernel_tolerance,
    random_layer,
    rel_error,
    unit_roundoff,
)

pytestmark = pytest.mark.cuda

# (out, in): awkward sizes from the issue, both orientations of the big ones, and in=8/24
# (fewer than 8 groups: the scalar-load path).
SHAPES = [
    (8, 8),
    (24, 24),
    (8, 2688),
    (960, 24),
    (576, 1536),
    (1536, 576),
    (960, 2688),
    (2688, 960),
    (4096, 4096),
    (4096, 14336),
    (14336, 4096),
]
BATCHES = [1, 2, 7, 16, 64]
DTYPES = [torch.float16, torch.bfloat16]
# Tolerances: glq.kernels.testing.kernel_tolerance (4x plain PyTorch's own error in the same
# dtype, plus one unit roundoff per extra stage).


def _backend_matmul(backend, x, codes, tables, row_scale):
    table = tables.table(x.dtype, x.device)
    if backend == "cuda":
        rate = tables.rate
        return torch.ops.glq_cuda.matmul(x, codes, table, row_scale, rate, tables.gain, 0, 0)
    from glq.kernels.qmatmul.triton import matmul_triton

    return matmul_triton(x, codes, table, row_scale, tables.bits, tables.gain)


@pytest.fixture(scope="module")
def cuda_ext():
    from glq.kernels._build import load_extension

    ok, why = load_extension()
    if not ok:
        pytest.fail(f"CUDA C backend did not build: {why}")


@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("rate", range(2, 9), ids=lambda r: f"r{r}")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_matmul_matches_reference(cuda_ext, backend, rate, shape):
    out_f, in_f = shape
    if backend == "triton" and out_f * in_f > 4096 * 4096 and rate > 2:
        pytest.skip("Triton fallback: big shapes checked at rate 2 only (time)")
    codes, tables, row_scale = random_layer(rate, out_f, in_f, seed=rate * 7 + out_f, device="cuda")
    w = dequantize(codes, tables, row_scale)  # (out, in) float32
    failures = []
    for dtype in DTYPES:
        for b in BATCHES:
            x = torch.randn(b, in_f, device="cuda").to(dtype)
            exact = exact_matmul(x, w)
            tol = kernel_tolerance(x, w, exact, len(tables.bits))
            y = _backend_matmul(backend, x, codes, tables, row_scale)
            err = rel_error(y, exact)
            if not err <= tol:
                failures.append(f"{dtype} B={b}: err {err:.3g} > tolerance {tol:.3g}")
            if backend == "cuda":
                # same roundings as the kernel, so only float32 summation order may differ
                model = kernel_numerics_model(x, codes, tables, row_scale)
                em = rel_error(y, model)
                if not em <= 2 * unit_roundoff(dtype):
                    failures.append(f"{dtype} B={b}: {em:.3g} from the numerics model")
    assert not failures, "; ".join(failures)


@pytest.mark.parametrize("rate", [2, 3, 4, 8], ids=lambda r: f"r{r}")
def test_matmul_deterministic(cuda_ext, rate):
    """Bit-identical outputs run to run at every batch size (split-K included)."""
    for out_f, in_f in [(4096, 14336), (576, 1536), (14336, 4096)]:
        codes, tables, row_scale = random_layer(rate, out_f, in_f, seed=3, device="cuda")
        for b in BATCHES:
            for dtype in DTYPES:
                x = torch.randn(b, in_f, device="cuda").to(dtype)
                first = _backend_matmul("cuda", x, codes, tables, row_scale)
                for _ in range(5):
                    again = _backend_matmul("cuda", x, codes, tables, row_scale)
                    assert torch.equal(first, again), f"{out_f}x{in_f} B={b} {dtype}"


def test_matmul_forced_splits_agree(cuda_ext):
    """Every split-K choice and table replication computes the same function."""
    codes, tables, row_scale = random_layer(2, 4096, 14336, seed=5, device="cuda")
    x = torch.randn(1, 14336, device="cuda").half()
    w = dequantize(codes, tables, row_scale)
    exact = exact_matmul(x, w)
    tol = kernel_tolerance(x, w, exact, 1)
    table = tables.table(x.dtype, x.device)
    for rep in (1, 2, 4, 8):
        for ks in (1, 2, 7, 56):
            y = torch.ops.glq_cuda.matmul(x, codes, table, row_scale, 2, tables.gain, rep, ks)
            assert rel_error(y, exact) <= tol, (rep, ks)


def _inputs(w: torch.Tensor, tables, batches):
    """(batch, dtype, x, fp64 product, tolerance, table in x's dtype) for each batch and dtype: random x rows on
    w's device."""
    for b in batches:
        for dtype in DTYPES:
            x = torch.randn(b, w.shape[1], device=w.device).to(dtype)
            exact = exact_matmul(x, w)
            yield b, dtype, x, exact, kernel_tolerance(x, w, exact, len(tables.bits)), tables.table(dtype, x.device)


def _hadamard_tol(ref: torch.Tensor, dtype: torch.dtype) -> float:
    """4x the reference's own rounding of the output to dtype; fp32: summation order alone."""
    return 4 * rel_error(ref.to(dtype), ref) + 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("n", [8, 64, 576, 960, 1536, 2688, 4096, 14336, 32768])
def test_hadamard_matches_reference(cuda_ext, dtype, n):
    for rows in (1, 3, 64):
        x = torch.randn(rows, n, device="cuda").to(dtype)
        s = torch.randint(0, 2, (n,), device="cuda").float() * 2 - 1
        so = torch.randint(0, 2, (n,), device="cuda").float() * 2 - 1
        from glq.kernels.api import default_blocks

        blocks = default_blocks(n)
        z = hadamard(x, blocks, s, so)
        ref = hadamard_reference(x.to(torch.float64), blocks, s, so)
        assert rel_error(z, ref) <= _hadamard_tol(ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_hadamard_every_block_size(cuda_ext, dtype):
    """The raw op against the reference for every single block size 1..2^14 (2^15 is in the test
    above; its dense reference matrix is 8 GiB) and ragged block lists, one and several rows,
    with and without input/output signs (bad blocks: test_binding_errors_raise)."""
    from glq.kernels.api import default_blocks

    cases = [[1 << k] for k in range(15)] + [default_blocks(n) for n in (24, 576, 960, 2688, 14336)]
    for blocks in cases:
        n = sum(blocks)
        logs = [b.bit_length() - 1 for b in blocks]
        for rows in (1, 5):
            x = torch.randn(rows, n, device="cuda").to(dtype)
            s = torch.randint(0, 2, (n,), device="cuda").float() * 2 - 1
            for signs in ((None, None), (s, None), (None, s), (s, s.flip(0).contiguous())):
                z = torch.ops.glq_cuda.hadamard(x, logs, *signs)
                ref = hadamard_reference(x.to(torch.float64), blocks, *signs)
                assert rel_error(z, ref) <= _hadamard_tol(ref, dtype), (blocks, rows, *(t is None for t in signs))


def _unaligned_copy(t: torch.Tensor) -> torch.Tensor:
    """t's values at an address 4 bytes past 16-byte alignment (contiguous): the FWHT op then takes
    fwht_kernel (one level per shared-memory pass) instead of fwht_fast_kernel, which needs aligned data."""
    flat = torch.empty(t.numel() + 4, dtype=t.dtype, device=t.device)
    out = flat[1:t.numel() + 1].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("cta_log2", ["", "8", "10"])
def test_fast_fwht_is_the_block_kernel_bit_for_bit(cuda_ext, dtype, cta_log2, monkeypatch):
    """fwht_fast_kernel (registers, shuffles, two exchanges; every aligned block of 8..32768 points,
    blocks above 2^cta_log2 points split over 2..8 CTAs) gives fwht_kernel's values bit for bit: every
    block size, ragged lists in any order, 1..64 rows, input and output signs, with the default split
    and two smaller ones (GLQ_KERNELS_FWHT_CTA_LOG2)."""
    monkeypatch.setenv("GLQ_KERNELS_FWHT_CTA_LOG2", cta_log2)
    from glq.kernels.api import default_blocks

    cases = [[1 << k] for k in range(3, 16)] + [list(default_blocks(n)) for n in (24, 576, 960, 2688, 14336, 28672)]
    cases += [[4096, 4096], [1024] * 8, [8, 2048, 64, 4096], [16384, 8, 512], [32768, 8192, 8]]
    for blocks in cases:
        n = sum(blocks)
        logs = [b.bit_length() - 1 for b in blocks]
        for rows in (1, 3, 64):
            x = torch.randn(rows, n, device="cuda").to(dtype) * 4
            s = torch.randint(0, 2, (n,), device="cuda").float() * 2 - 1
            so = torch.randint(0, 2, (n,), device="cuda").float() * 2 - 1
            for signs in ((None, None), (s, None), (s, so), (None, so)):
                fast = torch.ops.glq_cuda.hadamard(x, logs, *signs)
                if signs[0] is None:  # no input signs to misalign: misalign x's rows instead
                    xu = torch.empty(rows, n + 8, device="cuda", dtype=dtype)[:, 1:n + 1]
                    xu.copy_(x)
                    slow = torch.ops.glq_cuda.hadamard(xu, logs, *signs)
                else:
                    slow = torch.ops.glq_cuda.hadamard(x, logs, _unaligned_copy(signs[0]), signs[1])
                assert torch.equal(fast, slow), (blocks, rows, *(t is None for t in signs))


def test_programmatic_launches_change_no_result(cuda_ext, monkeypatch):
    """Matmul and FWHT kernels launched as programmatic dependent launches (the default on compute
    capability >= 9) give the same bits as plain launches, eagerly and in a CUDA graph, along a chain
    where each GLQ linear reads the previous one's output (the case where a kernel starting early
    must wait for its input) at batch 1 (split-K), 5 and 16."""
    chain = []
    for r, o, i in [(2, 4096, 1536), (4, 1536, 4096), (3, 576, 1536), (2, 14336, 576), (2, 576, 14336)]:
        codes, tables, row_scale = random_layer(r, o, i, seed=o + r, device="cuda")
        # unit gain on unit-RMS inputs, so five layers in a row stay far from fp16 overflow
        gain = glq_linear(torch.randn(8, i, device="cuda").half(), codes, tables, row_scale).float().pow(2).mean()
        chain.append((codes, tables, row_scale / gain.sqrt()))
    signs = [(torch.randint(0, 2, (layer[0][0].shape[1] * 8,), device="cuda").float() * 2 - 1) for layer in chain]

    def run(x):
        for (codes, tables, row_scale), s in zip(chain, signs, strict=True):
            x = glq_linear(x, codes, tables, row_scale, s, None)
        return x

    for b in (1, 5, 16):
        x = torch.randn(b, 1536, device="cuda").half()
        monkeypatch.setenv("GLQ_KERNELS_PDL", "0")
        plain = run(x)
        monkeypatch.delenv("GLQ_KERNELS_PDL")
        assert plain.isfinite().all() and plain.abs().max() > 0, b
        assert torch.equal(run(x), plain), b
        g = torch.cuda.CUDAGraph()
        xs = x.clone()
        run(xs)
        torch.cuda.synchronize()
        with torch.cuda.graph(g):
            y = run(xs)
        for _ in range(3):
            xs.copy_(torch.randn_like(xs))
            g.replay()
            monkeypatch.setenv("GLQ_KERNELS_PDL", "0")
            want = run(xs)
            monkeypatch.delenv("GLQ_KERNELS_PDL")
            assert torch.equal(y, want), b


def test_glq_linear_matches_reference(cuda_ext):
    for out_f, in_f in [(576, 1536), (4096, 14336), (2688, 960)]:
        codes, tables, row_scale = random_layer(2, out_f, in_f, seed=9, device="cuda")
        s_in = torch.randint(0, 2, (in_f,), device="cuda").float() * 2 - 1
        s_out = torch.randint(0, 2, (out_f,), device="cuda").float() * 2 - 1
        for b in (1, 16):
            x = torch.randn(b, in_f, device="cuda").half()
            y = glq_linear(x, codes, tables, row_scale, s_in, s_out)
            ref = glq_linear_reference(x, codes, tables, row_scale, s_in, s_out)
            # two extra fp16 roundings (after each transform) over the matmul's own error
            assert rel_error(y, ref) < 5e-3


def test_public_matmul_uses_cuda(cuda_ext, monkeypatch):
    from glq.kernels import matmul, select_backend

    monkeypatch.delenv("GLQ_KERNELS_BACKEND", raising=False)
    assert select_backend("cuda") == "cuda"
    codes, tables, row_scale = random_layer(4, 960, 2688, device="cuda")
    x = torch.randn(2, 5, 2688, device="cuda").bfloat16()
    y = matmul(x, codes, tables, row_scale)
    assert y.shape == (2, 5, 960) and y.dtype == torch.bfloat16
    graph_x = x.reshape(-1, 2688)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gy = matmul(graph_x, codes, tables, row_scale)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(gy, y.reshape(-1, 960))


@pytest.mark.parametrize("rate", [2, 3, 4, 5, 8], ids=lambda r: f"r{r}")
def test_small_batch_kernel_variants_agree(cuda_ext, rate):
    """Forced small-batch kernel (variant 2) at several split-K counts and the MMA kernel (variant
    1) at batch <= 8 all match the reference; auto (0) picks the small-batch kernel there."""
    for out_f, in_f in [(4096, 14336), (960, 2688), (24, 24), (1536, 576)]:
        codes, tables, row_scale = random_layer(rate, out_f, in_f, seed=11, device="cuda")
        w = dequantize(codes, tables, row_scale)
        for b, dtype, x, exact, tol, table in _inputs(w, tables, (1, 3, 8)):
            dcode = 0 if dtype == torch.float16 else 1
            plan = torch.ops.glq_cuda.matmul_plan(b, out_f, in_f, rate, dcode, 0, 0, 0, 0)
            assert plan[6] == 2, plan
            for variant, ks in [(1, 0), (2, 0), (2, 1), (2, 3), (2, 64)]:
                y = torch.ops.glq_cuda.matmul(x, codes, table, row_scale, rate, tables.gain, 0, ks, variant)
                assert rel_error(y, exact) <= tol, (out_f, in_f, b, dtype, variant, ks)


@pytest.mark.parametrize("rate", [2, 3], ids=lambda r: f"r{r}")
def test_small_batch_kernel_warp_counts_agree(cuda_ext, rate, monkeypatch):
    """At rates 2-3 the small-batch kernel runs 16 warps per CTA or 8 (two CTAs per SM; GLQ_KERNELS_V4_WARPS
    forces either): both match the reference and repeat bit for bit at awkward shapes, batches, splits and both
    code layouts; the plan reports the warp count, 8 where 16-warp CTAs would take several rounds (28672 rows:
    448 row blocks), 16 at rate 4."""
    from glq.kernels.layout import can_tile, tile_codes
    from glq.kernels.ops import TILED

    plan = torch.ops.glq_cuda.matmul_plan
    monkeypatch.delenv("GLQ_KERNELS_V4_WARPS", raising=False)
    assert plan(1, 28672, 4096, rate, 0, 0, 0, 0, 0)[8] == 8
    assert plan(1, 4096, 14336, 4, 0, 0, 0, 0, 0)[8] == 16
    for warps in (16, 8):
        monkeypatch.setenv("GLQ_KERNELS_V4_WARPS", str(warps))
        assert plan(1, 28672, 4096, rate, 0, 0, 0, 0, 2)[8] == warps
        for out_f, in_f in [(960, 2688), (24, 24), (1536, 576), (4096, 4096)]:
            codes, tables, row_scale = random_layer(rate, out_f, in_f, seed=3, device="cuda")
            w = dequantize(codes, tables, row_scale)
            layouts = [(codes, 2)] + ([(tile_codes(codes), 2 | TILED)] if can_tile(out_f, in_f) else [])
            for b, dtype, x, exact, tol, table in _inputs(w, tables, (1, 3, 8)):
                for (c, variant), ks in ((lv, ks) for lv in layouts for ks in (0, 1, 3)):
                    y = torch.ops.glq_cuda.matmul(x, c, table, row_scale, rate, tables.gain, 0, ks, variant)
                    assert rel_error(y, exact) <= tol, (warps, out_f, in_f, b, dtype, variant, ks)
                    again = torch.ops.glq_cuda.matmul(x, c, table, row_scale, rate, tables.gain, 0, ks, variant)
                    assert torch.equal(y, again), (warps, out_f, in_f, b, dtype, variant, ks)


@pytest.mark.parametrize("rate", [4, 5, 6, 7, 8], ids=lambda r: f"r{r}")
def test_small_batch_kernel_table_copies_give_identical_results(cuda_ext, rate):
    """At rates 4-8 the small-batch kernel holds 8 or 4 copies of its first two stage tables (rate 8: of its
    first; 8 from kWideTableWeights = 8 M weights on, within kWideMaxSmem): the copies only move lookups between
    banks, so both give the same bits, at awkward shapes, batches and splits; and the plan picks 8 on a large
    layer, 4 on a smaller one, and 4 where 8 would take more shared memory (rate 7 at batch 8)."""
    for out_f, in_f in [(960, 2688), (24, 24), (4096, 8 * 1001)]:
        codes, tables, row_scale = random_layer(rate, out_f, in_f, seed=7, device="cuda")
        for b in (1, 5, 8):
            for dtype in DTYPES:
                x = torch.randn(b, in_f, device="cuda").to(dtype)
                table = tables.table(dtype, x.device)
                for ks in (0, 3):
                    y4, y8 = (
                        torch.ops.glq_cuda.matmul(x, codes, table, row_scale, rate, tables.gain, rep, ks, 2)
                        for rep in (4, 8)
                    )
                    assert torch.equal(y4, y8), (out_f, in_f, b, dtype, ks)
    assert torch.ops.glq_cuda.matmul_plan(1, 4096, 14336, rate, 0, 0, 0, 0, 0)[4] == 8
    assert torch.ops.glq_cuda.matmul_plan(8, 4096, 14336, rate, 0, 0, 0, 0, 0)[4] == (4 if rate == 7 else 8)
    assert torch.ops.glq_cuda.matmul_plan(1, 2048, 4096, rate, 0, 0, 0, 0, 0)[4] == 8
    assert torch.ops.glq_cuda.matmul_plan(1, 2048, 2048, rate, 0, 0, 0, 0, 0)[4] == 4


@pytest.mark.parametrize("rate", range(2, 9), ids=lambda r: f"r{r}")
def test_row_tile_step_kernel_matches_reference_and_repeats(cuda_ext, rate):
    """Variant 4 (small-batch kernel with (slice, row tile) steps, opt-in) matches the reference at
    awkward shapes, batches and split counts, and repeats itself bit for bit."""
    for out_f, in_f in [(4096, 14336), (960, 2688), (24, 24), (1536, 576), (8, 8 * 1001), (576, 1536)]:
        codes, tables, row_scale = random_layer(rate, out_f, in_f, seed=5, device="cuda")
        w = dequantize(codes, tables, row_scale)
        for b, dtype, x, exact, tol, table in _inputs(w, tables, (1, 2, 7, 8)):
            for ks in (0, 1, 3, 64):
                y = torch.ops.glq_cuda.matmul(x, codes, table, row_scale, rate, tables.gain, 0, ks, 4)
                assert rel_error(y, exact) <= tol, (out_f, in_f, b, dtype, ks)
                again = torch.ops.glq_cuda.matmul(x, codes, table, row_scale, rate, tables.gain, 0, ks, 4)
                assert torch.equal(y, again), (out_f, in_f, b, dtype, ks)


def test_prefer_flag_plans_the_kernel_or_falls_back_without_raising(cuda_ext):
    """variant | 16: that kernel where it can be planned, else auto's choice, with no error (ops.py's
    way of asking for the newer kernels without relying on C++ exceptions)."""
    from glq.kernels.ops import PREFER

    plan = torch.ops.glq_cuda.matmul_plan
    assert plan(1, 64, 128, 3, 0, 0, 0, 0, 4 | PREFER)[6] == 4  # the row-tile kernel plans
    assert plan(1, 64, 128, 5, 0, 0, 0, 0, 4 | PREFER)[6] == 4  # at every rate since stop 24
    assert plan(9, 64, 128, 3, 0, 0, 0, 0, 4 | PREFER)[6] == 1  # 9 rows: the MMA kernel
    assert plan(16, 64, 128, 3, 0, 0, 0, 0, 3 | PREFER)[6] == 3
    assert plan(16, 64, 128, 5, 0, 0, 0, 0, 3 | PREFER)[6] == 1
    codes, tables, row_scale = random_layer(5, 64, 128, seed=2, device="cuda")
    x = torch.randn(9, 128, device="cuda").half()  # past the row-tile kernel's 8 rows: auto's MMA kernel
    table = tables.table(x.dtype, x.device)
    auto = torch.ops.glq_cuda.matmul(x, codes, table, row_scale, 5, tables.gain, 0, 0, 0)
    assert torch.equal(torch.ops.glq_cuda.matmul(x, codes, table, row_scale, 5, tables.gain, 0, 0, 4 | PREFER), auto)


# --- large-batch (prefill) path: glq_cuda.dequantize + cuBLAS ---------------------------------------

DENSE_SHAPES = [(8, 8), (24, 24), (960, 24), (8, 2688), (3, 8 * 1001), (1536, 576), (2688, 960), (4096, 14336)]


@pytest.mark.parametrize("rate", range(2, 9), ids=lambda r: f"r{r}")
def test_dequantize_kernel_is_the_reference_bit_for_bit(cuda_ext, rate):
    """glq_cuda.dequantize == dequantize_reference(...).to(dtype), compared as bit patterns (so -0
    and +0 differ): same float32 operations in the same order, then one round-to-nearest-even.
    Row scales span fp16 overflow (inf) and subnormal outputs, where the one-rounding claim bites."""
    for out_f, in_f in DENSE_SHAPES:
        codes, tables, row_scale = random_layer(rate, out_f, in_f, seed=rate * 5 + out_f, device="cuda")
        row_scale = row_scale.clone()
        row_scale[0] = 3e5  # |W| past fp16's 65504 on this row: inf in both
        if out_f > 2:
            row_scale[1] = 2e-7  # fp16 subnormals
        ref = dequantize(codes, tables, row_scale)  # (out, in) float32, the reference decode
        table = tables.table(torch.float32, "cuda")
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            as_int = torch.int32 if dtype == torch.float32 else torch.int16
            w = torch.ops.glq_cuda.dequantize(codes, table, row_scale, rate, tables.gain, dtype)
            assert w.dtype == dtype and w.shape == (out_f, in_f)
            want = ref.to(dtype)
            diff = (w.view(as_int) != want.view(as_int)).sum().item()
            assert diff == 0, f"{out_f}x{in_f} {dtype}: {diff} values differ"


# Each case makes a binding's TORCH_CHECK throw. Two GPU runs (2026-11-27, H200, torch 2.11.0+cu130)
# died with SIGSEGV inside such a call instead of raising, so they run in a child process: a crash
# fails this test with the case it died in, and the rest of the suite still runs.
_ERROR_CASES = r"""
import sys, torch
from glq.kernels._build import load_extension
from glq.kernels.testing import random_layer
ok, why = load_extension()
assert ok, why
codes, tables, row_scale = random_layer(3, 16, 64, device="cuda")
table = tables.table(torch.float32, "cuda")
x = torch.randn(2, 24, device="cuda")
cases = {  # torch's own check first: if that crashes too, the machine rather than our build is at fault
    "torch-cannot be multiplied": lambda: torch.ones(2, 3, device="cuda") @ torch.ones(4, 5, device="cuda"),
    "plan-matmul_plan": lambda: torch.ops.glq_cuda.matmul_plan(1, 16, 64, 9, 0, 0, 0, 0, 0),
    # 16 x 64: in_features 64 has no tiled layout (glq.kernels.layout)
    "matmul-tiled codes need": lambda: torch.ops.glq_cuda.matmul(torch.randn(1, 64, device="cuda").half(), codes,
                                                                 tables.table(torch.float16, "cuda"), row_scale, 3,
                                                                 tables.gain, 0, 0, 32),
    "tiled dequantize-tiled codes need": lambda: torch.ops.glq_cuda.dequantize(codes, table, row_scale, 3,
                                                                               tables.gain, torch.float16, True),
    "hadamard-blocks cover": lambda: torch.ops.glq_cuda.hadamard(x, [3], None, None),
    "dequantize-rate": lambda: torch.ops.glq_cuda.dequantize(codes, table, row_scale, 5, tables.gain, torch.float16),
    "dequantize-float32": lambda: torch.ops.glq_cuda.dequantize(codes, table.half(), row_scale, 3, tables.gain,
                                                                torch.float16),
    "dequantize-dtype": lambda: torch.ops.glq_cuda.dequantize(codes, table, row_scale, 3, tables.gain, torch.int32),
}
for name, call in cases.items():
    print("case", name, flush=True)
    try:
        call()
    except RuntimeError as e:
        print("raised", name, "|", str(e).splitlines()[0], flush=True)
    else:
        print("returned", name, flush=True)
"""


def test_binding_errors_raise(cuda_ext):
    """Bad arguments that only the C++ binding checks raise RuntimeError naming the problem (rate,
    block cover, table dtype, output dtype, a tiled layout the shape cannot have) rather than crashing the
    process."""
    import os
    import subprocess
    import sys

    runs = {}
    for label, extra in (("default", {}), ("no C++ stack traces", {"TORCH_SHOW_CPP_STACKTRACES": "0",
                                                                    "TORCH_DISABLE_ADDR2LINE": "1"})):
        r = subprocess.run([sys.executable, "-X", "faulthandler", "-c", _ERROR_CASES], capture_output=True, text=True,
                           timeout=300,
                           env={**os.environ, **extra})
        runs[label] = (r.returncode, r.stdout, r.stderr[-3000:])
    code, out, err = runs["default"]
    if code != 0:  # both runs' whole output (pytest would cut an assert message) says which case died
        report = [f"[{label}] exit {rc}\nstdout:\n{o}\nstderr:\n{e}" for label, (rc, o, e) in runs.items()]
        pytest.fail("\n\n".join(report), pytrace=False)
    lines = out.splitlines()
    names = ("torch-cannot be multiplied", "plan-matmul_plan", "hadamard-blocks cover", "dequantize-rate",
             "dequantize-float32", "dequantize-dtype", "matmul-tiled codes need", "tiled dequantize-tiled codes need")
    for name in names:
        raised = [ln for ln in lines if ln.startswith(f"raised {name} |")]
        assert raised, (name, out, err)
        assert name.split("-", 1)[1] in raised[0].split("|", 1)[1], raised[0]


@pytest.mark.parametrize("rate", [2, 3, 4, 8], ids=lambda r: f"r{r}")
def test_large_batch_matmul_takes_the_dense_path(cuda_ext, rate, monkeypatch):
    """By default, batches past DENSE_BATCH_THRESHOLD: exactly F.linear on the reference weight
    rounded once to x's dtype (so the dense path ran with the CUDA decode kernel, not chunks of the
    fused kernel), and within the kernels' tolerance of the float64 product. Also through
    glq_linear, 3-D inputs and a CUDA graph. With GLQ_KERNELS_DEQUANT=0: the chunked fused kernels,
    within the same tolerance."""
    import torch.nn.functional as F

    monkeypatch.delenv("GLQ_KERNELS_DEQUANT", raising=False)
    from glq.kernels import matmul, ops

    for out_f, in_f in [(4096, 14336), (2688, 960), (24, 24)]:
        codes, tables, row_scale = random_layer(rate, out_f, in_f, seed=rate + 1, device="cuda")
        w = dequantize(codes, tables, row_scale)
        for b in (ops.DENSE_BATCH_THRESHOLD + 1, 65, 200, 2048):
            for dtype in DTYPES:
                x = torch.randn(b, in_f, device="cuda").to(dtype)
                y = matmul(x, codes, tables, row_scale)
                assert torch.equal(y, F.linear(x, w.to(dtype))), (out_f, in_f, b, dtype)
                exact = exact_matmul(x, w)
                tol = kernel_tolerance(x, w, exact, len(tables.bits))
                assert rel_error(y, exact) <= tol, (out_f, in_f, b, dtype)
    x3 = torch.randn(4, 50, in_f, device="cuda").half()
    y3 = matmul(x3, codes, tables, row_scale)
    assert torch.equal(y3.reshape(200, out_f), F.linear(x3.reshape(200, in_f), w.half()))
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        gy = matmul(x3, codes, tables, row_scale)
    g.replay()
    torch.cuda.synchronize()
    assert torch.equal(gy, y3)
    s_in = torch.randint(0, 2, (in_f,), device="cuda").float() * 2 - 1
    ref = glq_linear_reference(x3, codes, tables, row_scale, s_in)
    assert rel_error(glq_linear(x3, codes, tables, row_scale, s_in), ref) < 5e-3
    monkeypatch.setenv("GLQ_KERNELS_DEQUANT", "0")
    x = torch.randn(200, in_f, device="cuda").half()
    exact = exact_matmul(x, w)
    assert rel_error(matmul(x, codes, tables, row_scale), exact) <= kernel_tolerance(x, w, exact, len(tables.bits))


@pytest.mark.parametrize("rate", [2, 3, 4], ids=lambda r: f"r{r}")
def test_batched_kernel_matches_reference(cuda_ext, rate, monkeypatch):
    """The register-tiled batched kernel (variant 3) forced at every n-tile count and several split
    counts: within the kernels' tolerance and the numerics model, bit-identical run to run, and
    picked by glq.kernels.matmul by default at batch 16."""
    from glq.kernels import matmul

    for out_f, in_f in [(4096, 14336), (14336, 4096), (960, 2688), (24, 24), (1536, 576), (8, 2688)]:
        codes, tables, row_scale = random_layer(rate, out_f, in_f, seed=13, device="cuda")
        w = dequantize(codes, tables, row_scale)
        for b in (9, 16, 17, 33, 64, 1):
            for dtype in DTYPES:
                x = torch.randn(b, in_f, device="cuda").to(dtype)
                exact = exact_matmul(x, w)
                tol = kernel_tolerance(x, w, exact, len(tables.bits))
                model = kernel_numerics_model(x, codes, tables, row_scale)
                table = tables.table(dtype, x.device)
                dcode = 0 if dtype == torch.float16 else 1
                plan = torch.ops.glq_cuda.matmul_plan(b, out_f, in_f, rate, dcode, 0, 0, 0, 3)
                assert plan[6] == 3 and plan[0] == 128, plan
                for ks in (0, 1, 3, 64):
                    y = torch.ops.glq_cuda.matmul(x, codes, table, row_scale, rate, tables.gain, 0, ks, 3)
                    assert rel_error(y, exact) <= tol, (out_f, in_f, b, dtype, ks)
                    assert rel_error(y, model) <= 2 * unit_roundoff(dtype), (out_f, in_f, b, dtype, ks)
                    again = torch.ops.glq_cuda.matmul(x, codes, table, row_scale, rate, tables.gain, 0, ks, 3)
                    assert torch.equal(y, again), (out_f, in_f, b, dtype, ks)
        monkeypatch.delenv("GLQ_KERNELS_BATCHED", raising=False)
        x = torch.randn(16, in_f, device="cuda").half()
        y = matmul(x, codes, tables, row_scale)
        table = tables.table(torch.float16, x.device)
        assert torch.equal(y, torch.ops.glq_cuda.matmul(x, codes, table, row_scale, rate, tables.gain, 0, 0, 3))


def test_batched_kernel_table_copies_give_identical_results(cuda_ext):
    """At rate 4 the batched kernel holds 4 or 8 copies of both stage tables (8 from kWideTableWeights
    weights on): the same bits either way, at awkward shapes, at every n-tile count (the staged-x path
    at 17-64) and with splits; the plan picks 8 on a large layer and 4 on a smaller one."""
    for out_f, in_f in [(960, 2688), (24, 24), (4096, 8 * 1001)]:
        codes, tables, row_scale = random_layer(4, out_f, in_f, seed=9, device="cuda")
        for b in (9, 17, 33, 64):
            for dtype in DTYPES:
                x = torch.randn(b, in_f, device="cuda").to(dtype)
                table = tables.table(dtype, x.device)
                for ks in (0, 3):
                    y4, y8 = (
                        torch.ops.glq_cuda.matmul(x, codes, table, row_scale, 4, tables.gain, rep, ks, 3)
                        for rep in (4, 8)
                    )
                    assert torch.equal(y4, y8), (out_f, in_f, b, dtype, ks)
    for b in (16, 64):
        assert torch.ops.glq_cuda.matmul_plan(b, 4096, 14336, 4, 0, 0, 0, 0, 3)[4] == 8
        assert torch.ops.glq_cuda.matmul_plan(b, 4096, 4096, 4, 0, 0, 0, 0, 3)[4] == 8
        assert torch.ops.glq_cuda.matmul_plan(b, 2048, 2048, 4, 0, 0, 0, 0, 3)[4] == 4


def test_split_k_launches_on_two_streams_at_once(cuda_ext):
    """Split-K arrival counters are per stream: the same layers run concurrently on two streams
    (forced split-K) give exactly the single-stream results every time."""
    codes, tables, row_scale = random_layer(2, 4096, 14336, seed=3, device="cuda")
    table = tables.table(torch.float16, "cuda")
    xs = [torch.randn(1, 14336, device="cuda").half() for _ in range(2)]
    ref = [torch.ops.glq_cuda.matmul(x, codes, table, row_scale, 2, tables.gain, 0, 16, 2) for x in xs]
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    outs: list[list[torch.Tensor]] = [[], []]
    for _ in range(50):
        for i, s in enumerate(streams):
            with torch.cuda.stream(s):
                outs[i].append(torch.ops.glq_cuda.matmul(xs[i], codes, table, row_scale, 2, tables.gain, 0, 16, 2))
    torch.cuda.synchronize()
    for i in range(2):
        assert all(torch.equal(o, ref[i]) for o in outs[i]), i


def test_cluster_split_is_the_workspace_split_bit_for_bit(cuda_ext, monkeypatch):
    """Split-K through a thread-block cluster (the ksplit CTAs of a row block add their partials in
    distributed shared memory, compute capability >= 9) gives the bits of the workspace-and-counter
    split (GLQ_KERNELS_CLUSTER=0) for every kernel that splits: the MMA kernel, v4, v5 and the row-tile
    variant, at ragged shapes and batches, several rounds of persistent items (14336 rows) and split
    counts 2-8 (9 and up always take the workspace). The planner takes a cluster only where it costs no
    resident CTAs (and for the MMA kernel only up to batch 8), so some cases plan the workspace either way."""
    cc = torch.cuda.get_device_capability()
    clustered = set()
    cases = [  # kernel variant, rates, batches
        (1, (2, 5, 8), (1, 7, 33)),
        (2, (2, 3, 4, 7), (1, 5)),
        (3, (2, 4), (9, 24, 64)),
        (4, (2, 4), (1, 3)),
    ]
    for out_f, in_f in [(960, 2688), (14336, 4096), (200, 8 * 300)]:
        for variant, rates, batches in cases:
            for rate in rates:
                codes, tables, row_scale = random_layer(rate, out_f, in_f, seed=rate + variant, device="cuda")
                for b in batches:
                    dtype = DTYPES[b % 2]
                    x = torch.randn(b, in_f, device="cuda").to(dtype)
                    table = tables.table(dtype, x.device)
                    for ks in (2, 3, 5, 8):
                        plan = torch.ops.glq_cuda.matmul_plan(b, out_f, in_f, rate, int(dtype == torch.bfloat16), 0,
                                                              ks, 0, variant)
                        if plan[6] != variant or plan[2] < 2:  # the kernel or the split was not plannable here
                            continue
                        assert plan[7] in (0, 1) and (plan[7] == 0 or cc[0] >= 9), (variant, plan)
                        if plan[7]:
                            clustered.add(variant)
                        y = torch.ops.glq_cuda.matmul(x, codes, table, row_scale, rate, tables.gain, 0, ks, variant)
                        monkeypatch.setenv("GLQ_KERNELS_CLUSTER", "0")
                        want = torch.ops.glq_cuda.matmul(x, codes, table, row_scale, rate, tables.gain, 0, ks,
                                                         variant)
                        assert torch.ops.glq_cuda.matmul_plan(b, out_f, in_f, rate, int(dtype == torch.bfloat16),
                                                              0, ks, 0, variant)[7] == 0
                        monkeypatch.delenv("GLQ_KERNELS_CLUSTER")
                        assert y.isfinite().all() and torch.equal(y, want), (out_f, in_f, variant, rate, b, ks, plan)
    if cc[0] >= 9:
        assert clustered == {1, 2, 3, 4}, clustered


# Layers with a tiled code layout (out % 16 == 0, in % 128 == 0): in = 640 leaves the MMA kernel's last chunk half
# past the end (G % 32 == 16), 16 x 128 is one tile.
TILED_SHAPES = [(16, 128), (48, 1536), (576, 1536), (1536, 640), (4096, 4096), (4096, 14336)]


@pytest.mark.parametrize("rate", range(2, 9), ids=lambda r: f"r{r}")
def test_tiled_codes_give_the_row_major_bits(cuda_ext, rate):
    """Every matmul kernel (MMA 1, v4 2, the row-tile kernel 4, v5 3; auto 0), unsplit and forced to 3 splits, and
    the dense decode read tiled codes (glq.kernels.layout, variant | 32) to exactly the bits they give on
    row-major codes: the same plan, sums in the same order, only the addresses differ."""
    from glq.kernels.layout import tile_codes

    for out_f, in_f in TILED_SHAPES:
        codes, tables, row_scale = random_layer(rate, out_f, in_f, seed=3, device="cuda")
        tcodes = tile_codes(codes)
        assert not all(torch.equal(a, b) for a, b in zip(codes, tcodes, strict=True))
        for b in (1, 7, 16, 64):
            dtype = DTYPES[b % 2]
            x = torch.randn(b, in_f, device="cuda").to(dtype)
            table = tables.table(dtype, x.device)
            variants = [0, 1] + ([2, 4 | 16] if b <= 8 else [3 | 16] if rate <= 4 else [])
            for v in variants:
                for ks in (0, 3):
                    want = torch.ops.glq_cuda.matmul(x, codes, table, row_scale, rate, tables.gain, 0, ks, v)
                    got = torch.ops.glq_cuda.matmul(x, tcodes, table, row_scale, rate, tables.gain, 0, ks, v | 32)
                    assert torch.equal(got, want), (out_f, in_f, b, v, ks)
        t32 = tables.table(torch.float32, "cuda")
        for dt in (torch.bfloat16, torch.float32):
            want = torch.ops.glq_cuda.dequantize(codes, t32, row_scale, rate, tables.gain, dt)
            got = torch.ops.glq_cuda.dequantize(tcodes, t32, row_scale, rate, tables.gain, dt, True)
            assert torch.equal(got, want), (out_f, in_f, dt)


def test_public_api_on_tiled_codes(cuda_ext):
    """glq.kernels.matmul / glq_linear / dequantize with tiled=True give the row-major results bit for bit at a
    decode batch, a batched one and a prefill (the dense path); an untileable shape fails with the rule
    (the binding's own check: test_binding_errors_raise)."""
    from glq.kernels import matmul
    from glq.kernels.layout import tile_codes

    codes, tables, row_scale = random_layer(3, 576, 1536, seed=5, device="cuda")
    tcodes = tile_codes(codes)
    for b in (1, 16, 100):
        x = torch.randn(b, 1536, device="cuda").to(torch.float16)
        assert torch.equal(matmul(x, tcodes, tables, row_scale, tiled=True), matmul(x, codes, tables, row_scale))
        assert torch.equal(glq_linear(x, tcodes, tables, row_scale, tiled=True),
                           glq_linear(x, codes, tables, row_scale))
    assert torch.equal(dequantize(tcodes, tables, row_scale, tiled=True), dequantize(codes, tables, row_scale))
    codes, tables, row_scale = random_layer(2, 24, 1536, seed=5, device="cuda")
    x = torch.randn(1, 1536, device="cuda").half()
    with pytest.raises(ValueError, match="out_features % 16 == 0 and in_features % 128 == 0"):
        matmul(x, codes, tables, row_scale, tiled=True)
