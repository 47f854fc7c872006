"""Generator of the shipped GLQ lattice tables (``tables_v1.pt`` beside this file).

The shipped file is made in four steps (every step seeded; the same torch build on the same
device reproduces it bit for bit, checked for step 4 by two runs on an H200; another CPU or
GPU may round a few matmuls differently and land on tables that differ in the last fp16 digit
with the same MSE to about three digits). Decoding always uses the shipped file, never a
rebuild, so every machine decodes a code to the same weights.

1. Stage 1 (``train_stage1``, about 8 minutes of one CPU core); 2. the residual stages with
   ``--stage1`` reusing that file (about 22 minutes); 3. ``--refit-scales`` (run with 2 threads)
   refits every rate's scales for the search of the time. ``main`` without options chains
   these three. Rates 2, 3 and 4 ship exactly what they wrote.
4. ``python -m glq.lattice.generate tables_v1.pt --retune-high STEP3.pt --device cuda``
   fine-tunes the rate-5-8 stages with the shipped search (``RETUNE_PLAN``: r8_3, s3, r8_4,
   s4, each Lloyd from its step-3 table on 600k fresh Gaussians, scales refitted on 200k):
   4 minutes on an NVIDIA H200 (torch 2.11.0+cu130); on the 2-core CPU it would take hours.
   Only the rate-5-8 entries change (``r8_3``, ``s3``, ``r8_4``, ``s4``, ``scales_5`` to
   ``scales_8``); the scales of rates 2-4 are never refitted again.

What is trained (all on i.i.d. unit Gaussian 8-vectors):

1. ``s1``: the 16-bit stage 1 table. Start from the 512 smallest abs patterns of E8's
   half-integer coset D8 + 1/2 (parity flag = sum of the pattern mod 2, which keeps the points in
   E8) at scale 0.9, then 60 Lloyd iterations on 2M vectors in the folded domain: assign each
   vector to its exact nearest codeword, set each pattern to the mean of ``signs * x`` over its
   vectors.
2. Residual stages, each trained on what it sees inside the codec that uses it, with the codec's
   beam search (width 4, one sign vector per pattern) in the loop and all the codec's scales
   refitted by least squares every iteration (10 iterations; 300k vectors for rates 3-4, 150k
   for 5-8): ``r8_2`` (8-bit after [s1]), ``s2`` (16-bit after [s1]), ``r8_3`` (8-bit after
   [s1, s2]), ``s3`` (16-bit after [s1, s2]), ``r8_4`` (8-bit after [s1, s2, s3]) and ``s4``
   (16-bit after [s1, s2, s3]). 16-bit stages start from the E8 patterns at scale 0.6,
   8-bit stages from 256 random residuals.
3. All table values are rounded to float16-representable numbers (a kernel can keep them in
   half precision without changing a single decoded weight); scales are float32.
4. Every rate's scales are refitted (least squares alternating with encoding, 40k vectors)
   for the search of the time: ``codec.BEAM[bpw]`` and 3 sign vectors per candidate pattern.
5. Rates 5-8 only (``--retune-high``): the last stage of each is fine-tuned with the search
   that ships now (16 sign vectors per pattern, stage-1 list as wide as the beam, beam 16 at
   5-6 and 32 at 7-8: ``codec.SIGN_VARIANTS``, ``FIRST_WIDTH``, ``BEAM``), in the order r8_3,
   s3 (shared by rates 6-8, which are retuned after it), r8_4, s4 (16 iterations).
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from .codec import BEAM, DEFAULT_BEAM, FIRST_WIDTH, LAYOUT, Codec, build
from .stages import OrbitStage, TableStage

VERSION = "glq-lattice-tables-v1"
SEED = 20261127


# Steps 1-3 of the recipe use the searches of their time, pinned here to reproduce the file: the
# residual stages were trained and their first scales fitted with one sign vector per pattern
# among the 16-bit candidates, refit_all_scales fitted the scales with 3 and a stage-1 list as
# wide as the beam. Step 4 (retune_last_stage) uses the search that ships (codec.SIGN_VARIANTS).
TRAIN_SIGN_VARIANTS = 1


FIT_SIGN_VARIANTS = 3


def _codec(bpw: int, stages: list, scales: list[float], beam: int, variants: int = TRAIN_SIGN_VARIANTS) -> Codec:
    return Codec(bpw, stages, scales, beam, first_width=0, sign_variants=variants)


def e8_init() -> tuple[torch.Tensor, torch.Tensor]:
    """The 512 abs patterns of D8 + 1/2 nearest the origin, and their parity flags.

    Ties on the last shell (norm^2 = 14) are broken toward a small largest entry, then
    lexicographically, which is deterministic; Lloyd moves the patterns afterwards anyway.
    """
    vals = (0.5, 1.5, 2.5, 3.5)
    pats = torch.tensor(list(itertools.product(vals, repeat=8)), dtype=torch.float64)
    nrm = (pats * pats).sum(1)
    key = nrm * 100.0 + pats.max(1).values
    pats = pats[torch.argsort(key, stable=True)[:512]]
    parity = pats.sum(1).round().long() % 2  # number of minus signs with the sum even
    return pats.to(torch.float32), parity.to(torch.int32)


def gaussian(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g)


def lloyd_orbit_update(stage: OrbitStage, target: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """New abs patterns: the mean of ``signs * target`` over the rows coded to each pattern."""
    y = target * stage.signs(codes)  # (n, 8) folded into the positive orthant (nearly)
    pat = ((codes.to(torch.int32) & 0xFFFF) >> 7).long()
    cnt = torch.bincount(pat, minlength=512).to(torch.float32)
    tot = torch.zeros(512, 8).index_add_(0, pat, y)
    new = torch.where(cnt[:, None] > 0, tot / cnt.clamp_min(1.0)[:, None], stage.abs)
    # Keep patterns strictly positive: a zero coordinate would make two codes decode alike.
    return new.clamp_min(1e-3)


def train_stage1(n: int, iters: int, log=print) -> OrbitStage:
    abs_, parity = e8_init()
    abs_ = abs_ * 0.9  # E8 ball's best scale for unit Gaussians (measured 0.0948 at 0.9)
    x = gaussian(n, SEED)
    for it in range(iters):
        st = OrbitStage(abs_, parity)
        codes = st.nearest(x)
        abs_ = lloyd_orbit_update(st, x, codes)
        if it % 10 == 0 or it == iters - 1:
            mse = ((x - st.decode(codes)) ** 2).mean().item()
            log(f"s1 it {it}: train mse {mse:.5f}")
    return OrbitStage(fp16_round(abs_), parity)


def fp16_round(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float16).to(torch.float32)


def encode_int(c: Codec, x: torch.Tensor) -> list[torch.Tensor]:
    """Per-stage int32 codes of ``x`` under codec ``c`` (its beam search), without storing."""
    parts = [c._encode_chunk(xs, c.beam) for xs in x.split(4096 if x.device.type == "cpu" else 16384)]
    return [torch.cat(p) for p in zip(*parts, strict=True)]


def stage_values(c: Codec, codes: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each stage's decoded (n, 8) codewords in table units (before the scale)."""
    return [st.decode(cc) for st, cc in zip(c.stages, codes, strict=True)]


