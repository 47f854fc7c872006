"""CPU model of the small-batch CUDA kernel (``glq_gemv_kernel`` in csrc/glq_kernels.cu).

Replays the kernel's integer math in Python: the table layout in shared memory (REP copies, byte
addresses), the sign masks, the slice/step/lane ownership, the mma.m16n8k16 fragment layout, the
cross-warp and split-K reduction orders. Checked against the plain-PyTorch numerics model, so an
index or layout slip in the CUDA code's design shows up here without a GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glq.kernels.testing import kernel_numerics_model, random_layer, rel_error, unit_roundoff

W, T, SLICE = 16, 4, 16  # kGemvWarps, kGemvT, kSliceGroups
M32 = 0xFFFFFFFF


def _sign_words(c: np.ndarray) -> np.ndarray:
    """The kernel's 4 XOR masks (uint32) of 16-bit codes c (uint32 array)."""
    lo = c & 127
    par = np.array([bin(int(v)).count("1") & 1 for v in lo.ravel()], dtype=np.uint64).reshape(lo.shape)
    lo = lo.astype(np.uint64)
    m = np.uint64(0x80008000)
    return np.stack(
        [
            ((lo * np.uint64(0x40008000)) & np.uint64(M32)) & m,
            ((lo * np.uint64(0x10002000)) & np.uint64(M32)) & m,
            ((lo * np.uint64(0x04000800)) & np.uint64(M32)) & m,
            (((lo << np.uint64(9)) + (par << np.uint64(31))) & np.uint64(M32)) & m,
        ],
        axis=-1,
    ).astype(np.uint32)


def test_sign_masks_match_the_contract_for_all_codes():
    c = np.arange(1 << 16, dtype=np.uint32)
    words = _sign_words(c)  # (65536, 4)
    lo = c & 127
    par = np.array([bin(int(v)).count("1") & 1 for v in lo], dtype=np.uint32)
    s = lo | (par << 7)  # sign bits of coordinates 0..7 (storage contract)
    for k in range(4):
        want = (((s >> (2 * k)) & 1) << 15) | (((s >> (2 * k + 1)) & 1) << 31)
        assert np.array_equal(words[:, k], want), k


def _smem_tables(tab16: np.ndarray, bits, rl2: int) -> np.ndarray:
    """Shared-memory image (uint16) as fill_tables writes it: stage-major entries, entry e of the
    packed stream at 16-byte slots e*REP .. e*REP+REP-1. 8-bit stages keep 256 entries."""
    rep = 1 << rl2
    entries = []
    for s, b in enumerate(bits):
        entries.append(tab16[s, : (512 if b == 16 else 256)])
    ent = np.concatenate(entries)  # (E, 8) uint16
    return np.repeat(ent, rep, axis=0).reshape(-1)  # slot-major, 8 uint16 per slot


