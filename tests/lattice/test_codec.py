"""Tests of glq.lattice: contract, exact search, round trips, sizes, symmetry, bad inputs."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from glq.lattice import StageTable, codec, decode_stage
from glq.lattice import reference as ref
from glq.lattice.codec import EXACT, LAYOUT, ROUND_TRIP
from glq.lattice.generate import e8_init
from glq.lattice.stages import OrbitStage, TableStage

# One thread: on the shared 2-core CI machine, 2-thread torch ops slowed 5-10x whenever the
# other core was busy (measured); one thread is never slower than that.
torch.set_num_threads(1)

RATES = list(range(2, 9))
RATE_IDS = [f"bpw{r}" for r in RATES]

# 2-4 bpw: the goals of the issue (measured 0.0888, 0.0245, 0.00660 on 100k vectors), with 3%
# for the test's 20k-vector sample. 5-8 bpw: 1.2x the benchmark's figures (1.83e-3, 5.01e-4,
# 1.38e-4, 3.81e-5 on 50k vectors); at these rates rare large-norm vectors dominate the error,
# so a 2k-vector sample varies by 10% and more.
MSE_MAX = {2: 0.0900, 3: 0.0250, 4: 0.0072, 5: 2.2e-3, 6: 6.0e-4, 7: 1.66e-4, 8: 4.6e-5}


def gauss(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))


def with_outliers(n: int, seed: int) -> torch.Tensor:
    """Unit Gaussians with every 10th row scaled by 10 and every 50th by 1000."""
    x = gauss(n, seed)
    x[::10] *= 10.0
    x[::50] *= 1000.0
    return x


def all_codewords(st: OrbitStage | TableStage) -> torch.Tensor:
    n = 65536 if st.bits == 16 else 256
    return st.decode(torch.arange(n, dtype=torch.int32))


def distinct_stages() -> list[tuple[str, OrbitStage | TableStage]]:
    seen: dict[str, OrbitStage | TableStage] = {}
    for bpw, names in LAYOUT.items():
        for i, name in enumerate(names):
            seen.setdefault(name, codec(bpw).stages[i])
    return list(seen.items())


STAGE_NAMES = sorted({n for names in LAYOUT.values() for n in names})


def stage_by_name(name: str) -> OrbitStage | TableStage:
    return dict(distinct_stages())[name]


# -- construction and API ----------------------------------------------------------------------
def test_import_is_cheap_and_cuda_free():
    code = (
        "import sys, glq.lattice\n"
        "assert 'torch' not in sys.modules, 'import glq.lattice imported torch'\n"
        "import torch\n"
        "c = glq.lattice.codec(2)\n"
        "c.decode(c.encode(torch.randn(4, 8)))\n"
        "assert not torch.cuda.is_initialized()\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("bad", [0, 1, 9, 2.0, "2", True, None], ids=repr)
def test_bad_bpw(bad):
    with pytest.raises(ValueError, match=r"\[2, 3, 4, 5, 6, 7, 8\]"):
        codec(bad)


@pytest.mark.parametrize("bpw", RATES, ids=RATE_IDS)
def test_bits_and_stored_sizes(bpw):
    c = codec(bpw)
    assert c.bits == 8 * bpw
    codes = c.encode(gauss(137, bpw))
    assert isinstance(codes, tuple) and len(codes) == len(LAYOUT[bpw])
    for cc in codes:
        assert cc.shape == (137,) and cc.dtype in (torch.int16, torch.uint8)
    assert sum(cc.element_size() * 8 for cc in codes) == 8 * bpw


@pytest.mark.parametrize("bpw", RATES, ids=RATE_IDS)
def test_tables_shape_and_size(bpw):
    tabs = codec(bpw).tables()
    assert [t.bits for t in tabs] == [16 if n[0] == "s" else 8 for n in LAYOUT[bpw]]
    for t in tabs:
        assert isinstance(t, StageTable) and isinstance(t.scale, float) and t.scale > 0
        vals = t.abs if t.bits == 16 else t.table
        assert vals is not None and vals.dtype == torch.float32 and vals.device.type == "cpu"
        assert vals.shape == ((512, 8) if t.bits == 16 else (256, 8))
        # Kernel tables must fit shared memory: <= 64 KiB per stage (these are 8-16 KiB).
        assert vals.numel() * 4 <= 64 * 1024
        assert torch.equal(vals.half().float(), vals), "table values must be fp16-representable"
        if t.bits == 16:
            assert t.parity is not None and t.parity.shape == (512,)
            assert set(t.parity.tolist()) <= {0, 1}
            assert bool((vals > 0).all()), "a zero abs entry would duplicate codewords"


@pytest.mark.parametrize("bpw", RATES, ids=RATE_IDS)
def test_reference_decode_matches(bpw):
    c = codec(bpw)
    codes = c.encode(with_outliers(300, bpw))
    assert torch.equal(ref.decode(c.tables(), codes), c.decode(codes))
    t0 = c.tables()[0]
    assert torch.equal(decode_stage(t0, codes[0]), c.scales[0] * c.stages[0].decode(codes[0]))


@pytest.mark.parametrize("bpw", RATES, ids=RATE_IDS)
def test_mse_quality(bpw):
    x = gauss(20_000 if bpw <= 4 else 2_000, 100 + bpw)
    c = codec(bpw)
    mse = ((x - c.decode(c.encode(x))) ** 2).mean().item()
    limit = MSE_MAX[bpw] * (1.03 if bpw <= 4 else 1.0)
    assert mse <= limit, f"bpw={bpw}: mse {mse:.3e} > {limit:.3e}"


# -- exact search ------------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 3, 1000], ids=lambda n: f"n{n}")
def test_2bpw_nearest_matches_brute_force(n):
    c = codec(2)
    x = with_outliers(n, 7 + n)
    x_hat = c.decode(c.encode(x))
    d = ((x - x_hat) ** 2).sum(1)
    cw = c.scales[0] * all_codewords(c.stages[0])  # (65536, 8)
    bf = torch.cdist(x.double(), cw.double()).pow(2).min(1).values.float()
    # float32 rounding only: relative to |x|^2, whose size sets the rounding of both.
    tol = 1e-5 * (1.0 + (x * x).sum(1))
    assert bool(((d - bf).abs() <= tol).all()), (d - bf).abs().max()


@pytest.mark.parametrize("name", STAGE_NAMES)
def test_each_stage_nearest_matches_brute_force(name):
    st = stage_by_name(name)
    x = with_outliers(600, len(name)) * 0.3
    x = torch.cat([x, all_codewords(st)[::257] + 1e-3 * gauss(1, 3)])  # near codewords too
    codes, dist = st.candidates(x, 1)
    d = ((x - st.decode(codes[:, 0])) ** 2).sum(1)
    bf = torch.cdist(x.double(), all_codewords(st).double()).pow(2).min(1).values.float()
    tol = 1e-5 * (1.0 + (x * x).sum(1))
    assert bool(((d - bf).abs() <= tol).all()), (d - bf).abs().max()
    assert bool(((dist[:, 0] - d).abs() <= tol).all())


@pytest.mark.parametrize("name", [n for n in STAGE_NAMES if n[0] == "s"])
def test_orbit_candidates_sorted_and_distinct(name):
    st = stage_by_name(name)
    x = gauss(500, 11)
    codes, dist = st.candidates(x, 8)
    assert bool((dist[:, 1:] >= dist[:, :-1]).all())
    assert bool((codes.sort(1).values.diff(1) != 0).all())
    assert torch.equal(codes[:, 0], st.nearest(x))
    d = ((x[:, None, :] - st.decode(codes.reshape(-1)).reshape(500, 8, 8)) ** 2).sum(2)
    assert torch.allclose(d, dist, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in STAGE_NAMES if n[0] == "s"])
def test_orbit_candidates_are_the_k_nearest(name):
    # With 16 sign vectors per pattern the candidate list is the exact 8 nearest codewords
    # (measured on every row; 3 sign vectors per pattern missed some on 24% of rows).
    st = stage_by_name(name)
    x = gauss(300, 12)
    _, dist = st.candidates(x, 8, variants=16)
    bf = torch.cdist(x.double(), all_codewords(st).double()).pow(2).topk(8, largest=False).values.float()
    tol = 1e-5 * (1.0 + (x * x).sum(1, keepdim=True))
    assert bool(((dist - bf).abs() <= tol).all())


@pytest.mark.parametrize("bpw", RATES[1:], ids=RATE_IDS[1:])
def test_joint_search_never_worse_than_greedy(bpw):
    c = codec(bpw)
    x = with_outliers(1000, 20 + bpw)
    err_joint = ((x - c.decode(c.encode(x))) ** 2).sum(1)
    err_greedy = ((x - c.decode(c.encode(x, beam=1))) ** 2).sum(1)
    tol = 1e-6 * (1.0 + (x * x).sum(1))
    assert bool((err_joint <= err_greedy + tol).all())
    gaussian_rows = torch.ones(1000, dtype=torch.bool)
    gaussian_rows[::10] = False  # outliers would swamp the mean
    assert err_joint[gaussian_rows].mean() < 0.97 * err_greedy[gaussian_rows].mean()


# -- round trips -------------------------------------------------------------------------------
def test_2bpw_codes_round_trip_exactly():
    c = codec(2)
    codes = (torch.arange(65536, dtype=torch.int32),)
    stored = (c._store(c.stages[0], codes[0]),)
    y = c.decode(stored)
    back = c.encode(y)
    assert torch.equal(back[0], stored[0])  # no duplicate codewords: codes come back too
    assert torch.equal(c.decode(back), y)


def test_2bpw_decode_encode_decode_is_exact():
    c = codec(2)
    y = c.decode(c.encode(with_outliers(2000, 30)))
    assert torch.equal(c.decode(c.encode(y)), y)


# Round trips, multi-stage: (rows, seed) of the sample per rate, sized to keep the test fast.
ROUND_TRIP_SAMPLE = {3: (2000, 33), 4: (2000, 34), 5: (400, 35), 6: (400, 36), 7: (150, 37), 8: (150, 38)}
# Uniformly random codes per rate (their decoded points lie far deeper in the stage-1 ranking
# than decoded Gaussians: up to 466 at 4 bpw, 879 at 8 bpw), and rows of large norm.
ROUND_TRIP_RANDOM = {3: 500, 4: 300, 5: 200, 6: 200, 7: 30, 8: 12}
# 7-8 bpw are exact only with encode(exact=True) (5-40x slower, codec.ROUND_TRIP); by default the
# beam keeps the nearest stage-1 codewords of its input, but a decoded point can lie far from
# its own stage-1 code, so some come back as another code. Measured on 20k rows: ~2% of decoded
# Gaussians, ~35% of random codes (notes/lattice.md). This bound guards against regressions.
ROUND_TRIP_DEFAULT_MIN = {7: 0.9, 8: 0.9}


def random_codes(c, n: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    rand = [torch.randint(0, 2**st.bits, (n,), generator=g, dtype=torch.int32) for st in c.stages]
    return tuple(c._store(st, r) for st, r in zip(c.stages, rand, strict=True))


@pytest.mark.parametrize("bpw", RATES[1:], ids=RATE_IDS[1:])
def test_multistage_round_trip_every_row(bpw):
    # Exact at every rate: the default encoder at 3-6 bpw, encode(exact=True) at 7-8.
    c = codec(bpw)
    exact = None if bpw in EXACT or bpw in ROUND_TRIP else True
    n, seed = ROUND_TRIP_SAMPLE[bpw]
    y = c.decode(c.encode(gauss(n, seed)))
    y2 = c.decode(c.encode(y, exact=exact))
    missed = (~(y2 == y).all(1)).nonzero().squeeze(1).tolist()
    assert not missed, f"bpw={bpw}: {len(missed)} of {n} rows do not round-trip exactly, e.g. rows {missed[:5]}"
    # codes no Gaussian would produce: every tuple of stage codes is a code
    y = c.decode(random_codes(c, ROUND_TRIP_RANDOM[bpw], seed))
    assert torch.equal(c.decode(c.encode(y, exact=exact)), y)
    # decoded points of large norm (outer codewords; |y_i| >= 2 widens the float windows)
    y = c.decode(c.encode(gauss(100 if exact is None else 10, seed + 1) * 4.0))
    assert torch.equal(c.decode(c.encode(y, exact=exact)), y)


@pytest.mark.parametrize("bpw", sorted(ROUND_TRIP_DEFAULT_MIN), ids=[f"bpw{r}" for r in ROUND_TRIP_DEFAULT_MIN])
def test_default_round_trip_rate_7_8bpw(bpw):
    c = codec(bpw)
    n, seed = ROUND_TRIP_SAMPLE[bpw]
    y = c.decode(c.encode(gauss(n, seed)))
    exact = float((c.decode(c.encode(y)) == y).all(1).float().mean())
    assert exact >= ROUND_TRIP_DEFAULT_MIN[bpw], f"bpw={bpw}: only {exact:.3f} of decoded rows round-trip"


@pytest.mark.parametrize("bpw", [4, 5, 6, 7], ids=["bpw4", "bpw5", "bpw6", "bpw7"])
def test_round_trip_filter(bpw):
    # The float32 filter (glq.lattice.roundtrip) must pass every decoded point (a superset test)
    # and almost no Gaussian row, or exactness would cost a decomposition per row.
    from glq.lattice import roundtrip

    c = codec(bpw)
    c.encode(gauss(4, 1), exact=True)  # builds the filter
    pairs = c._pairs[torch.device("cpu")]
    n = 200 if bpw < 7 else 10
    codes = random_codes(c, n, 60 + bpw)
    x = gauss(1000 if bpw < 7 else 20, 70 + bpw)
    if bpw == 4:
        y = c.decode(codes).double()
        assert all(bool(pairs.hit(i, y[:, i], 0.0).all()) for i in range(8))
        ok = torch.stack([pairs.hit(i, x[:, i].double(), 0.0) for i in range(8)]).all(0)
        assert int(ok.sum()) == 0
        return
    rows, tail = roundtrip.peel_candidates(pairs, c.stages[2:], c.scales[2:], c.decode(codes))
    found = set(zip(rows.tolist(), *[t.tolist() for t in tail], strict=True))
    masks = [0xFFFF if st.bits == 16 else 0xFF for st in c.stages[2:]]
    true_tail = [(cc.to(torch.int32) & mk).tolist() for cc, mk in zip(codes[2:], masks, strict=True)]
    assert all((r, *t) in found for r, t in enumerate(zip(*true_tail, strict=True)))
    # Gaussian candidates passing: ~1 in 2000 rows at 5-6 bpw; two peeled stages (7 bpw: 262k
    # tests per row, wider windows) pass ~0.2 per row.
    assert roundtrip.peel_candidates(pairs, c.stages[2:], c.scales[2:], x)[0].numel() <= (2 if bpw < 7 else 10)


def test_3bpw_encode_is_nearest_of_all_codes():
    # 3 bpw is exact nearest over all 2^24 codes (codec.Codec._complete): brute force over the
    # 256 second-stage codewords, each with its brute-force nearest stage-1 point.
    c = codec(3)
    x = with_outliers(24, 3)
    x[::4] *= 0.2  # small vectors: the second stage matters most
    err = ((x - c.decode(c.encode(x))) ** 2).sum(1)
    cw1 = c.scales[0] * all_codewords(c.stages[0])  # (65536, 8)
    cw2 = c.scales[1] * all_codewords(c.stages[1])  # (256, 8)
    bf = torch.stack([torch.cdist((xi - cw2).double(), cw1.double()).pow(2).min() for xi in x]).float()
    tol = 1e-5 * (1.0 + (x * x).sum(1))
    assert bool((err <= bf + tol).all()), (err - bf).max()


def test_4bpw_nearest_is_nearest_of_all_codes():
    # encode(x, nearest=True) at 4 bpw is exact nearest over all 2^32 codes (Codec._ball_search):
    # brute force over the 65,536 stage-1 codewords, each with the exact nearest second-stage
    # codeword of its residual (that stage's own search is checked against brute force above).
    c = codec(4)
    x = with_outliers(12, 5)
    x[1::4] *= 0.3  # short vectors: the second stage's choice matters most
    err = ((x - c.decode(c.encode(x, nearest=True))) ** 2).sum(1)
    cw1 = c.scales[0] * all_codewords(c.stages[0])  # (65536, 8), as decode scales it
    bf = []
    for xi in x:
        b = c.stages[1].nearest((xi - cw1) / c.scales[1])
        bf.append(((xi - (cw1 + c.scales[1] * c.stages[1].decode(b))) ** 2).sum(1).min())
    assert torch.equal(err, torch.stack(bf))  # decode's own operations: the same float, not just close


def test_4bpw_nearest_beats_the_beam_and_round_trips():
    c = codec(4)
    x = gauss(400, 23)
    beam = ((x - c.decode(c.encode(x))) ** 2).sum(1)
    best = ((x - c.decode(c.encode(x, nearest=True))) ** 2).sum(1)
    assert bool((best <= beam).all())
    assert int((best < beam).sum()) >= 4  # ~3.4% of Gaussian rows (notes/lattice.md): the search is not idle
    # a decoded point, even of a uniformly random code, comes back bit for bit
    g = torch.Generator().manual_seed(3)
    codes = tuple(torch.randint(-32768, 32768, (300,), generator=g).to(torch.int16) for _ in range(2))
    y = c.decode(codes)
    assert torch.equal(c.decode(c.encode(y, nearest=True)), y)


def test_nearest_is_refused_where_no_exact_search_exists():
    x = gauss(5, 1)
    for bpw in (2, 3):
        c = codec(bpw)
        assert all(torch.equal(u, v) for u, v in zip(c.encode(x, nearest=True), c.encode(x), strict=True))
    for bpw in (5, 8):
        with pytest.raises(ValueError, match=f"available at \\[2, 3, 4\\] bpw, not {bpw}"):
            codec(bpw).encode(x, nearest=True)


@pytest.mark.parametrize("k", [8, 64])
def test_candidates_bound_is_valid(k):
    st = codec(2).stages[0]
    x = with_outliers(200, 14) * 0.5
    codes, _, outside = st.candidates_bounded(x, k)
    d = torch.cdist(x.double(), all_codewords(st).double()).pow(2)
    d.scatter_(1, codes.long(), float("inf"))  # only codewords not returned
    tol = 1e-5 * (1.0 + (x * x).sum(1))
    assert bool((outside.double() <= d.min(1).values + tol).all())


@pytest.mark.parametrize("bpw", RATES, ids=RATE_IDS)
def test_encode_is_deterministic(bpw):
    c = codec(bpw)
    x = gauss(500, 40 + bpw)
    a, b = c.encode(x), c.encode(x.clone())
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))


def test_input_dtypes_accepted():
    c = codec(3)
    x = gauss(64, 5)
    ref_codes = c.encode(x)
    for dt in (torch.float64, torch.float16, torch.bfloat16):
        got = c.encode(x.to(dt))
        assert got[0].dtype == torch.int16 and got[1].dtype == torch.uint8
    assert all(torch.equal(u, v) for u, v in zip(c.encode(x.double()), ref_codes, strict=True))


# -- codebook structure ------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in STAGE_NAMES if n[0] == "s"])
def test_orbit_codebook_symmetry(name):
    st = stage_by_name(name)
    cw = all_codewords(st)
    assert torch.unique(cw, dim=0).shape[0] == 65536, "all codes must decode to distinct vectors"
    as_set = {tuple(r) for r in cw.tolist()}
    for flips in ([0, 1], [3, 7], [0, 2, 5, 6]):  # even numbers of sign flips map it to itself
        f = cw.clone()
        f[:, flips] = -f[:, flips]
        assert {tuple(r) for r in f[::97].tolist()} <= as_set
    # every codeword's number of minus signs has its pattern's parity
    neg = (cw < 0).sum(1) % 2
    pat = torch.arange(65536) >> 7
    assert torch.equal(neg.to(torch.int32), st.parity[pat])
    # the stored pattern is the abs value of the codeword
    assert torch.equal(cw.abs(), st.abs[pat])


def test_stage1_keeps_e8_parities():
    # Lloyd moves the patterns but keeps E8's half-integer-coset parity flags (generate.py).
    assert torch.equal(codec(2).stages[0].parity, e8_init()[1])


# -- bad inputs --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("x", "err", "msg"),
    [
        pytest.param(torch.zeros(4, 7), ValueError, r"shape \(n, 8\) rather than \(4, 7\)", id="dim7"),
        pytest.param(torch.zeros(8), ValueError, r"rather than \(8,\)", id="1d"),
        pytest.param(torch.zeros(2, 4, 8), ValueError, r"rather than \(2, 4, 8\)", id="3d"),
        pytest.param(torch.zeros(0, 8), ValueError, "empty", id="empty"),
        pytest.param(torch.full((3, 8), float("nan")), ValueError, "NaN/inf in 3 row", id="nan"),
        pytest.param(torch.tensor([[float("inf")] + [0.0] * 7]), ValueError, "NaN/inf", id="inf"),
        pytest.param(torch.zeros(4, 8, dtype=torch.int32), TypeError, "floating-point", id="int"),
        pytest.param([[0.0] * 8], TypeError, "torch.Tensor rather than list", id="list"),
    ],
)
def test_encode_bad_inputs(x, err, msg):
    with pytest.raises(err, match=msg):
        codec(3).encode(x)


def test_decode_bad_codes():
    c = codec(3)
    codes = c.encode(gauss(5, 1))
    with pytest.raises(ValueError, match="expected 2 per-stage code tensors rather than 1"):
        c.decode(codes[:1])
    with pytest.raises(ValueError, match=r"stage 1: expected a 1-D torch.uint8"):
        c.decode((codes[0], codes[1].to(torch.int16)))
    with pytest.raises(ValueError, match="expected 5 codes like stage 0 rather than 4"):
        c.decode((codes[0], codes[1][:4]))


def test_exact_switch():
    x = with_outliers(300, 17)
    c = codec(3)
    fast = ((x - c.decode(c.encode(x, exact=False))) ** 2).sum(1)
    best = ((x - c.decode(c.encode(x))) ** 2).sum(1)
    assert bool((best <= fast + 1e-6 * (1.0 + (x * x).sum(1))).all())
    with pytest.raises(ValueError, match="only available at 3-8 bpw"):
        codec(2).encode(x, exact=True)
    # 4-6 bpw: exact=False is the plain beam; the default only differs on decoded points
    c = codec(5)
    assert all(torch.equal(u, v) for u, v in zip(c.encode(x), c.encode(x, exact=False), strict=True))


def test_bad_beam():
    with pytest.raises(ValueError, match="beam must be >= 1 rather than 0"):
        codec(4).encode(gauss(3, 1), beam=0)


# -- CUDA --------------------------------------------------------------------------------------
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_4bpw_nearest_matches_cpu():
    # both are exact nearest: the same minimal errors (up to the order of an 8-term float sum)
    c = codec(4)
    x = with_outliers(600, 41)
    cpu = ((x - c.decode(c.encode(x, nearest=True))) ** 2).sum(1)
    gpu = ((x - c.decode(tuple(t.cpu() for t in c.encode(x.cuda(), nearest=True)))) ** 2).sum(1)
    assert torch.allclose(gpu, cpu, rtol=1e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("bpw", RATES, ids=RATE_IDS)
def test_cuda_encode_matches_cpu_quality(bpw):
    c = codec(bpw)
    x = gauss(4096, 50 + bpw)
    codes = c.encode(x.cuda())
    assert all(cc.device.type == "cuda" for cc in codes)
    y = c.decode(codes)
    assert torch.equal(ref.decode(c.tables(), codes), y)
    mse_gpu = ((x.cuda() - y) ** 2).mean().item()
    mse_cpu = ((x - c.decode(c.encode(x))) ** 2).mean().item()
    assert abs(mse_gpu - mse_cpu) <= 1e-3 * mse_cpu


# -- generator ---------------------------------------------------------------------------------
def test_e8_init_is_in_e8():
    pats, parity = e8_init()
    assert pats.shape == (512, 8) and torch.unique(pats, dim=0).shape[0] == 512
    assert bool(((pats * 2) % 2 == 1).all()), "half-integer coset D8 + 1/2"
    # with `parity` minus signs the coordinate sum is even: the points lie in E8
    signs = torch.ones(512, 8)
    signs[:, 0] = 1 - 2 * parity.float()
    assert bool(((pats * signs).sum(1) % 2 == 0).all())


def test_generator_smoke():
    from glq.lattice.generate import _codec, fit_scales, train_residual

    x = gauss(3000, 9)
    c2 = codec(2)
    pre = _codec(2, c2.stages, c2.scales, 2)
    for kind in (8, 16):
        c = train_residual(pre, kind, x, iters=2, log=lambda _m: None)
        c = fit_scales(c, x, iters=1)
        err = ((x - c.decode(c.encode(x))) ** 2).mean().item()
        assert err < 0.5 * ((x - c2.decode(c2.encode(x))) ** 2).mean().item()


@pytest.mark.parametrize("bpw", [5, 6], ids=["bpw5", "bpw6"])
def test_round_trip_step_does_not_depend_on_its_chunks(bpw, monkeypatch):
    # GPUs run the round-trip step in much larger chunks (launch-bound there); the codes must be the
    # ones the CPU's cache-sized chunks give, for decoded points and Gaussians alike.
    from glq.lattice import roundtrip

    c = codec(bpw)
    x = torch.cat([c.decode(random_codes(c, 150, 90 + bpw)), gauss(150, 80 + bpw), 4.0 * gauss(20, 81)])
    small = c.encode(x)
    monkeypatch.setattr(roundtrip, "_chunks", lambda device: (1 << 10, 1 << 16, 1 << 22))
    big = c.encode(x)
    monkeypatch.setattr(roundtrip, "_chunks", lambda device: (3, 5, 64))  # ragged, tiny
    tiny = c.encode(x)
    for a, b, t in zip(small, big, tiny, strict=True):
        assert torch.equal(a, b) and torch.equal(a, t)
    assert torch.equal(c.decode(small)[:150], x[:150])  # the decoded points came back
