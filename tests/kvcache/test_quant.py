"""INT8 quantize/dequantize reference: error bounded by the scale, layouts, awkward shapes."""

from __future__ import annotations

import pytest
import torch

from glq.kvcache.quant import (
    SCHEMES,
    dequantize_per_channel,
    dequantize_per_token,
    quantize_per_channel,
    quantize_per_token,
)

SHAPES = [
    pytest.param((1, 1, 4, 1), 4, id="B1-H1-T4-D1-G4"),
    pytest.param((2, 3, 12, 3), 3, id="B2-H3-T12-D3-G3"),
    pytest.param((1, 2, 274, 137), 137, id="B1-H2-T274-D137-G137"),
    pytest.param((2, 3, 256, 64), 128, id="B2-H3-T256-D64-G128"),
]


def _states(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2.0
    # Offset channels and one outlier channel, as post-RoPE keys have.
    x[..., 0] += 10.0
    x[..., -1] *= 20.0
    return x.to(dtype)


def _sqnr_db(x, y):
    x, y = x.double(), y.double()
    return float(10 * torch.log10(x.pow(2).sum() / (x - y).pow(2).sum()))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("shape", "group"), SHAPES)
def test_per_channel_error_within_half_step(shape, group, scheme):
    x = _states(shape)
    q = quantize_per_channel(x, group, scheme)
    b, h, t, d = shape
    assert q.codes.dtype == torch.int8 and q.codes.shape == shape
    assert q.scale.shape == (b, h, t // group, d) and q.scale.dtype == torch.float32
    assert (q.zero is None) == (scheme == "absmax")
    y = dequantize_per_channel(q, group, torch.float32)
    step = q.scale.repeat_interleave(group, dim=2)  # (B, H, T, D)
    # Half a step, plus fp32 rounding of q * s + z.
    assert ((x - y).abs() <= 0.5 * step + 1e-6 * x.abs().clamp_min(1)).all()


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("shape", "group"), SHAPES)
def test_per_token_error_within_half_step(shape, group, scheme):
    x = _states(shape)
    q = quantize_per_token(x, scheme)
    assert q.scale.shape == (*shape[:3], 1)
    y = dequantize_per_token(q, torch.float32)
    assert ((x - y).abs() <= 0.5 * q.scale + 1e-6 * x.abs().clamp_min(1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_dequantize_to_low_precision_adds_only_its_rounding(dtype):
    x = _states((2, 3, 256, 64), dtype)
    q = quantize_per_channel(x, 128, "minmax")
    y32 = dequantize_per_channel(q, 128, torch.float32)
    y = dequantize_per_channel(q, 128, dtype)
    assert y.dtype == dtype
    # One rounding of the fp32 result to `dtype`: at most half an ulp.
    assert ((y.float() - y32).abs() <= torch.finfo(dtype).eps * y32.abs()).all()


def test_constant_and_zero_groups_are_exact():
    x = torch.zeros(1, 2, 8, 4)
    x[:, 1] = 3.25
    for scheme in SCHEMES:
        assert torch.equal(dequantize_per_channel(quantize_per_channel(x, 4, scheme), 4), x)
        assert torch.equal(dequantize_per_token(quantize_per_token(x, scheme)), x)


def test_dequantize_into_a_slice_of_a_longer_buffer():
    x = _states((2, 3, 256, 64))
    q = quantize_per_channel(x, 128)
    out = torch.full((2, 3, 300, 64), float("nan"))
    dequantize_per_channel(q, 128, out=out[:, :, :256])
    assert torch.equal(out[:, :, :256], dequantize_per_channel(q, 128))
    assert out[:, :, 256:].isnan().all()


def test_sqnr_on_gaussian_states():
    x = torch.randn(1, 4, 512, 64, generator=torch.Generator().manual_seed(1))
    # Uniform INT8 on a Gaussian block: ~40 dB per token (absmax), more per channel group.
    assert _sqnr_db(x, dequantize_per_channel(quantize_per_channel(x, 128), 128)) > 40
    assert _sqnr_db(x, dequantize_per_token(quantize_per_token(x))) > 35


def test_bad_arguments_raise():
    x = torch.randn(1, 1, 10, 4)
    with pytest.raises(ValueError, match="T=10 tokens is not a multiple of group_size=4"):
        quantize_per_channel(x, 4)
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_per_token(x, "rms")
    with pytest.raises(ValueError, match=r"\(B, H, T, D\)"):
        quantize_per_token(x[0])
