"""Exact round trips where the beam search alone misses decoded points (4-8 bpw).

A decoded point ``y`` has a code at distance exactly 0, but its stage-1 codeword can be hundreds
deep in the stage-1 ranking of ``y`` (uniformly random codes: up to 466 at 4 bpw), so no
affordable list finds it by distance. Float32 arithmetic finds it instead. Decode computes, per
coordinate, ``z = fl(fl(s0 a) + fl(s1 b))`` for the first two (16-bit) stages, then adds the
later stages' terms. With ``U = fl(s0 |a|)`` and ``V = fl(s1 |b|)`` (at most 512 values each per
coordinate) ``|z|`` is one of the ~410k numbers ``fl(U + V)``, ``|fl(U - V)|``, about 1.1% of the
float32 values near a Gaussian coordinate. :class:`PairSums` keeps them as a bitmap per coordinate
(buckets of width 2^-22, 2.3 MB each); a row can be a decoded point only if every coordinate hits
it. At 5 and 6 bpw the third stage is peeled first: each of its 256 codewords (8-bit) or 512
patterns with either sign per coordinate (16-bit) gives a target ``y - w`` that must hit, up to
the rounding of the last addition. Rows (or row-candidate pairs) that pass all 8 coordinates go
to :meth:`PairSums.decompose`, which lists the stage-1 patterns consistent with every coordinate,
tries their 128 sign vectors with an exact stage-2 search each and keeps a code only if it
decodes to ``y`` bit for bit. Every test is a superset test, so a decoded point always passes;
Gaussian rows almost never do (measured in notes/lattice.md).

At 7 and 8 bpw two stages are peeled (the same tests over 131k / 262k stage-3-and-4 candidates
per row, with the rounding of both additions in the window): exact too, but 5x / 35x the beam's
time on a CPU, so only on request (``encode(x, exact=True)``).
"""

from __future__ import annotations

import torch

from .stages import OrbitStage, TableStage

# Bucket width of the bitmaps: 2^-QBITS. With |y| < 4 the window a peeled target must hit spans
# at most 2 buckets; 2^-22 leaves ~10% of Gaussian coordinates hitting (1.1% of values are sums,
# the rest is bucket width), 2^-21 ~18%, 2^-20 ~34% (measured at 4-6 bpw).
QBITS = 22
_Q = float(2**QBITS)
# Slack for the float32 rounding of fl(U +- V) when matching stage-2 magnitudes: at most half an
# ulp of a value below 8, i.e. 2^-22; twice that to be safe (the final check is exact anyway).
_ROUND = 2.0**-21
# Items per chunk in decompose: bounds its (chunk, 512, 2, 2) float64 temporaries.
_DECOMP_CHUNK = 64
# Rows per peel chunk: keeps its (rows, 512, 2) float64 temporaries in cache (2-4 MiB).
_PEEL_CHUNK = 256
# On a GPU the same loops are bound by kernel launches and syncs, not by cache: with the CPU's chunks
# encoding 16,384 vectors at 5 bpw made 36,715 launches and 4,436 syncs (H200: 41-46 us a vector
# against 2.2 without the round-trip step). Larger chunks there (temporaries up to ~32-64 MiB);
# results do not depend on the chunking (rows are independent and kept in order).
_DECOMP_CHUNK_CUDA = 1024
_PEEL_CHUNK_CUDA = 1 << 16
_PEEL_ELEMS_CUDA = 1 << 22


def _chunks(device: torch.device) -> tuple[int, int, int]:
    """(decompose items, peel rows, peel elements) per chunk on ``device``."""
    if device.type == "cuda":
        return _DECOMP_CHUNK_CUDA, _PEEL_CHUNK_CUDA, _PEEL_ELEMS_CUDA
    return _DECOMP_CHUNK, _PEEL_CHUNK, 2**20


