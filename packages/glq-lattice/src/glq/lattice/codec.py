"""The GLQ codecs: ``codec(bpw)`` for 2 <= bpw <= 8, built from the shipped tables."""

from __future__ import annotations

import functools
import math
from importlib import resources

import torch

from . import roundtrip
from .reference import StageTable
from .roundtrip import PairSums
from .stages import OrbitStage, TableStage

TABLES_FILE = "tables_v1.pt"
TABLES_VERSION = "glq-lattice-tables-v1"

# Stage layout of each rate: which shipped table each stage uses. Stages 2..4 of the higher
# rates are shared (s2 serves rates 4-8), each codec fits its own scales.
LAYOUT: dict[int, tuple[str, ...]] = {
    2: ("s1",),
    3: ("s1", "r8_2"),
    4: ("s1", "s2"),
    5: ("s1", "s2", "r8_3"),
    6: ("s1", "s2", "s3"),
    7: ("s1", "s2", "s3", "r8_4"),
    8: ("s1", "s2", "s3", "s4"),
}
RATES = tuple(LAYOUT)

# Beam width of the joint search, per rate. 16 rather than 8 lowers the MSE by 1-2% at 3-4 bpw
# (0.02514 -> 0.02490 at 3 bpw) for 1.5-2x the encode time; 7 and 8 bpw need 32 to stay 5.5 dB
# ahead of the rate below (measured in notes/lattice.md).
BEAM = {2: 1, 3: 16, 4: 16, 5: 16, 6: 16, 7: 32, 8: 32}
DEFAULT_BEAM = 8
# Stage-1 candidates kept before the beam narrows (0 = the beam width). A decoded point often
# lies outside its own stage-1 cell: of 20k decoded 3/4 bpw points, 59/349 had their stage-1
# code outside their 16 nearest stage-1 codewords, some as deep as 92/96. At 4 bpw 64 lowers the
# MSE 2% and the decode-encode-decode misses from 1.45% to 0.33% of rows for 2.2x the GPU encode
# time; at 3 bpw (exact, see EXACT) 64 is the cheapest (its certificate leaves 25 second-stage
# codewords per row to check, 65 with 32); at 5-8 bpw 64 cost 2.5-5x for ~1-2% MSE and did not
# fix the round trips (notes/lattice.md).
FIRST_WIDTH = {2: 0, 3: 64, 4: 64, 5: 0, 6: 0, 7: 0, 8: 0}
# Rates whose encoder is exact nearest (the beam answer certified or completed, Codec._complete).
EXACT = frozenset({3})
# Rates whose encoder finds every decoded point again by default (Codec._round_trip,
# glq.lattice.roundtrip): the beam answer stays, except that a row found to be a decoded point
# gets a code decoding to it bit for bit. Costs 1-10% of the encode time at 4-6 bpw; at 7-8 bpw
# (two stages to peel, 131k-262k float tests per row) 5x / 35x, so there only with exact=True.
ROUND_TRIP = frozenset({4, 5, 6})
# Rates where encode(x, nearest=True) returns the exact nearest of all codes: 2 bpw always, 3 bpw by
# its certificate (EXACT), 4 bpw by a ball search after the beam (Codec._ball_search; 5.4x the encode
# time on a 2-core CPU). From 5 bpw on no exact search is affordable: the ball holds ~5,000 stage-1
# codewords a row, each needing an exact search of the remaining stages (0.7 s a row on a CPU at 5 bpw;
# notes/lattice.md), so there "nearest" is the documented joint search.
NEAREST = frozenset({2, 3, 4})
# Rows per ball-search batch: bounds its (rows, 65536) float32 distance matrix to 64 MiB.
_BALL_ROWS = 256
# Sign vectors scored per candidate pattern of a 16-bit stage (stages.OrbitStage.candidates).
# The shipped tables for rates 2-7 were trained with 1 and their scales fitted with 3; 3 missed
# decoded points whose stage-1 code flips the 4th-6th cheapest coordinate of a pattern.
SIGN_VARIANTS = 16
# Rows per encode chunk: bounds the beam's (rows, beam, beam, 8) float32 working set to ~8 MiB.
_ENC_CHUNK = 4096
# On a GPU: fewer, larger launches; at 3-4 bpw (64 stage-1 candidates) a 16384-row chunk needs
# about 2 GiB of temporaries.
_ENC_CHUNK_CUDA = 16384


