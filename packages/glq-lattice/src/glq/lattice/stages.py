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


def _parity(bits: torch.Tensor) -> torch.Tensor:
    """Parity (0/1, int32) of the popcount of the low 8 bits of ``bits`` (int32)."""
    p = bits ^ (bits >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return p & 1


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

    def _variants(self, ax, negbits, q, idx):
        """The 3 best sign vectors of each pattern in ``idx`` (m, k): exact scores (m, 3k) and
        int32 codes (m, 3k), pattern-major.

        With c_1 <= c_2 <= c_3 the three smallest flip costs ``4 |x_i| a_pi``: a pattern whose
        parity sign(x) matches is best with no flip, then flips {1, 2}, then {1, 3}; a pattern
        whose parity is wrong is best with flip {1}, then {2}, then {3}.
        """
        a, _, nrm, _, par = self._on(ax.device)
        m, k = idx.shape
        prod = ax[:, None, :] * a[idx]  # (m, k, 8)
        base = 2.0 * prod.sum(2) - nrm[idx]  # (m, k) score with the signs of x
        v, i = prod.topk(3, dim=2, largest=False)  # (m, k, 3) smallest flip costs
        bit = torch.ones((), dtype=torch.int32, device=ax.device) << i.to(torch.int32)
        mm = (q[:, None] != par[idx])[:, :, None]  # (m, k, 1)
        zero = torch.zeros_like(v[..., :1])
        pen = torch.where(mm, v, torch.cat([zero, v[..., :1] + v[..., 1:]], 2))  # (m, k, 3)
        flip = torch.where(mm, bit, torch.cat([torch.zeros_like(bit[..., :1]), bit[..., :1] | bit[..., 1:]], 2))
        exact = (base[:, :, None] - 4.0 * pen).reshape(m, 3 * k)
        nb = negbits[:, None, None] ^ flip  # (m, k, 3) sign bits after the flips
        codes = (idx.to(torch.int32)[:, :, None] << 7) | (nb & 127)
        return exact, codes.reshape(m, 3 * k)

    def candidates(self, x: torch.Tensor, k: int = 1, variants: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
        """Best ``k`` codewords for each row of ``x`` (n, 8), in table units.

        Returns ``(codes, dist)``: (n, k) int32 codes (0..65535) and (n, k) float32 squared
        distances, sorted by distance. Column 0 is an exact nearest codeword. The others are the
        best among the 3 best sign vectors of each of the ``k + 5`` patterns with the highest
        optimistic score: the exact k nearest in nearly all cases, and good seeds for a beam
        search either way (they include the codewords that differ from the best one in the
        sign of its smallest coordinates, which a later stage often needs).

        ``variants=1`` keeps only the best sign vector per pattern: the search the shipped
        tables were trained with (generate.py); it loses 1-4% MSE at 3-8 bpw.
        """
        if variants not in (1, 3):
            raise ValueError(f"variants must be 1 or 3 rather than {variants}")
        if k == 1:
            parts = [self._nearest_chunk(xs) for xs in x.split(_CHUNK)]
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]).clamp_min_(0)
        out_c, out_d = [], []
        kk = min(512, k + 6)
        for xs in x.split(_CHUNK):
            ax, negbits, q, opt = self._scores(xs)
            top_v, top_i = opt.topk(kk, dim=1)  # (m, kk) optimistic, sorted
            if variants == 1:
                exact, codes = self._exact_for(ax, negbits, q, top_i[:, : kk - 1])
            else:
                exact, codes = self._variants(ax, negbits, q, top_i[:, : kk - 1])
            # Patterns outside the first kk-1 score at most top_v[:, -1]; when the best exact
            # score beats that, the best of `exact` is the true optimum.
            bad = (exact.max(1).values < top_v[:, -1]).nonzero().squeeze(1)
            if bad.numel() and kk < 512:
                all_i = torch.arange(512, device=xs.device).expand(bad.numel(), 512)
                fn = self._exact_for if variants == 1 else self._variants
                ex_b, co_b = fn(ax[bad], negbits[bad], q[bad], all_i)
                ex_b, o = ex_b.topk(exact.shape[1], dim=1)
                exact[bad] = ex_b
                codes[bad] = co_b.gather(1, o)
            ex_k, o = exact.topk(k, dim=1)
            out_c.append(codes.gather(1, o))
            out_d.append((xs * xs).sum(1, keepdim=True) - ex_k)
        return torch.cat(out_c), torch.cat(out_d).clamp_min_(0.0)

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
        for xs in x.split(_CHUNK):
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
