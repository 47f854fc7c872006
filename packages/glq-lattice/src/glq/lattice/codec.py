"""The GLQ codecs: ``codec(bpw)`` for 2 <= bpw <= 8, built from the shipped tables."""

from __future__ import annotations

import functools
import math
from importlib import resources

import torch

from .reference import StageTable
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
# Rows per encode chunk: bounds the beam's (rows, beam, beam, 8) float32 working set to ~8 MiB.
_ENC_CHUNK = 4096


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
    ) -> None:
        if len(stages) != len(scales):
            raise ValueError(f"{len(stages)} stages but {len(scales)} scales")
        self.bpw = bpw
        self.stages = stages
        # float32-representable scales, so encode, decode and kernels multiply by the same number.
        self.scales = [float(torch.tensor(float(s), dtype=torch.float32)) for s in scales]
        self.beam = beam
        # Sign vectors per pattern among 16-bit candidates: 3 ships; 1 is what the tables were
        # trained with (generate.py reproduces them with it).
        self.sign_variants = 3

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

    def encode(self, x: torch.Tensor, beam: int | None = None) -> tuple[torch.Tensor, ...]:
        """Encode (n, 8) unit-variance vectors into per-stage codes.

        Returns one (n,) tensor per stage on ``x``'s device: torch.int16 (bit pattern of the
        unsigned 16-bit code) for 16-bit stages, torch.uint8 for 8-bit stages.

        Search: one stage (2 bpw) is exact nearest. Several stages use a joint beam search of
        width ``beam`` (default: ``BEAM[bpw]``, 16): the ``beam`` best stage-1 codewords (the best sign choice of
        the best patterns) are kept; at each further stage every kept path is extended by its
        residual's ``beam`` nearest codewords (exactly nearest for 8-bit stages and for the first
        of the 16-bit candidates) and the ``beam`` paths with least total error are kept; the
        last stage takes each path's exact nearest codeword and the path with least total error
        wins. The greedy path (each stage exactly nearest to the residual of the one before) is
        always kept, so the result is never worse than greedy residual coding.
        """
        x = self._check_x(x)
        beam = self.beam if beam is None else beam
        if beam < 1:
            raise ValueError(f"beam must be >= 1 rather than {beam}")
        codes = [torch.cat(c) for c in zip(*(self._encode_chunk(xs, beam) for xs in x.split(_ENC_CHUNK)), strict=True)]
        return tuple(self._store(st, c) for st, c in zip(self.stages, codes, strict=True))

    def decode(self, codes: tuple[torch.Tensor, ...] | list[torch.Tensor]) -> torch.Tensor:
        """Per-stage codes (as returned by :meth:`encode`) -> (n, 8) float32."""
        self._check_codes(codes)
        out = self.scales[0] * self.stages[0].decode(codes[0])
        for st, sc, c in zip(self.stages[1:], self.scales[1:], codes[1:], strict=True):
            out = out + sc * st.decode(c)
        return out

    # -- internals ------------------------------------------------------------------------------
    def _encode_chunk(self, x: torch.Tensor, beam: int) -> list[torch.Tensor]:
        """Beam search for one chunk (m, 8); returns one (m,) int32 code tensor per stage."""
        st0, s0 = self.stages[0], self.scales[0]
        if len(self.stages) == 1:
            return [st0.nearest(x / s0)]
        m = x.shape[0]
        c0, _ = st0.candidates(x / s0, beam, self.sign_variants)  # (m, B)
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
                best = err.argmin(1)  # (m,)
                return [p[rows[:, 0], best] for p in paths] + [cj.reshape(m, b)[rows[:, 0], best]]
            # Path 0 extended by its nearest codeword is the greedy path: keep it in slot 0.
            pri = err.clone()
            pri[:, 0] = float("-inf")
            sel = pri.topk(beam, dim=1, largest=False).indices  # (m, B)
            src = sel // k
            paths = [p.gather(1, src) for p in paths] + [cj.reshape(m, b * k).gather(1, sel)]
            recon = new.reshape(m, b * k, 8)[rows, sel]  # (m, B, 8)
            b = beam
        raise AssertionError("unreachable: the last stage returns")

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


def build(bpw: int, data: dict, beam: int = DEFAULT_BEAM) -> Codec:
    """A codec from a tables dict (as stored in ``tables_v1.pt``)."""
    names = LAYOUT[bpw]
    return Codec(bpw, [_stage(data, n) for n in names], list(data[f"scales_{bpw}"]), beam)


@functools.cache
def codec(bpw: int) -> Codec:
    """The GLQ code at ``bpw`` bits per weight (an int in 2..8). Cached; tables load lazily."""
    if isinstance(bpw, bool) or not isinstance(bpw, int) or bpw not in LAYOUT:
        raise ValueError(f"bpw must be one of {list(RATES)} rather than {bpw!r}")
    return build(bpw, _load(), BEAM[bpw])


def gaussian_bound(bpw: float) -> float:
    """Rate-distortion bound for unit Gaussians: 2^(-2R) per dimension."""
    return math.pow(2.0, -2.0 * bpw)