def ls_scales(x: torch.Tensor, vals: list[torch.Tensor]) -> list[float]:
    """Least-squares scales: argmin_s |x - sum_j s_j vals_j|^2, in float64."""
    v = torch.stack([t.double().reshape(-1) for t in vals])  # (S, 8n)
    gram = v @ v.T
    rhs = v @ x.double().reshape(-1)
    return torch.linalg.solve(gram, rhs).tolist()


def fit_scales(c: Codec, x: torch.Tensor, iters: int = 3) -> Codec:
    """Alternate encoding and least-squares scales (each step lowers the error)."""
    for _ in range(iters):
        codes = encode_int(c, x)
        c = Codec(c.bpw, c.stages, ls_scales(x, stage_values(c, codes)), c.beam, c.first_width, c.sign_variants)
    return c


def mse(c: Codec, x: torch.Tensor) -> float:
    return ((x - c.decode(c.encode(x))) ** 2).mean().item()


def train_residual(
    prefix: Codec,
    kind: int,
    x: torch.Tensor,
    iters: int,
    log=print,
    name: str = "?",
    init8: str = "samples",
) -> Codec:
    """Train one more stage (8-bit table or 16-bit orbit) after ``prefix``, beam in the loop.

    Each iteration: encode with the whole codec (joint beam search), move the new stage's
    codewords to the mean of what they were chosen for (folded by the signs for orbit stages),
    then refit all the codec's scales by least squares.
    """
    g = torch.Generator().manual_seed(SEED + kind)
    resid = x - prefix.decode(prefix.encode(x))
    rms = resid.pow(2).mean().sqrt().item()
    if kind == 8:
        if init8 == "cube":  # the 1-bit-per-coordinate scalar quantizer, +-0.8 rms
            bits = (torch.arange(256)[:, None] >> torch.arange(8)) & 1
            new: OrbitStage | TableStage = TableStage(0.8 * (1.0 - 2.0 * bits.float()))
        else:
            rows = torch.randperm(x.shape[0], generator=g)[:256]
            new = TableStage(resid[rows] / rms)
    else:
        abs_, parity = e8_init()
        new = OrbitStage(abs_ * 0.6, parity)  # the residual is compact: start below 0.9
    c = _codec(prefix.bpw, [*prefix.stages, new], [*prefix.scales, rms], prefix.beam)
    for it in range(iters):
        codes = encode_int(c, x)
        vals = stage_values(c, codes)
        rest = sum(s * v for s, v in zip(c.scales[:-1], vals[:-1], strict=True))
        target = (x - rest) / c.scales[-1]  # what the new stage should have produced
        if kind == 8:
            cc = codes[-1].long()
            cnt = torch.bincount(cc, minlength=256).to(torch.float32)
            tot = torch.zeros(256, 8).index_add_(0, cc, target)
            table = torch.where(cnt[:, None] > 0, tot / cnt.clamp_min(1.0)[:, None], new.table)
            new = TableStage(table)
        else:
            new = OrbitStage(lloyd_orbit_update(new, target, codes[-1]), new.parity)
        vals[-1] = new.decode(codes[-1])
        c = _codec(c.bpw, [*c.stages[:-1], new], ls_scales(x, vals), c.beam)
        if it % 5 == 0 or it == iters - 1:
            err = ((x - sum(s * v for s, v in zip(c.scales, vals, strict=True))) ** 2).mean()
            log(f"{name} it {it}: train mse {err.item():.6f} scales {[round(s, 4) for s in c.scales]}")
    new = TableStage(fp16_round(new.table)) if kind == 8 else OrbitStage(fp16_round(new.abs), new.parity)
    return _codec(c.bpw, [*c.stages[:-1], new], c.scales, c.beam)


