"""One stage of a GLQ code: exact nearest-codeword search and decode.

Two kinds of stage exist (see the package docstring for the bit layout):

* :class:`OrbitStage` (16 bits): 512 non-negative "abs patterns" ``abs`` (512, 8), each carrying
  the 128 sign vectors whose number of minus signs has the parity ``parity[p]``. 65,536 points,
  closed under every even number of sign flips, like E8's half-integer coset.
* :class:`TableStage` (8 bits): a free table ``table`` (256, 8).

Both work in *table units*: callers divide by the stage scale before searching and multiply
after decoding. Every search here is exact (the returned codeword is a nearest one; ties are
broken arbitrarily); ``candidates`` also returns runners-up for beam search.
"""

from __future__ import annotations

import torch

# Rows per chunk in searches: a (4096, 512) float32 score block is 8 MiB, about what a server
# core's share of L2/L3 holds; bigger chunks measured slower on the 2-core CI machine.
_CHUNK = 4096
# On a GPU, bigger chunks mean fewer kernel launches; (65536, 512) float32 is 128 MiB.
_CHUNK_CUDA = 65536


def _chunk(x: torch.Tensor) -> int:
    return _CHUNK if x.device.type == "cpu" else _CHUNK_CUDA


def _parity(bits: torch.Tensor) -> torch.Tensor:
    """Parity (0/1, int32) of the popcount of the low 8 bits of ``bits`` (int32)."""
    p = bits ^ (bits >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return p & 1


_FLIP_SETS: dict = {}


def _dominators(flips: int, same_parity: list[int]) -> int:
    """How many other flip sets (bit masks over coordinates sorted by flip cost, cheapest = bit 0)
    cost no more than ``flips`` whatever the sorted non-negative costs are: T costs <= S for all
    such costs iff, for every j, T has at most as many members >= j as S."""

    def tails(m: int) -> list[int]:
        return [bin(m >> j).count("1") for j in range(8)]

    ts = tails(flips)
    return sum(1 for t in same_parity if t != flips and all(u <= v for u, v in zip(tails(t), ts, strict=True)))


def _flip_sets(variants: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The flip sets :meth:`OrbitStage._variants` scores: 0/1 float masks (variants, t) over the
    t cheapest coordinates, for an even and an odd number of flips, and t.

    Sets are taken in order of how many sets are certainly at least as cheap (their
    dominators), so the ``variants`` best sign vectors of a pattern are always among the sets
    with fewer than ``variants`` dominators; for 3 these are {}, {1,2}, {1,3} and {1}, {2}, {3}.
    """
    key = (variants, device)
    if key not in _FLIP_SETS:
        masks = []
        for parity in (0, 1):
            same = [m for m in range(256) if bin(m).count("1") % 2 == parity]
            ranked = sorted(same, key=lambda m: (_dominators(m, same), bin(m).count("1"), m))
            masks.append(ranked[:variants])
        t = max(max(m.bit_length() for m in ms) for ms in masks)
        even, odd = (
            torch.tensor([[(m >> j) & 1 for j in range(t)] for m in ms], dtype=torch.float32, device=device)
            for ms in masks
        )
        _FLIP_SETS[key] = (even, odd, t)
    return _FLIP_SETS[key]


def _unlisted_frontier(variants: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """0/1 float masks (f, 8) over all 8 coordinates sorted by flip cost, for an even and an odd
    number of flips: the cheapest-possible flip sets that :func:`_flip_sets` leaves out. Every
    left-out set costs at least as much as one of these (it is dominated by a minimal one), so
    ``min`` over them bounds the score of every sign vector a pattern's list does not hold."""
    key = ("frontier", variants, device)
    if key not in _FLIP_SETS:
        out = []
        for parity in (0, 1):
            same = [m for m in range(256) if bin(m).count("1") % 2 == parity]
            listed = set(sorted(same, key=lambda m: (_dominators(m, same), bin(m).count("1"), m))[:variants])
            rest = [m for m in same if m not in listed]
            minimal = [m for m in rest if _dominators(m, rest) == 0]
            out.append(torch.tensor([[(m >> j) & 1 for j in range(8)] for m in minimal], dtype=torch.float32))
        _FLIP_SETS[key] = tuple(t.to(device) for t in out)
    return _FLIP_SETS[key]


class OrbitStage:
    """16-bit stage: 512 abs patterns x 128 signs with a fixed sign parity per pattern.

    Code layout (unsigned 16-bit value ``c``, stored as int16 bit pattern):
    ``pattern = c >> 7``; bit ``j`` of ``c & 127`` set means coordinate ``j`` (0..6) is negative;
    coordinate 7 is negative iff ``parity(c & 127) XOR parity[pattern]``. So the total number of
    negative coordinates always has the parity ``parity[pattern]``.
    """

    bits = 16

    def __init__(self, abs_: torch.Tensor, parity: torch.Tensor) -> None:
        if abs_.shape != (512, 8) or parity.shape != (512,):
            raise ValueError(
                f"expected abs (512, 8) and parity (512,) rather than {tuple(abs_.shape)} and {tuple(parity.shape)}"
            )
        if bool((abs_ < 0).any()):
            raise ValueError("abs patterns must be non-negative")
        self.abs = abs_.to(torch.float32).contiguous()  # (512, 8)
        self.parity = parity.to(torch.int32).contiguous()  # (512,) 0/1
        self._dev: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._dev:
            a = self.abs.to(device)
            self._dev[device] = (
                a,  # (512, 8)
                (2.0 * a).T.contiguous(),  # (8, 512) for the score matmul
                (a * a).sum(1),  # (512,) squared norms
                a.min(1).values,  # (512,) smallest entry, for the parity-penalty bound
                self.parity.to(device),
            )
        return self._dev[device]

    # -- decode ---------------------------------------------------------------------------------
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(n,) int16/int32 codes -> (n, 8) float32 codewords in table units."""
        a, _, _, _, par = self._on(codes.device)
        c = codes.to(torch.int32) & 0xFFFF
        p = c >> 7
        s = c & 127
        neg7 = _parity(s) ^ par[p]
        negbits = s | (neg7 << 7)  # (n,) bit j = coordinate j negative
        shifts = torch.arange(8, device=codes.device, dtype=torch.int32)
        neg = (negbits[:, None] >> shifts) & 1  # (n, 8)
        return a[p] * (1 - 2 * neg).to(torch.float32)

    def signs(self, codes: torch.Tensor) -> torch.Tensor:
        """(n,) codes -> (n, 8) float32 signs (+1/-1) they put on their abs pattern."""
        c = codes.to(torch.int32) & 0xFFFF
        s = c & 127
        neg7 = _parity(s) ^ self._on(codes.device)[4][c >> 7]
        shifts = torch.arange(8, device=codes.device, dtype=torch.int32)
        return (1 - 2 * (((s | (neg7 << 7))[:, None] >> shifts) & 1)).to(torch.float32)

    # -- search ---------------------------------------------------------------------------------
    def _mats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(10, 512) weights and (512,) bias of the optimistic-score matmul (see ``_scores``)."""
        key = ("mats", device)
        if key not in self._dev:
            _a, a2t, nrm, amin, par = self._on(device)
            pf = par.to(torch.float32)
            w = torch.cat([a2t, (-4.0 * amin * pf)[None], (-4.0 * amin * (1.0 - pf))[None]])
            self._dev[key] = (w.contiguous(), -nrm)  # type: ignore[assignment]
        return self._dev[key]  # type: ignore[return-value]

    def _scores(self, x: torch.Tensor):
        """Optimistic per-pattern scores for one chunk ``x`` (m, 8).

        For pattern p with the sign vector sign(x) the squared distance is
        ``|x|^2 - score[p]`` with ``score[p] = 2 |x|.a_p - |a_p|^2``. When sign(x) has the wrong
        parity for p, the best fix flips the coordinate i minimising ``|x_i| a_pi``, which costs
        ``4 min_i |x_i| a_pi`` more. That penalty is at least ``4 min|x| min_i a_pi``, so
        ``opt[p] = score[p] - [mismatch] 4 min|x| min_i a_pi`` bounds the exact score from above;
        it comes out of one (m, 10) x (10, 512) matmul with the extra features
        ``min|x| [q == 0]`` and ``min|x| [q == 1]`` (q: parity of the minus signs of x).
        """
        w, bias = self._mats(x.device)
        ax = x.abs()  # (m, 8)
        shifts = torch.arange(8, device=x.device, dtype=torch.int32)
        negbits = ((x < 0).to(torch.int32) << shifts).sum(1, dtype=torch.int32)  # (m,)
        q = _parity(negbits)  # (m,) sign parity of x
        xmin = ax.amin(1, keepdim=True)  # (m, 1)
        qf = q[:, None].to(torch.float32)
        feat = torch.cat([ax, xmin * (1.0 - qf), xmin * qf], 1)  # (m, 10)
        opt = torch.addmm(bias, feat, w)  # (m, 512), >= exact score
        return ax, negbits, q, opt

    def _exact_for(self, ax, negbits, q, idx):
        """Exact scores (m, k) and int32 codes (m, k) for the patterns ``idx`` (m, k)."""
        a, _, nrm, _, par = self._on(ax.device)
        ap = a[idx]  # (m, k, 8)
        prod = ax[:, None, :] * ap  # (m, k, 8)
        pen, flip = prod.min(2)  # (m, k) cheapest coordinate to flip
        mm = q[:, None] != par[idx]  # (m, k) sign parity of x is wrong for the pattern
        exact = 2.0 * prod.sum(2) - nrm[idx] - mm * (4.0 * pen)
        nb = negbits[:, None] ^ (mm.to(torch.int32) << flip.to(torch.int32))  # fixed sign bits
        codes = (idx.to(torch.int32) << 7) | (nb & 127)
        return exact, codes

    def _nearest_chunk(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ax, negbits, q, opt = self._scores(xs)
        _v1, i1 = opt.max(1)
        exact, codes = self._exact_for(ax, negbits, q, i1[:, None])
        # Certificate: every other pattern's optimistic score is below the exact score found.
        # With well-shaped tables this fails for well under 0.1% of rows (measured 0 in 200k).
        opt.scatter_(1, i1[:, None], float("-inf"))
        bad = (exact[:, 0] < opt.amax(1)).nonzero().squeeze(1)
        if bad.numel():
            all_i = torch.arange(512, device=xs.device).expand(bad.numel(), 512)
            ex_b, co_b = self._exact_for(ax[bad], negbits[bad], q[bad], all_i)
            ex_b, o = ex_b.max(1, keepdim=True)
            exact[bad] = ex_b
            codes[bad] = co_b.gather(1, o)
        return codes, (xs * xs).sum(1, keepdim=True) - exact

    def _variants(self, ax, negbits, q, idx, variants: int, bound: bool = False):
        """``variants`` sign vectors of each pattern in ``idx`` (m, k): exact scores
        (m, variants * k) and int32 codes, pattern-major; with ``bound``, also the highest score
        (m,) any other sign vector of these patterns reaches.

        With c_1 <= c_2 <= ... the flip costs ``4 |x_i| a_pi`` sorted, the flip sets tried are
        those of :func:`_flip_sets`: for 3, a pattern whose parity sign(x) matches is tried with
        no flip, flips {1, 2} and {1, 3}, a pattern whose parity is wrong with {1}, {2}, {3};
        for 16 the 16 sets per parity that fewest other sets beat for every cost vector, which
        always include the pattern's 8 best sign vectors.
        """
        a, _, nrm, _, par = self._on(ax.device)
        m, k = idx.shape
        prod = ax[:, None, :] * a[idx]  # (m, k, 8)
        base = 2.0 * prod.sum(2) - nrm[idx]  # (m, k) score with the signs of x
        mm = (q[:, None] != par[idx])[:, :, None]  # (m, k, 1) sign parity of x is wrong
        even, odd, t = _flip_sets(variants, ax.device)  # (variants, t) 0/1 masks per parity
        v, i = prod.topk(t, dim=2, largest=False)  # (m, k, t) cheapest flips, ascending
        bit = torch.ones((), dtype=torch.int32, device=ax.device) << i.to(torch.int32)
        pen = torch.where(mm, v @ odd.T, v @ even.T)  # (m, k, variants)
        bits_f = bit.to(torch.float32)  # distinct powers of two < 256: the sum is the OR, exact
        flip = torch.where(mm, bits_f @ odd.T, bits_f @ even.T).to(torch.int32)
        exact = (base[:, :, None] - 4.0 * pen).reshape(m, variants * k)
        nb = negbits[:, None, None] ^ flip  # (m, k, variants) sign bits after the flips
        codes = (idx.to(torch.int32)[:, :, None] << 7) | (nb & 127)
        if not bound:
            return exact, codes.reshape(m, variants * k)
        # Highest score any sign vector of these patterns outside the list can reach (m,).
        f_even, f_odd = _unlisted_frontier(variants, ax.device)
        v8 = prod.sort(dim=2).values  # (m, k, 8) all flip costs, ascending
        least = torch.where(mm, (v8 @ f_odd.T).amin(2, keepdim=True), (v8 @ f_even.T).amin(2, keepdim=True))
        return exact, codes.reshape(m, variants * k), (base - 4.0 * least[..., 0]).amax(1)

    def candidates(self, x: torch.Tensor, k: int = 1, variants: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """Best ``k`` codewords for each row of ``x`` (n, 8), in table units.

        Returns ``(codes, dist)``: (n, k) int32 codes (0..65535) and (n, k) float32 squared
        distances, sorted by distance. Column 0 is an exact nearest codeword. The others are the
        best among the ``variants`` best sign vectors of each of the ``k + 5`` patterns with the
        highest optimistic score: with 16 sign vectors the exact k nearest on every row measured
        for k <= 8 (3 missed some on 24% of rows), and good seeds for a beam search either way.

        ``variants=1`` keeps only the best sign vector per pattern: the search the shipped
        tables were trained with (generate.py); it loses 1-4% MSE at 3-8 bpw.
        """
        codes, dist, _ = self._candidates(x, k, variants, bound=False)
        return codes, dist

    def candidates_bounded(
        self, x: torch.Tensor, k: int, variants: int = 16
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`candidates` plus a certificate: (n,) float32 ``outside``, a lower bound on the
        squared distance from each row to every codeword *not* among its ``k`` candidates
        (from the optimistic bound of the patterns not scored, the cheapest sign vectors the
        scored patterns leave out, and the best scored codeword not kept)."""
        if variants < 2:
            raise ValueError("a bound needs variants >= 2")
        return self._candidates(x, k, variants, bound=True)

    def _candidates(self, x: torch.Tensor, k: int, variants: int, bound: bool):
        if not 1 <= variants <= 128:
            raise ValueError(f"variants must be in 1..128 rather than {variants}")
        if k == 1 and not bound:
            parts = [self._nearest_chunk(xs) for xs in x.split(_chunk(x))]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).clamp_min_(0), None
        out_c, out_d, out_b = [], [], []
        kk = min(512, k + 6)
        for xs in x.split(_chunk(x)):
            ax, negbits, q, opt = self._scores(xs)
            top_v, top_i = opt.topk(kk, dim=1)  # (m, kk) optimistic, sorted
            unscored = top_v[:, -1].clone() if kk < 512 else torch.full_like(top_v[:, 0], float("-inf"))
            if variants == 1:
                exact, codes = self._exact_for(ax, negbits, q, top_i[:, : kk - 1])
            elif bound:
                exact, codes, left_out = self._variants(ax, negbits, q, top_i[:, : kk - 1], variants, True)
            else:
                exact, codes = self._variants(ax, negbits, q, top_i[:, : kk - 1], variants)
            # Patterns outside the first kk-1 score at most top_v[:, -1]; when the best exact
            # score beats that, the best of `exact` is the true optimum.
            bad = (exact.max(1).values < top_v[:, -1]).nonzero().squeeze(1)
            if bad.numel() and kk < 512:
                all_i = torch.arange(512, device=xs.device).expand(bad.numel(), 512)
                if variants == 1:
                    ex_b, co_b = self._exact_for(ax[bad], negbits[bad], q[bad], all_i)
                elif bound:
                    ex_b, co_b, lo_b = self._variants(ax[bad], negbits[bad], q[bad], all_i, variants, True)
                    left_out[bad] = lo_b
                    unscored[bad] = float("-inf")  # every pattern was scored
                else:
                    ex_b, co_b = self._variants(ax[bad], negbits[bad], q[bad], all_i, variants)
                ex_b, o = ex_b.topk(exact.shape[1], dim=1)
                exact[bad] = ex_b
                codes[bad] = co_b.gather(1, o)
            kept = min(k + 1, exact.shape[1]) if bound else k
            ex_k, o = exact.topk(kept, dim=1)
            nrm = (xs * xs).sum(1, keepdim=True)
            out_c.append(codes.gather(1, o[:, :k]))
            out_d.append(nrm - ex_k[:, :k])
            if bound:
                best_out = torch.maximum(unscored, left_out)
                if kept > k:
                    best_out = torch.maximum(best_out, ex_k[:, k])
                out_b.append(nrm[:, 0] - best_out)
        bnd = torch.cat(out_b) if bound else None
        return torch.cat(out_c), torch.cat(out_d).clamp_min_(0.0), bnd

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """(n, 8) float32 -> (n,) int32 codes of exact nearest codewords."""
        return self.candidates(x, 1)[0][:, 0]


class TableStage:
    """8-bit stage: a free table of 256 codewords; code ``c`` decodes to ``table[c]``."""

    bits = 8

    def __init__(self, table: torch.Tensor) -> None:
        if table.shape != (256, 8):
            raise ValueError(f"expected table (256, 8) rather than {tuple(table.shape)}")
        self.table = table.to(torch.float32).contiguous()
        self._dev: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._dev:
            t = self.table.to(device)
            self._dev[device] = (t, (2.0 * t).T.contiguous(), (t * t).sum(1))
        return self._dev[device]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        return self._on(codes.device)[0][codes.long()]

    def candidates(self, x: torch.Tensor, k: int = 1, variants: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact best ``k`` codewords: ((n, k) int32 codes, (n, k) squared distances).
        ``variants`` is accepted for symmetry with :class:`OrbitStage` and ignored."""
        _, t2t, nrm = self._on(x.device)
        out_c, out_d = [], []
        for xs in x.split(_chunk(x)):
            score = torch.addmm(nrm, xs, t2t, beta=-1.0)  # (m, 256) = 2 x.t - |t|^2
            if k == 1:
                v, i = score.max(1, keepdim=True)  # much faster than topk on the CPU
            else:
                v, i = score.topk(k, dim=1)
            out_c.append(i.to(torch.int32))
            out_d.append((xs * xs).sum(1, keepdim=True) - v)
        return torch.cat(out_c), torch.cat(out_d).clamp_min_(0.0)

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        return self.candidates(x, 1)[0][:, 0]