@functools.lru_cache(maxsize=1)
def _load() -> dict:
    path = resources.files("glq.lattice").joinpath(TABLES_FILE)
    with resources.as_file(path) as p:
        data = torch.load(p, map_location="cpu", weights_only=True)
    if data.get("version") != TABLES_VERSION:
        raise RuntimeError(f"{TABLES_FILE} has version {data.get('version')!r} rather than {TABLES_VERSION!r}")
    return data


def _stage(data: dict, name: str) -> OrbitStage | TableStage:
    if name.startswith("r8"):
        return TableStage(data[f"{name}_table"])
    return OrbitStage(data[f"{name}_abs"], data[f"{name}_parity"])


class Codec:
    """A multi-stage code of ``8 * bpw`` bits per 8-vector.

    ``decode(codes) = sum_s scale_s * stage_s.decode(codes[s])`` (summed in stage order, float32).
    ``encode`` is exact nearest for a single stage (2 bpw); with several stages it is the joint
    beam search described in :meth:`encode`.
    """

    def __init__(
        self,
        bpw: int,
        stages: list[OrbitStage | TableStage],
        scales: list[float],
        beam: int = DEFAULT_BEAM,
        first_width: int = 0,
        sign_variants: int = SIGN_VARIANTS,
        exact: bool = False,
    ) -> None:
        if len(stages) != len(scales):
            raise ValueError(f"{len(stages)} stages but {len(scales)} scales")
        self.bpw = bpw
        self.stages = stages
        # float32-representable scales, so encode, decode and kernels multiply by the same number.
        self.scales = [float(torch.tensor(float(s), dtype=torch.float32)) for s in scales]
        self.beam = beam
        self.first_width = first_width
        # Sign vectors per pattern among 16-bit candidates (generate.py pins the searches the
        # shipped tables were trained and fitted with to reproduce them).
        self.sign_variants = sign_variants
        # exact: [16-bit, 8-bit] codes (3 bpw) are certified exact nearest (_complete); codes
        # starting [16-bit, 16-bit] (4-8 bpw) get exact round trips (_round_trip).
        kinds = [st.bits for st in stages]
        self._can_be_exact = kinds == [16, 8]
        self._can_round_trip = kinds[:2] == [16, 16]
        if exact and not (self._can_be_exact or self._can_round_trip):
            raise ValueError("exact encoding needs a [16, 8] code or one starting [16, 16] (3-8 bpw)")
        self.exact = exact
        self._pairs: dict[torch.device, PairSums] = {}
        self._stage1: dict[torch.device, torch.Tensor] = {}  # scaled stage-1 codewords (_ball_search)

    @property
    def bits(self) -> int:
        return sum(s.bits for s in self.stages)

    def __repr__(self) -> str:
        kinds = ", ".join(str(s.bits) for s in self.stages)
        return f"Codec(bpw={self.bpw}, stages=[{kinds}], beam={self.beam})"

    # -- public API -----------------------------------------------------------------------------
    def tables(self) -> list[StageTable]:
        """One :class:`~glq.lattice.reference.StageTable` per stage (float32 CPU tensors)."""
        out = []
        for st, sc in zip(self.stages, self.scales, strict=True):
            if isinstance(st, OrbitStage):
                out.append(StageTable(16, st.abs.clone(), st.parity.clone(), None, sc))
            else:
                out.append(StageTable(8, None, None, st.table.clone(), sc))
        return out

    def encode(
        self, x: torch.Tensor, beam: int | None = None, exact: bool | None = None, nearest: bool = False
    ) -> tuple[torch.Tensor, ...]:
        """Encode (n, 8) unit-variance vectors into per-stage codes.

        Returns one (n,) tensor per stage on ``x``'s device: torch.int16 (bit pattern of the
        unsigned 16-bit code) for 16-bit stages, torch.uint8 for 8-bit stages.

        Search: one stage (2 bpw) is exact nearest. Several stages use a joint beam search of
        width ``beam`` (default: ``BEAM[bpw]``): the ``max(beam, FIRST_WIDTH[bpw])`` best
        stage-1 codewords (the ``SIGN_VARIANTS`` best sign vectors of the best patterns) are
        kept; at each further stage every kept path is extended by its residual's ``beam``
        nearest codewords and the ``beam`` paths with least total error are kept; the last stage
        takes each path's exact nearest codeword and the path with least total error wins. The
        greedy path (each stage exactly nearest to the residual of the one before) is always
        kept, so the result is never worse than greedy residual coding (``beam=1`` is greedy).
        At the rates in ``EXACT`` (3 bpw) the answer is then certified or completed to the
        exact nearest of all codes (:meth:`_complete`), so decode(encode(decode(c))) ==
        decode(c) for every code there. At the rates in ``ROUND_TRIP`` (4-6 bpw) the search
        stays the beam's, but a row that is a decoded point is always recognised and gets a code
        that decodes to it bit for bit (:meth:`_round_trip`), so decode(encode(decode(c))) ==
        decode(c) for every code there too; other rows get the beam's codes unchanged.
        ``exact=False`` skips either step (3 bpw: 1.5x faster on a CPU, ~0.05% higher MSE;
        4-6 bpw: 1-10% faster, and some decoded points come back as other codes: 0.3% of
        decoded Gaussians at 4 bpw, 2-3% at 5-6, 2-25% of uniformly random codes). At 7-8 bpw
        the round-trip step is off by default (5x / 35x the encode time on a CPU);
        ``exact=True`` turns it on. 2 bpw is always exact nearest.

        ``nearest=True`` (2-4 bpw, ``NEAREST``) returns the exact nearest code of all: at 3 bpw the
        certified search above, at 4 bpw the beam's answer completed by a ball search over every
        stage-1 codeword that can still beat it (:meth:`_ball_search`; 5.4x the encode time on a
        2-core CPU, 0.5% lower MSE on Gaussians): a verification mode, not the quantizer's default.
        At 5-8 bpw it raises ``ValueError``: no exact search there is affordable.
        """
        x = self._check_x(x)
        beam = self.beam if beam is None else beam
        if beam < 1:
            raise ValueError(f"beam must be >= 1 rather than {beam}")
        if nearest:
            if self.bpw not in NEAREST:
                raise ValueError(
                    f"nearest=True is available at {sorted(NEAREST)} bpw, not {self.bpw}: at 5-8 bpw encode is the "
                    "joint beam search (an exact search over 2^40 and more codes is out of reach)"
                )
            if len(self.stages) > 1:  # 2 bpw is exact nearest anyway
                beam, exact = max(beam, 2), True  # 3 bpw's certificate runs only after a beam
        exact = self.exact if exact is None else exact
        if exact and not (self._can_be_exact or self._can_round_trip):
            raise ValueError(f"exact encoding is only available at 3-8 bpw, not {self.bpw}")
        chunk = _ENC_CHUNK if x.device.type == "cpu" else _ENC_CHUNK_CUDA
        parts = [self._encode_chunk(xs, beam, exact, nearest) for xs in x.split(chunk)]
        codes = [torch.cat(c) for c in zip(*parts, strict=True)]
        return tuple(self._store(st, c) for st, c in zip(self.stages, codes, strict=True))

    def decode(self, codes: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """Per-stage codes (as returned by :meth:`encode`) -> (n, 8) float32."""
        self._check_codes(codes)
        out = self.scales[0] * self.stages[0].decode(codes[0])
        for st, sc, c in zip(self.stages[1:], self.scales[1:], codes[1:], strict=True):
            out = out + sc * st.decode(c)
        return out

    # -- internals ------------------------------------------------------------------------------
    def _encode_chunk(
        self, x: torch.Tensor, beam: int, exact: bool | None = None, nearest: bool = False
    ) -> list[torch.Tensor]:
        """Beam search for one chunk (m, 8); returns one (m,) int32 code tensor per stage."""
        st0, s0 = self.stages[0], self.scales[0]
        if len(self.stages) == 1:
            return [st0.nearest(x / s0)]
        m = x.shape[0]
        first = max(beam, self.first_width) if beam > 1 else 1  # beam 1 stays plain greedy
        exact = (self.exact if exact is None else exact) and beam > 1
        certify = exact and self._can_be_exact
        if certify:
            c0, _, outside = st0.candidates_bounded(x / s0, first, self.sign_variants)  # (m, B0), (m,)
        else:
            c0, _ = st0.candidates(x / s0, first, self.sign_variants)  # (m, B0)
        b = c0.shape[1]
        recon = s0 * st0.decode(c0.reshape(-1)).reshape(m, b, 8)  # (m, B, 8)
        paths = [c0]  # per stage (m, B) codes of the kept paths
        rows = torch.arange(m, device=x.device)[:, None]
        for j in range(1, len(self.stages)):
            st, sc = self.stages[j], self.scales[j]
            k = 1 if j == len(self.stages) - 1 else beam
            resid = (x[:, None, :] - recon).reshape(-1, 8)  # (m*B, 8)
            cj, _ = st.candidates(resid / sc, k, self.sign_variants)  # (m*B, k)
            k = cj.shape[1]
            new = recon[:, :, None, :] + sc * st.decode(cj.reshape(-1)).reshape(m, b, k, 8)
            err = ((x[:, None, None, :] - new) ** 2).sum(-1).reshape(m, b * k)  # (m, B*k)
            if k == 1 and j == len(self.stages) - 1:
                e_best, best = err.min(1)  # (m,)
                out = [p[rows[:, 0], best] for p in paths] + [cj.reshape(m, b)[rows[:, 0], best]]
                if certify:
                    self._complete(x, out, e_best, s0 * outside.clamp_min(0.0).sqrt())
                elif nearest:
                    self._ball_search(x, out, e_best)
                elif exact and self._can_round_trip:
                    self._round_trip(x, out, e_best)
                return out
            # Path 0 extended by its nearest codeword is the greedy path: keep it in slot 0.
            pri = err.clone()
            pri[:, 0] = float("-inf")
            sel = pri.topk(beam, dim=1, largest=False).indices  # (m, B)
            src = sel // k
            paths = [p.gather(1, src) for p in paths] + [cj.reshape(m, b * k).gather(1, sel)]
            recon = new.reshape(m, b * k, 8)[rows, sel]  # (m, B, 8)
            b = beam
        raise AssertionError("unreachable: the last stage returns")

    def _complete(self, x: torch.Tensor, out: list[torch.Tensor], e_best: torch.Tensor, dist_out: torch.Tensor):
        """Make a two-stage search with an 8-bit second stage exact (in place on ``out``).

        Any code whose stage-1 point is not among the candidates is at least ``dist_out`` from
        ``x`` before stage 2, so with second-stage codeword t its error is at least
        ``(dist_out - |s_2 t|)^2``. Only the t with ``|s_2 t| > dist_out - sqrt(e_best)`` can
        beat the beam's answer; for each of those the best stage-1 point is the nearest one to
        ``x - s_2 t``, one exact search. The result is the nearest code of all 2^24.
        """
        st0, s0 = self.stages[0], self.scales[0]
        st1, s1 = self.stages[1], self.scales[1]
        m = x.shape[0]
        t_all = torch.arange(256, device=x.device, dtype=torch.int32)
        t_norm = s1 * st1.decode(t_all).norm(dim=1)  # (256,)
        # float32 slack: the bound and the errors carry rounding of order 1e-6 |x|
        slack = 1e-4 * (1.0 + x.norm(dim=1))
        need = t_norm[None, :] > (dist_out - e_best.sqrt() - slack)[:, None]  # (m, 256)
        r, t = need.nonzero(as_tuple=True)
        if r.numel() == 0:
            return
        t = t.to(torch.int32)
        part = s1 * st1.decode(t)
        a = st0.nearest((x[r] - part) / s0)
        # same operations and order as decode(), so a decoded x is matched with error 0
        e = ((x[r] - (s0 * st0.decode(a) + part)) ** 2).sum(1)
        row_min = e_best.clone().scatter_reduce_(0, r, e, "amin")
        win = (e == row_min[r]) & (e < e_best[r])
        if not bool(win.any()):
            return
        pos = torch.arange(r.numel(), device=x.device)[win]
        first = torch.full((m,), r.numel(), device=x.device, dtype=pos.dtype).scatter_reduce_(0, r[win], pos, "amin")
        rows = (first < r.numel()).nonzero().squeeze(1)
        out[0][rows] = a[first[rows]]
        out[1][rows] = t[first[rows]]

    def _ball_search(self, x: torch.Tensor, out: list[torch.Tensor], e_best: torch.Tensor) -> None:
        """Make a [16-bit, 16-bit] code exact nearest of all 2^32 (in place on ``out``).

        If (a, b) is the nearest code, ``|x - s_1 a| <= |x - s_1 a - s_2 b| + |s_2 b| <= sqrt(e_best) +
        s_2 max|b|``: its stage-1 point lies in that ball around x. Every stage-1 codeword in the ball
        (~800 per Gaussian row, all 65,536 for outliers) gets the exact nearest second-stage codeword
        of its residual, and a pair replaces the beam's answer only if its error is smaller. Errors
        are computed with ``decode``'s operations, so a decoded point keeps error 0 and comes back
        bit for bit.
        """
        st0, st1 = self.stages[0], self.stages[1]
        s1 = self.scales[1]
        if x.device not in self._stage1:
            every = torch.arange(1 << 16, dtype=torch.int32, device=x.device)
            self._stage1[x.device] = self.scales[0] * st0.decode(every)  # (65536, 8), as decode scales it
        cw1 = self._stage1[x.device]
        reach = s1 * float(st1.abs.norm(dim=1).max())
        # float32 slack: distances and errors carry rounding of order 1e-6 |x|^2
        radius = e_best.sqrt() + reach + 1e-4 * (1.0 + x.norm(dim=1))
        for lo in range(0, x.shape[0], _BALL_ROWS):
            xs, rad = x[lo : lo + _BALL_ROWS], radius[lo : lo + _BALL_ROWS]
            # direct differences, not the matmul form: no cancellation for large-norm rows
            d2 = torch.cdist(xs, cw1, compute_mode="donot_use_mm_for_euclid_dist").square_()
            r, a = (d2 <= rad.square()[:, None]).nonzero(as_tuple=True)
            if r.numel() == 0:
                continue
            b = st1.nearest((xs[r] - cw1[a]) / s1)
            e = ((xs[r] - (cw1[a] + s1 * st1.decode(b))) ** 2).sum(1)
            best = e_best[lo : lo + _BALL_ROWS]
            row_min = best.clone().scatter_reduce_(0, r, e, "amin")
            win = (e == row_min[r]) & (e < best[r])
            if not bool(win.any()):
                continue
            pos = torch.arange(r.numel(), device=x.device)[win]
            first = torch.full((xs.shape[0],), r.numel(), device=x.device, dtype=pos.dtype)
            first.scatter_reduce_(0, r[win], pos, "amin")
            rows = (first < r.numel()).nonzero().squeeze(1)
            out[0][lo + rows] = a[first[rows]].to(out[0].dtype)
            out[1][lo + rows] = b[first[rows]].to(out[1].dtype)

    def _round_trip(self, x: torch.Tensor, out: list[torch.Tensor], e_best: torch.Tensor) -> None:
        """Give every row that is a decoded point a code that decodes to it (in place on ``out``).

        Rows the beam matched exactly (error 0) are done. The others go through the float32
        filter of :mod:`glq.lattice.roundtrip` (at 5-8 bpw per candidate of the stages after
        the first two); the few
        that pass are decomposed, and a candidate code replaces the beam's only if ``decode``
        gives back the row bit for bit.
        """
        rows = (e_best > 0).nonzero().squeeze(1)
        if rows.numel() == 0:
            return
        if x.device not in self._pairs:
            self._pairs[x.device] = PairSums(self.stages[0], self.scales[0], self.stages[1], self.scales[1], x.device)
        pairs = self._pairs[x.device]
        y = x[rows]
        if len(self.stages) == 2:
            keep = torch.arange(rows.numel(), device=x.device)
            yd = y.double()
            for i in range(8):  # y itself must be a sum of the first two stages, exactly
                keep = keep[pairs.hit(i, yd[keep, i], 0.0)]  # an exact value: one bucket
            items, tail = keep, None
            c, h = yd[keep], torch.zeros_like(yd[keep])
        else:
            tail_st, tail_sc = self.stages[2:], self.scales[2:]
            items, tail = roundtrip.peel_candidates(pairs, tail_st, tail_sc, y)
            w = sum((sc * st.decode(cc)).double() for st, sc, cc in zip(tail_st, tail_sc, tail, strict=True))
            c = y[items].double() - w
            w_max = roundtrip.abs_max(tail_st[-1], tail_sc[-1], x.device)
            h = roundtrip.tail_window(y[items], len(tail_st), w_max)
        if items.numel() == 0:
            return
        it, a, b = pairs.decompose(c, h)
        if it.numel() == 0:
            return
        r = items[it]  # row of y per candidate
        cand = [a, b] + ([] if tail is None else [t[it] for t in tail])
        dec = self.decode(tuple(self._store(st, cc) for st, cc in zip(self.stages, cand, strict=True)))
        good = (dec == y[r]).all(1).nonzero().squeeze(1)
        if good.numel() == 0:
            return
        # first exact candidate per row
        first = torch.full((rows.numel(),), good.numel(), device=x.device, dtype=good.dtype)
        first.scatter_reduce_(0, r[good], torch.arange(good.numel(), device=x.device), "amin")
        hit_rows = (first < good.numel()).nonzero().squeeze(1)
        pick = good[first[hit_rows]]
        for s, cc in enumerate(cand):
            out[s][rows[hit_rows]] = cc[pick]

    @staticmethod
    def _store(st: OrbitStage | TableStage, c: torch.Tensor) -> torch.Tensor:
        if st.bits == 8:
            return c.to(torch.uint8)
        # int16 two's-complement bit pattern of the unsigned code, wrapped explicitly.
        return (((c + 32768) & 0xFFFF) - 32768).to(torch.int16)

    def _check_x(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor rather than {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"expected a floating-point tensor rather than dtype {x.dtype}")
        if x.dim() != 2 or x.shape[-1] != 8:
            raise ValueError(f"expected shape (n, 8) rather than {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError("expected at least one row to encode rather than an empty (0, 8)")
        x = x.to(torch.float32)
        if not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).any(1).sum())
            raise ValueError(f"expected finite values rather than NaN/inf in {bad} row(s)")
        return x.contiguous()

    def _check_codes(self, codes) -> None:
        if not isinstance(codes, tuple | list) or len(codes) != len(self.stages):
            got = len(codes) if isinstance(codes, tuple | list) else type(codes).__name__
            raise ValueError(f"expected {len(self.stages)} per-stage code tensors rather than {got}")
        n = None
        for i, (st, c) in enumerate(zip(self.stages, codes, strict=True)):
            want = torch.int16 if st.bits == 16 else torch.uint8
            if not isinstance(c, torch.Tensor) or c.dtype != want or c.dim() != 1:
                desc = f"{c.dtype} {tuple(c.shape)}" if isinstance(c, torch.Tensor) else type(c)
                raise ValueError(f"stage {i}: expected a 1-D {want} tensor rather than {desc}")
            if n is not None and c.shape[0] != n:
                raise ValueError(f"stage {i}: expected {n} codes like stage 0 rather than {c.shape[0]}")
            n = c.shape[0]


def build(
    bpw: int,
    data: dict,
    beam: int = DEFAULT_BEAM,
    first_width: int = 0,
    sign_variants: int = SIGN_VARIANTS,
    exact: bool = False,
) -> Codec:
    """A codec from a tables dict (as stored in ``tables_v1.pt``)."""
    names = LAYOUT[bpw]
    stages = [_stage(data, n) for n in names]
    return Codec(bpw, stages, list(data[f"scales_{bpw}"]), beam, first_width, sign_variants, exact)


@functools.cache
def codec(bpw: int) -> Codec:
    """The GLQ code at ``bpw`` bits per weight (an int in 2..8). Cached; tables load lazily."""
    if isinstance(bpw, bool) or not isinstance(bpw, int) or bpw not in LAYOUT:
        raise ValueError(f"bpw must be one of {list(RATES)} rather than {bpw!r}")
    return build(bpw, _load(), BEAM[bpw], FIRST_WIDTH[bpw], exact=bpw in EXACT or bpw in ROUND_TRIP)


def gaussian_bound(bpw: float) -> float:
    """Rate-distortion bound for unit Gaussians: 2^(-2R) per dimension."""
    return math.pow(2.0, -2.0 * bpw)