def train_joint(c: Codec, x: torch.Tensor, iters: int, update: list[int], log=print, name: str = "?") -> Codec:
    """Joint Lloyd over several stages of one codec: encode (beam), then update the stages in
    ``update`` one after another (each to the mean of what it should have produced given the
    others' current values), then refit all scales by least squares."""
    for it in range(iters):
        codes = encode_int(c, x)
        vals = stage_values(c, codes)
        stages = list(c.stages)
        for j in update:
            rest = sum(s * v for i, (s, v) in enumerate(zip(c.scales, vals, strict=True)) if i != j)
            target = (x - rest) / c.scales[j]
            st = stages[j]
            if isinstance(st, TableStage):
                cc = codes[j].long()
                cnt = torch.bincount(cc, minlength=256).to(torch.float32)
                tot = torch.zeros(256, 8).index_add_(0, cc, target)
                st = TableStage(torch.where(cnt[:, None] > 0, tot / cnt.clamp_min(1.0)[:, None], st.table))
            else:
                st = OrbitStage(lloyd_orbit_update(st, target, codes[j]), st.parity)
            stages[j] = st
            vals[j] = st.decode(codes[j])
        c = _codec(c.bpw, stages, ls_scales(x, vals), c.beam)
        if it % 5 == 0 or it == iters - 1:
            err = ((x - sum(s * v for s, v in zip(c.scales, vals, strict=True))) ** 2).mean()
            log(f"{name} joint it {it}: train mse {err.item():.6f} scales {[round(s, 4) for s in c.scales]}")
    stages = [
        TableStage(fp16_round(s.table)) if isinstance(s, TableStage) else OrbitStage(fp16_round(s.abs), s.parity)
        for s in c.stages
    ]
    return _codec(c.bpw, stages, c.scales, c.beam)