def window(y: torch.Tensor) -> torch.Tensor:
    """Half-width (float64) of the window around ``y - w`` that holds ``z`` when
    ``y = fl(z + w)``: half the float32 spacing above |y| (the largest rounding error), plus
    2^-40 for the float64 arithmetic of the caller (exact unless |y| < 2^-20, then off by at
    most ~2^-50)."""
    _, e = torch.frexp(y.to(torch.float32))
    return torch.ldexp(torch.ones_like(y, dtype=torch.float64), e.to(torch.int64) - 25) + 2.0**-40


class PairSums:
    """Membership filter and decomposition for the first two 16-bit stages of one codec."""

    def __init__(self, st0: OrbitStage, s0: float, st1: OrbitStage, s1: float, device: torch.device) -> None:
        self.st0, self.s0, self.st1, self.s1 = st0, s0, st1, s1
        # Same operation as decode (float32 scale times a float32 table value), so the same bits.
        u = (s0 * st0.abs).to(device)  # (512, 8)
        v = (s1 * st1.abs).to(device)
        self.u = u.double()
        self.v_sorted = v.T.contiguous().sort(1).values.double()  # (8, 512)
        sums = []
        for i in range(8):
            ui, vi = torch.unique(u[:, i]), torch.unique(v[:, i])
            s = torch.cat([(ui[:, None] + vi[None, :]).reshape(-1), (ui[:, None] - vi[None, :]).abs().reshape(-1)])
            sums.append((s.double() * _Q).floor().long())
        self.nb = int(max(int(k.max()) for k in sums)) + 1  # buckets per coordinate
        nbytes = self.nb // 8 + 2  # a zero byte past the last bucket: keys are clamped to nb
        weights = (1 << torch.arange(8, device=device, dtype=torch.int32)).to(torch.uint8)
        rows = []
        for k in sums:  # one coordinate at a time: the unpacked map is 1 byte per bucket (18 MB)
            bm = torch.zeros(nbytes * 8, dtype=torch.bool, device=device)
            bm[k] = True
            # Bucket k also marks k + 1's sums: one lookup tests the two buckets a window of
            # width <= 2^-22 can touch (a superset test, so it stays safe).
            bm[(k - 1).clamp_min(0)] = True
            rows.append((bm.view(nbytes, 8).to(torch.uint8) * weights).sum(1, dtype=torch.uint8))
        self.bits = torch.stack(rows)  # (8, nbytes), 2.3 MB per coordinate

    def _bit(self, i: int, k: torch.Tensor) -> torch.Tensor:
        byte = self.bits[i][k >> 3]
        return ((byte >> (k & 7).to(torch.uint8)) & 1).bool()

    def hit(self, i: int, c: torch.Tensor, h: torch.Tensor | float) -> torch.Tensor:
        """May some ``z`` with ``|z| = fl(U +- V)`` at coordinate ``i`` lie within ``h`` of ``c``?

        ``c`` float64 (any shape), ``h`` float64 broadcastable. A superset test: it may say True
        for a window holding no sum, never False for one that holds one. Bucket k's bit also
        covers k + 1, so a window no wider than a bucket (|y| < 2) takes one lookup."""
        a = c.abs()
        top = self.nb / _Q
        # int32 keys: buckets < 2^25; truncation = floor for these non-negative values
        lo = (a - h).clamp_(0.0, top).mul_(_Q).to(torch.int32)
        out = self._bit(i, lo)
        if not isinstance(h, torch.Tensor):
            return out
        wide = h * (2 * _Q) >= 1.0  # windows wider than a bucket (|y| >= 2): few rows
        if not bool(wide.any()):
            return out
        more = wide.expand(a.shape).nonzero(as_tuple=True)
        lo_m = lo[more]
        hi_m = (a[more] + h.expand(a.shape)[more]).clamp_(0.0, top).mul_(_Q).to(torch.int32)
        got = out[more]
        for d in range(2, 8, 2):  # every second bucket up to hi
            got |= (lo_m + d <= hi_m) & self._bit(i, (lo_m + d).clamp_(max=self.nb))
        out[more] = got | (hi_m > lo_m + 7)  # wider still (|y| >= 16): count as a hit
        return out

    def decompose(self, c: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """All (item, stage-1 code, stage-2 code) whose first-two-stage sum may be the target.

        ``c`` (m, 8) float64 targets of ``z`` and ``h`` (m, 8) their half-widths. A stage-1
        pattern p is kept when at every coordinate one of ``| c_i -+ U_pi |`` is within
        ``h + rounding`` of a stage-2 magnitude; each of its 128 sign vectors then gets the
        exact nearest stage-2 codeword of the residual. Returns (k,) item indices and int32
        codes; the caller checks them exactly."""
        items, codes0 = [], []
        tol = h + _ROUND
        step = _chunks(c.device)[0]
        for j0 in range(0, c.shape[0], step):
            cc, tt = c[j0 : j0 + step], tol[j0 : j0 + step]
            m = cc.shape[0]
            ok = torch.ones(m, 512, dtype=torch.bool, device=c.device)
            for i in range(8):
                vs = self.v_sorted[i]
                ci, ui = cc[:, i, None], self.u[None, :, i]
                cand = torch.stack([(ci - ui).abs(), (ci + ui).abs()], -1)  # (m, 512, 2) wanted V
                pos = torch.searchsorted(vs, cand.reshape(-1)).reshape(cand.shape)
                near = torch.stack([vs[(pos - 1).clamp(0, 511)], vs[pos.clamp(max=511)]], -1)
                ok &= ((near - cand[..., None]).abs() <= tt[:, i, None, None, None]).any(-1).any(-1)
            it, p = ok.nonzero(as_tuple=True)
            if it.numel():
                signs = torch.arange(128, device=c.device, dtype=torch.int32)
                items.append((it + j0)[:, None].expand(-1, 128).reshape(-1))
                codes0.append(((p.to(torch.int32)[:, None] << 7) | signs).reshape(-1))
        if not items:
            e = torch.zeros(0, dtype=torch.long, device=c.device)
            return e, e.to(torch.int32), e.to(torch.int32)
        it, a = torch.cat(items), torch.cat(codes0)
        part0 = self.s0 * self.st0.decode(a)
        r = (c[it] - part0.double()).to(torch.float32) / self.s1
        return it, a, self.st1.nearest(r)


def tail_window(y: torch.Tensor, n_tail: int, w_max: torch.Tensor) -> torch.Tensor:
    """Half-width (float64, shape of ``y``) of the window around ``y - (tail stages)`` that holds
    the first-two-stage sum ``z``. One tail stage: ``y = fl(z + w)``, see :func:`window`. Two:
    ``y = fl(t + w4)`` with ``t = fl(z + w3)``, so the error is at most half an ulp of |y| plus
    half an ulp of |t| <= |y| + max|w4| + that first error (``w_max`` (8,): max |w4| per
    coordinate)."""
    h = window(y)
    if n_tail == 1:
        return h
    t_max = (y.double().abs() + w_max.double() + h).to(torch.float32)  # rounding up keeps a bound
    return h + window(t_max)


def peel_candidates(
    pairs: PairSums, stages: list[OrbitStage | TableStage], scales: list[float], y: torch.Tensor
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Rows of ``y`` (m, 8) and codes of the stages after the first two (one or two stages) that
    may complete a first-two-stage sum to ``y``.

    With the tail stages' scaled codewords summing to ``w``, ``z`` lies within
    :func:`tail_window` of ``y - w`` at every coordinate. 8-bit stage: every code is tried.
    16-bit stage: every pattern, with each sign per coordinate; the sign vectors that pass all
    coordinates and have the pattern's parity are returned. Returns (k,) row indices and one
    (k,) int32 code tensor per tail stage."""
    opts = [_options(st, sc, y.device) for st, sc in zip(stages, scales, strict=True)]
    if len(opts) == 1:  # a neutral second tail stage keeps one code path
        opts.append((torch.zeros(1, 8, dtype=torch.float64, device=y.device), 1, None))
    combos = opts[0][0].shape[0] * opts[0][1] * opts[1][0].shape[0] * opts[1][1]
    _, rows_max, elems = _chunks(y.device)
    chunk = max(1, min(rows_max, elems // combos))
    w_max = abs_max(stages[-1], scales[-1], y.device)
    rows, codes = [], []
    for j0 in range(0, y.shape[0], chunk):
        ys = y[j0 : j0 + chunk]
        h = tail_window(ys, len(stages), w_max)
        r, cc = _peel_chunk(pairs, opts, ys, h)
        rows.append(r + j0)
        codes.append(cc)
    return torch.cat(rows), [torch.cat([cc[j] for cc in codes]) for j in range(len(stages))]


def _options(st: OrbitStage | TableStage, sc: float, dev: torch.device):
    """(values float64 (n, 8), signs per coordinate (1 or 2), parity or None) of a tail stage,
    scaled with the same rounding as decode: 256 codewords or 512 pattern magnitudes."""
    if isinstance(st, TableStage):
        return (sc * st.table.to(dev)).double(), 1, None
    return (sc * st.abs.to(dev)).double(), 2, st.parity.to(dev)


def abs_max(st: OrbitStage | TableStage, sc: float, dev: torch.device) -> torch.Tensor:
    """(8,) float64 largest |value| per coordinate of a stage's scaled codewords."""
    return _options(st, sc, dev)[0].abs().amax(0)


def _offsets(opt, idx: torch.Tensor | None, i: int) -> torch.Tensor:
    """Coordinate ``i`` of a tail stage's options ``idx`` (all if None) times each sign: (n, s)."""
    vals, ns, _ = opt
    v = vals[:, i] if idx is None else vals[idx, i]
    return v[:, None] if ns == 1 else torch.stack([v, -v], 1)


def _peel_chunk(pairs: PairSums, opts, y: torch.Tensor, h: torch.Tensor):
    dev = y.device
    yd = y.double()
    # coordinate 0 dense over all (option, sign) combinations of both tail stages, then the rest
    # on the survivors: (m, n3, s3, n4, s4)
    off = _offsets(opts[0], None, 0)[:, :, None, None] + _offsets(opts[1], None, 0)[None, None]
    a0 = pairs.hit(0, yd[:, 0, None, None, None, None] - off[None], h[:, 0, None, None, None, None])
    rows, o3, o4 = a0.any(4).any(2).nonzero(as_tuple=True)
    allowed = [a0[rows, o3, :, o4, :]]  # per coordinate (k, s3, s4)
    for i in range(1, 8):
        off = _offsets(opts[0], o3, i)[:, :, None] + _offsets(opts[1], o4, i)[:, None, :]  # (k, s3, s4)
        a = pairs.hit(i, yd[rows, i, None, None] - off, h[rows, i, None, None])
        keep = a.flatten(1).any(1)
        rows, o3, o4 = rows[keep], o3[keep], o4[keep]
        allowed = [al[keep] for al in allowed] + [a[keep]]
    # sign vectors: per coordinate one allowed (sign 3, sign 4) pair, then the patterns' parities
    item = torch.arange(rows.numel(), device=dev)
    nb3 = torch.zeros_like(item)
    nb4 = torch.zeros_like(item)
    for i in range(8):
        k, s3, s4 = allowed[i][item].nonzero(as_tuple=True)
        item, nb3, nb4 = item[k], nb3[k] | (s3 << i), nb4[k] | (s4 << i)
    nbs, codes = [nb3, nb4], []
    for j, ((_vals, _ns, par), o) in enumerate(((opts[0], o3), (opts[1], o4))):
        if par is None:
            codes.append(o[item].to(torch.int32))
            continue
        keep = _popcount8(nbs[j]) % 2 == par[o[item]]
        item, nbs, codes = item[keep], [b[keep] for b in nbs], [cc[keep] for cc in codes]
        codes.append(((o[item] << 7) | (nbs[j] & 127)).to(torch.int32))
    return rows[item], codes


def _popcount8(b: torch.Tensor) -> torch.Tensor:
    return sum((b >> j) & 1 for j in range(8))