def _decode(smem: np.ndarray, bits, rl2: int, lane: int, codes16: list[int], code8: int | None, dt):
    """gemv_decode: 8 values (numpy dtype dt) of one group of one row."""
    stage_bytes = 512 * 16 << rl2
    base = (lane & ((1 << rl2) - 1)) * 16
    acc = None
    n16 = sum(1 for b in bits if b == 16)
    for s in range(n16):
        c = codes16[s] & 0xFFFF
        addr = base + s * stage_bytes + ((c & 0xFF80) >> (3 - rl2))
        v = smem[addr // 2 : addr // 2 + 8].copy()
        words = (v[0::2].astype(np.uint32) | (v[1::2].astype(np.uint32) << 16)) ^ _sign_words(np.array([c]))[0]
        v = np.empty(8, dtype=np.uint16)
        v[0::2], v[1::2] = words & 0xFFFF, words >> 16
        val = v.view(dt)
        acc = val if acc is None else (acc.astype(np.float32) + val.astype(np.float32)).astype(dt)
    if code8 is not None:
        addr = base + n16 * stage_bytes + ((code8 << 7) >> (3 - rl2))
        val = smem[addr // 2 : addr // 2 + 8].view(dt)
        acc = (acc.astype(np.float32) + val.astype(np.float32)).astype(dt)
    return acc


def _mma(d: np.ndarray, afr, bfr):
    """mma.m16n8k16 (row.col, f32 accumulate) from per-lane fragments, PTX layout: lane (g, t);
    A regs {(g, 2t..2t+1), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}; B regs {(k 2t.., n g),
    (k 2t+8.., n g)}; D {(g, 2t), (g, 2t+1), (g+8, 2t), (g+8, 2t+1)}. d: (32, 4) float32."""
    a = np.zeros((16, 16))
    b = np.zeros((16, 8))
    for lane in range(32):
        g, t = lane // 4, lane % 4
        a0, a1, a2, a3 = afr[lane]  # each: 2 values
        a[g, 2 * t : 2 * t + 2], a[g + 8, 2 * t : 2 * t + 2] = a0, a1
        a[g, 2 * t + 8 : 2 * t + 10], a[g + 8, 2 * t + 8 : 2 * t + 10] = a2, a3
        b0, b1 = bfr[lane]
        b[2 * t : 2 * t + 2, g], b[2 * t + 8 : 2 * t + 10, g] = b0, b1
    prod = a @ b  # (16, 8), exact enough (float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for q in range(4):
            d[lane, q] = np.float32(d[lane, q] + np.float32(prod[g + 8 * (q >> 1), 2 * t + (q & 1)]))


def gemv_model(x: torch.Tensor, codes, tables, row_scale, ksplit: int) -> torch.Tensor:
    """What glq_gemv_kernel computes, replayed lane by lane (slow: tiny shapes only)."""
    dt = np.float16 if x.dtype == torch.float16 else None
    assert dt is not None, "model in float16 (numpy has no bfloat16)"
    bits = tables.bits
    n16 = sum(1 for b in bits if b == 16)
    rl2 = 3 if n16 == 1 else 2
    smem = _smem_tables(tables.table(torch.float16, "cpu").numpy().view(np.uint16), bits, rl2)
    bsz, k_in = x.shape
    m = codes[0].shape[0]
    g_n = k_in // 8
    xs = x.numpy()
    cs = [c.numpy().astype(np.int64) & (0xFFFF if b == 16 else 0xFF) for c, b in zip(codes, bits, strict=True)]
    n_slices = max(1, -(-g_n // SLICE))
    sps = -(-n_slices // ksplit)
    ksplit = -(-n_slices // sps)
    row_blocks = -(-m // (16 * T))
    y = np.zeros((bsz, m), dtype=np.float32)
    ws = np.zeros((ksplit, bsz, m), dtype=np.float32)
    for rb in range(row_blocks):
        for ks in range(ksplit):
            row_base = rb * 16 * T
            s_first, s_stop = ks * sps, min(n_slices, ks * sps + sps)
            red = np.zeros((W, 16 * T, bsz), dtype=np.float32)
            for warp in range(W):
                acc = np.zeros((T, 32, 4), dtype=np.float32)
                for sl in range(s_first + warp, s_stop, W):
                    for rt in range(T):
                        for i in range(4):
                            # one decode per lane feeds both MMAs: elements 0..3, then 4..7
                            afr, bfr, afr2, bfr2 = [], [], [], []
                            for lane in range(32):
                                g, t = lane // 4, lane % 4
                                j = sl * SLICE + 4 * t + i
                                xv = xs[min(g, bsz - 1), 8 * j : 8 * j + 8] if j < g_n else np.zeros(8, dt)
                                ws_ = []
                                for h in range(2):
                                    r = row_base + 16 * rt + g + 8 * h
                                    ok = r < m and j < g_n
                                    c16 = [int(cs[s][r, j]) if ok else 0 for s in range(n16)]
                                    c8 = (int(cs[n16][r, j]) if ok else 0) if len(bits) > n16 else None
                                    ws_.append(_decode(smem, bits, rl2, lane, c16, c8, dt).astype(np.float64))
                                wa, wb = ws_
                                xd = xv.astype(np.float64)
                                afr.append((wa[0:2], wb[0:2], wa[2:4], wb[2:4]))
                                bfr.append((xd[0:2], xd[2:4]))
                                afr2.append((wa[4:6], wb[4:6], wa[6:8], wb[6:8]))
                                bfr2.append((xd[4:6], xd[6:8]))
                            _mma(acc[rt], afr, bfr)
                            _mma(acc[rt], afr2, bfr2)
                for rt in range(T):
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        for q in range(4):
                            b = 2 * t + (q & 1)
                            if b < bsz:
                                red[warp, 16 * rt + g + 8 * (q >> 1), b] = acc[rt, lane, q]
            part = np.zeros((16 * T, bsz), dtype=np.float32)
            for w in range(W):  # fixed order
                part = (part + red[w]).astype(np.float32)
            for rl in range(16 * T):
                r = row_base + rl
                if r < m:
                    ws[ks, :, r] = part[rl]
        for rl in range(16 * T):
            r = rb * 16 * T + rl
            if r < m:
                tot = np.zeros(bsz, dtype=np.float32)
                for s in range(ksplit):
                    tot = (tot + ws[s, :, r]).astype(np.float32)
                y[:, r] = tot * np.float32(row_scale[r].item()) * np.float32(tables.gain)
    return torch.from_numpy(y.astype(dt))


@pytest.mark.parametrize(
    "rate, m, k, bsz, ksplit",
    [(2, 80, 8 * 40, 3, 2), (3, 24, 8 * 37, 1, 1), (4, 16, 8 * 36, 2, 1)],
    ids=["r2-ragged-rows-split", "r3-G37-unaligned", "r4"],
)
def test_gemv_model_matches_numerics_model(rate, m, k, bsz, ksplit):
    codes, tables, row_scale = random_layer(rate, m, k, seed=rate)
    x = torch.randn(bsz, k).half()
    y = gemv_model(x, codes, tables, row_scale, ksplit)
    ref = kernel_numerics_model(x, codes, tables, row_scale)
    assert rel_error(y, ref) <= 2 * unit_roundoff(torch.float16)


# --- the register-tiled batched kernel (glq_batched_kernel, v5, batch 9..64) -----------------------

BWM, BWK, BT = 4, 2, 2  # kBWM, kBWK, kBT
BROWS = BWM * BT * 16  # kBRows


def batched_model(x: torch.Tensor, codes, tables, row_scale, ksplit: int) -> torch.Tensor:
    """What glq_batched_kernel computes, replayed lane by lane: the 2-D warp grid (wm rows, wk K
    slices), the two-buffer slice loop exactly as written (which buffer is loaded with which slice
    and decoded against which x), x fragments per (n-tile, group) shared by both row tiles, the
    n-tile guard, and the wk / split-K reduction orders."""
    assert x.dtype == torch.float16, "model in float16 (numpy has no bfloat16)"
    dt = np.float16
    bits = tables.bits
    n16 = sum(1 for b in bits if b == 16)
    rl2 = 3 if n16 == 1 else 2
    smem = _smem_tables(tables.table(torch.float16, "cpu").numpy().view(np.uint16), bits, rl2)
    bsz, k_in = x.shape
    nt_cap = 2 if bsz <= 16 else 4 if bsz <= 32 else 8  # template NT
    n_tiles = -(-bsz // 8)
    m = codes[0].shape[0]
    g_n = k_in // 8
    xs = x.numpy()
    cs = [c.numpy().astype(np.int64) & (0xFFFF if b == 16 else 0xFF) for c, b in zip(codes, bits, strict=True)]
    n_slices = max(1, -(-g_n // SLICE))
    sps = -(-n_slices // ksplit)
    ksplit = -(-n_slices // sps)
    row_blocks = -(-m // BROWS)
    y = np.zeros((bsz, m), dtype=np.float32)
    ws = np.zeros((ksplit, bsz, m), dtype=np.float32)
    visits = np.zeros((row_blocks, BWM, n_slices), dtype=np.int64)

    def load(rb, wm, sl):
        """load_slice for both row tiles: codes [rt][lane][h][i] (stages 16-bit, then 8-bit)."""
        warp_row0 = rb * BROWS + wm * BT * 16
        out = {}
        for rt in range(BT):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                for h in range(2):
                    r = warp_row0 + 16 * rt + g + 8 * h
                    for i in range(4):
                        j = sl * SLICE + 4 * t + i
                        ok = r < m and j < g_n
                        c16 = [int(cs[s][r, j]) if ok else 0 for s in range(n16)]
                        c8 = (int(cs[n16][r, j]) if ok else 0) if len(bits) > n16 else None
                        out[rt, lane, h, i] = (c16, c8)
        return sl, out

    def compute(acc, buf, sl, rb, wm):
        loaded_sl, cc = buf
        assert loaded_sl == sl, "the buffer decoded holds the slice whose x it is multiplied with"
        visits[rb, wm, sl] += 1
        for i in range(4):
            for rt in range(BT):
                afr, afr2 = [], []
                dec = {}
                for lane in range(32):
                    wa, wb = (
                        _decode(smem, bits, rl2, lane, *cc[rt, lane, h, i], dt).astype(np.float64) for h in range(2)
                    )
                    dec[lane] = (wa, wb)
                    afr.append((wa[0:2], wb[0:2], wa[2:4], wb[2:4]))
                    afr2.append((wa[4:6], wb[4:6], wa[6:8], wb[6:8]))
                for nt in range(nt_cap):
                    if nt >= n_tiles:
                        continue  # warp-uniform skip of n-tiles past ceil(B/8)
                    bfr, bfr2 = [], []
                    for lane in range(32):
                        g, t = lane // 4, lane % 4
                        j = sl * SLICE + 4 * t + i
                        xv = xs[min(nt * 8 + g, bsz - 1), 8 * j : 8 * j + 8] if j < g_n else np.zeros(8, dt)
                        xd = xv.astype(np.float64)
                        bfr.append((xd[0:2], xd[2:4]))
                        bfr2.append((xd[4:6], xd[6:8]))
                    _mma(acc[rt, nt], afr, bfr)
                    _mma(acc[rt, nt], afr2, bfr2)

    for rb in range(row_blocks):
        for ks in range(ksplit):
            s_first, s_stop = ks * sps, min(n_slices, ks * sps + sps)
            red = np.zeros((BWK, BROWS, bsz), dtype=np.float32)
            for warp in range(BWM * BWK):
                wm, wk = warp % BWM, warp // BWM
                acc = np.zeros((BT, nt_cap, 32, 4), dtype=np.float32)
                # the kernel's loop, unrolled by two with buffers c0 / c1
                c0 = c1 = None
                sl = s_first + wk
                if sl < s_stop:
                    c0 = load(rb, wm, sl)
                while sl < s_stop:
                    sl1 = sl + BWK
                    if sl1 < s_stop:
                        c1 = load(rb, wm, sl1)
                    compute(acc, c0, sl, rb, wm)
                    if sl1 >= s_stop:
                        break
                    if sl1 + BWK < s_stop:
                        c0 = load(rb, wm, sl1 + BWK)
                    compute(acc, c1, sl1, rb, wm)
                    sl += 2 * BWK
                for rt in range(BT):
                    for nt in range(nt_cap):
                        for lane in range(32):
                            g, t = lane // 4, lane % 4
                            for q in range(4):
                                rl = wm * BT * 16 + 16 * rt + g + 8 * (q >> 1)
                                b = nt * 8 + 2 * t + (q & 1)
                                if b < bsz:
                                    red[wk, rl, b] = acc[rt, nt, lane, q]
            part = np.zeros((BROWS, bsz), dtype=np.float32)
            for w in range(BWK):  # fixed order
                part = (part + red[w]).astype(np.float32)
            for rl in range(BROWS):
                r = rb * BROWS + rl
                if r < m:
                    ws[ks, :, r] = part[rl]
        for rl in range(BROWS):
            r = rb * BROWS + rl
            if r < m:
                tot = np.zeros(bsz, dtype=np.float32)
                for s in range(ksplit):
                    tot = (tot + ws[s, :, r]).astype(np.float32)
                y[:, r] = tot * np.float32(row_scale[r].item()) * np.float32(tables.gain)
    assert (visits == 1).all(), "every (row block, warp row, slice) is decoded exactly once"
    return torch.from_numpy(y.astype(dt))


@pytest.mark.parametrize(
    "rate, m, k, bsz, ksplit",
    [
        (2, 136, 8 * 40, 16, 2),  # 2 row blocks (ragged), G = 40: a partial third slice, split-K
        (3, 40, 8 * 37, 9, 1),  # G % 4 != 0 (scalar loads), rows past M inside the first block
        (4, 24, 8 * 36, 40, 1),  # NT = 8 with 5 live n-tiles
        (2, 16, 8 * 80, 64, 3),  # full batch, 5 slices over 3 splits of 2 (the last short)
    ],
    ids=["r2-ragged-rows-split", "r3-G37-B9", "r4-B40", "r2-B64-split3"],
)
def test_batched_model_matches_numerics_model(rate, m, k, bsz, ksplit):
    codes, tables, row_scale = random_layer(rate, m, k, seed=rate + bsz)
    x = torch.randn(bsz, k).half()
    y = batched_model(x, codes, tables, row_scale, ksplit)
    ref = kernel_numerics_model(x, codes, tables, row_scale)
    assert rel_error(y, ref) <= 2 * unit_roundoff(torch.float16)


# --- shared-memory layouts: the bank-quad arithmetic of the table fill and v5's x staging -----------
# A 16-byte access by a warp is served in 4 phases of 8 lanes (quarter-warps); a phase is one wavefront
# only when its 8 addresses fall in 8 different bank quads (16-byte unit index mod 8). Both expressions
# below are the kernel's (fill_tables_as, x_unit); correctness does not depend on them, speed does.


def _fill_slot(first: int, rl2: int, lane: int, r: int) -> int:
    """Slot stored by lane `lane` at step r for an entry whose copies start at `first` (fill_tables_as)."""
    copies = 1 << rl2
    return first + ((r + (lane >> (3 - rl2))) & (copies - 1))


@pytest.mark.parametrize("rl2", [0, 1, 2, 3])
def test_table_fill_stores_are_conflict_free_and_complete(rl2):
    copies = 1 << rl2
    for stage_base in (0, 512 * 8, 512 * 8 + 512 * 4):  # stage starts (slots) as in SliceTables
        for warp_first_entry in (0, 32, 480):
            slots = set()
            for r in range(copies):
                for q in range(4):  # quarter-warps
                    lanes = range(8 * q, 8 * q + 8)
                    quads = {_fill_slot(stage_base + ((warp_first_entry + l) << rl2), rl2, l, r) % 8 for l in lanes}
                    assert len(quads) == 8, (rl2, r, q)
                for lane in range(32):
                    slots.add(_fill_slot(stage_base + ((warp_first_entry + lane) << rl2), rl2, lane, r))
            # every copy of every entry written exactly once
            assert slots == {stage_base + ((warp_first_entry + lane) << rl2) + c for lane in range(32)
                             for c in range(copies)}


def _x_unit(b: int, q: int) -> int:
    return b * 16 + (q ^ ((q >> 3) << 1) ^ (b & 1))


def test_x_staging_swizzle_is_a_permutation_and_conflict_free():
    for b in range(64):
        assert sorted(_x_unit(b, q) for q in range(16)) == list(range(16 * b, 16 * b + 16))
    for nt in range(8):  # fragment reads: lane (g, t) reads row 8 nt + g, group 4 t + i
        for i in range(4):
            for q in range(4):
                lanes = range(8 * q, 8 * q + 8)
                assert len({_x_unit(8 * nt + l // 4, 4 * (l % 4) + i) % 8 for l in lanes}) == 8, (nt, i, q)
    for u0 in range(0, 128 * 8, 8):  # staging stores: unit u -> (row u / 16, group u % 16), 8 per phase
        assert len({_x_unit(u // 16, u % 16) % 8 for u in range(u0, u0 + 8)}) == 8


@pytest.mark.parametrize("dtype", [torch.int16, torch.uint8])
def test_tiled_codes_put_each_lanes_codes_in_one_unit(dtype):
    """tile_codes and the tiled kernel's load (load_slice_tiled): the 8 values at unit (tile * slices + sl) * 32 +
    lane are lane (g, t)'s codes of rows 16 tile + g and 16 tile + 8 + g, groups 16 sl + 4 t .. + 3, in the
    order the untiled loads fill SliceCodes (row g's four groups, then row g + 8's)."""
    from glq.kernels.layout import tile_codes

    m, groups = 48, 64
    codes = torch.randint(0, 200, (m, groups)).to(dtype)
    flat = tile_codes([codes])[0].reshape(-1)
    slices = groups // 16
    for tile in range(m // 16):
        for sl in range(slices):
            for lane in range(32):
                g, t = lane // 4, lane % 4
                unit = (tile * slices + sl) * 32 + lane
                cols = slice(16 * sl + 4 * t, 16 * sl + 4 * t + 4)
                want = torch.cat([codes[16 * tile + g, cols], codes[16 * tile + 8 + g, cols]])
                assert torch.equal(flat[unit * 8 : unit * 8 + 8], want), (tile, sl, lane)
    with pytest.raises(ValueError, match="out_features % 16"):
        tile_codes([codes[:40]])