def refit_all_scales(src: str, dst: str, log=print, n: int = 40_000) -> None:
    """Second pass of the shipped tables: the tables were trained with a beam of 4 and an
    earlier candidate list (best sign vector per pattern only); the scales are refitted here for
    the search that ships (3 sign vectors per pattern, ``BEAM[bpw]``)."""
    data = torch.load(src, weights_only=True)
    xfit = gaussian(n, SEED + 3)
    for bpw in LAYOUT:
        c = fit_scales(build(bpw, data, BEAM[bpw], 0, FIT_SIGN_VARIANTS), xfit, iters=2)
        data[f"scales_{bpw}"] = torch.tensor(c.scales, dtype=torch.float32)
        log(f"rate {bpw}: beam {BEAM[bpw]} scales {c.scales} fit-set mse {mse(c, xfit):.6g}")
        torch.save(data, dst)


# (rate, Lloyd iterations) of the --retune-high step, in order: r8_3, s3 (shared with rates 7-8,
# which are retuned after it), r8_4, s4.
RETUNE_PLAN = ((5, 8), (6, 8), (7, 8), (8, 16))


def retune_last_stage(
    data: dict,
    bpw: int,
    log=print,
    n: int = 600_000,
    iters: int = 8,
    n_fit: int = 200_000,
    device: str = "cpu",
) -> dict:
    """Fine-tune the last stage of rate ``bpw`` with the shipped search, then refit that rate's
    scales; returns ``data`` with those entries replaced. A table shared with higher rates
    (``s3``) changes them too: retune those afterwards (``RETUNE_PLAN`` does).

    Lloyd from the shipped table: encode ``n`` fresh Gaussians with the whole codec as it ships
    (``BEAM[bpw]``, ``SIGN_VARIANTS`` sign vectors, ``FIRST_WIDTH[bpw]``) on ``device``, move each
    codeword of the last stage to the mean of what it was chosen for (summed on the CPU, in a
    fixed order), refit the scales by least squares (float64).
    """
    name = LAYOUT[bpw][-1]
    if any(name in LAYOUT[r] for r in LAYOUT if r < bpw):
        raise ValueError(f"{name} is used by a lower rate; retuning it would change that rate")
    x = gaussian(n, SEED + 10 + bpw)
    xd = x.to(device)
    c = build(bpw, data, BEAM[bpw], FIRST_WIDTH[bpw])
    for it in range(iters):
        codes = [cc.cpu() for cc in encode_int(c, xd)]
        vals = stage_values(c, codes)
        rest = sum(s * v for s, v in zip(c.scales[:-1], vals[:-1], strict=True))
        target = (x - rest) / c.scales[-1]
        last = c.stages[-1]
        if isinstance(last, TableStage):
            cc = codes[-1].long()
            cnt = torch.bincount(cc, minlength=256).to(torch.float32)
            tot = torch.zeros(256, 8).index_add_(0, cc, target)
            last = TableStage(torch.where(cnt[:, None] > 0, tot / cnt.clamp_min(1.0)[:, None], last.table))
        else:
            last = OrbitStage(lloyd_orbit_update(last, target, codes[-1]), last.parity)
        vals[-1] = last.decode(codes[-1])
        c = Codec(bpw, [*c.stages[:-1], last], ls_scales(x, vals), c.beam, c.first_width, c.sign_variants)
        err = ((x - sum(s * v for s, v in zip(c.scales, vals, strict=True))) ** 2).mean()
        log(f"{name} retune it {it}: train mse {err.item():.6g} scales {[round(s, 4) for s in c.scales]}")
    last = c.stages[-1]
    if isinstance(last, TableStage):
        data[f"{name}_table"] = fp16_round(last.table)
    else:
        data[f"{name}_abs"] = fp16_round(last.abs)
    data[f"scales_{bpw}"] = torch.tensor(c.scales, dtype=torch.float32)
    xfit = gaussian(n_fit, SEED + 20 + bpw)
    c = build(bpw, data, BEAM[bpw], FIRST_WIDTH[bpw])
    for _ in range(2):  # alternate encoding and least-squares scales, as fit_scales does
        codes = [cc.cpu() for cc in encode_int(c, xfit.to(device))]
        c = Codec(bpw, c.stages, ls_scales(xfit, stage_values(c, codes)), c.beam, c.first_width, c.sign_variants)
    data[f"scales_{bpw}"] = torch.tensor(c.scales, dtype=torch.float32)
    log(f"rate {bpw}: scales {c.scales}")
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="path of the .pt file to write")
    ap.add_argument("--stage1", help="reuse stage 1 (s1_abs, s1_parity) from this .pt file")
    ap.add_argument(
        "--n-resid", type=int, default=300_000, help="training rows for rates 3-4 (half that for rates 5-8)"
    )
    ap.add_argument("--iters", type=int, default=10, help="Lloyd iterations, residual stages")
    ap.add_argument("--train-beam", type=int, default=4, help="beam width while training")
    ap.add_argument("--upto", type=int, default=8, help="highest rate to train")
    ap.add_argument(
        "--refit-scales", metavar="TABLES", help="only refit every rate's scales in TABLES with its BEAM and write OUT"
    )
    ap.add_argument(
        "--retune-high",
        metavar="TABLES",
        help="only fine-tune the last stages of rates 5-8 in TABLES (RETUNE_PLAN) and refit their scales; write OUT",
    )
    ap.add_argument("--device", default="cpu", help="device of the encoder in --retune-high (cpu or cuda)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()

    def log(msg: str) -> None:
        print(f"[{time.time() - t0:7.1f}s] {msg}", flush=True)

    if args.refit_scales:
        refit_all_scales(args.refit_scales, args.out, log)
        return
    if args.retune_high:
        data = torch.load(args.retune_high, weights_only=True)
        for bpw, iters in RETUNE_PLAN:
            data = retune_last_stage(data, bpw, log, iters=iters, device=args.device)
        torch.save(data, args.out)
        log(f"wrote {args.out}")
        return
    if args.stage1:
        d = torch.load(args.stage1, weights_only=True)
        s1 = OrbitStage(d["s1_abs"], d["s1_parity"])
    else:
        s1 = train_stage1(2_000_000, 60, log)
    out: dict = {"version": VERSION, "s1_abs": s1.abs, "s1_parity": s1.parity}
    x = gaussian(args.n_resid, SEED + 1)
    xfit = gaussian(args.n_resid // 2, SEED + 2)

    def save(bpw: int, c: Codec) -> Codec:
        c = fit_scales(_codec(c.bpw, c.stages, c.scales, DEFAULT_BEAM), xfit)
        out[f"scales_{bpw}"] = torch.tensor(c.scales, dtype=torch.float32)
        log(f"rate {bpw}: scales {c.scales} fit-set mse {mse(c, xfit):.6g}")
        torch.save(out, args.out)
        return _codec(c.bpw, c.stages, c.scales, args.train_beam)

    chain = {2: save(2, _codec(2, [s1], [1.0], args.train_beam))}
    # (rate, prefix rate, kind, table name): shared tables, see codec.LAYOUT
    plan = [
        (3, 2, 8, "r8_2"),
        (4, 2, 16, "s2"),
        (5, 4, 8, "r8_3"),
        (6, 4, 16, "s3"),
        (7, 6, 8, "r8_4"),
        (8, 6, 16, "s4"),
    ]
    for bpw, pre, kind, name in plan:
        if bpw > args.upto:
            break
        xs = x if bpw <= 4 else x[: args.n_resid // 2]  # later stages: cost grows with depth
        c = train_residual(chain[pre], kind, xs, args.iters, log, name)
        st = c.stages[-1]
        if isinstance(st, TableStage):
            out[f"{name}_table"] = st.table
        else:
            out[f"{name}_abs"], out[f"{name}_parity"] = st.abs, st.parity
        chain[bpw] = save(bpw, c)
    if args.upto == 8:
        refit_all_scales(args.out, args.out, log)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
