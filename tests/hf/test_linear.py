"""GLQLinear against its dense weight and an independent decode of the stored format."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from glq.hf.config import stage_bits
from glq.hf.testing import random_glq_linear, stage_tables

RATES = [2, 3, 4, 5, 6, 7, 8]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("in_f,out_f", [(960, 2688), (2688, 960)], ids=["960x2688", "2688x960"])
@pytest.mark.parametrize("bpw", RATES, ids=[f"bpw{b}" for b in RATES])
def test_forward_matches_dense_weight(bpw, in_f, out_f):
    layer = random_glq_linear(in_f, out_f, bpw, seed=bpw, tables="random")
    x = torch.randn(3, in_f, generator=torch.Generator().manual_seed(1))
    y = layer(x)
    w = layer.dequantize()
    assert w.shape == (out_f, in_f) and w.dtype == torch.float32
    # Both sides compute in float32 from the same decoded values; only summation order differs.
    assert _rel(y, F.linear(x, w)) < 1e-5


def _sylvester_blockdiag(blocks) -> torch.Tensor:
    mats = []
    for n in blocks:
        h = torch.ones(1, 1, dtype=torch.float64)
        while h.shape[0] < n:
            h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
        mats.append(h / math.sqrt(n))
    return torch.block_diag(*mats)


@pytest.mark.parametrize("signs_dtype", ["int8", "float16"])
@pytest.mark.parametrize("bpw", RATES, ids=[f"bpw{b}" for b in RATES])
def test_dequantize_is_the_format_formula(bpw, signs_dtype):
    """W = diag(s_out) H_out diag(row_scale) W̃ H_in diag(s_in), W̃ decoded by glq.lattice's oracle;
    float16 signs (fine-tuned gains) enter exactly where the ±1 signs do."""
    from glq.lattice.reference import StageTable, decode

    in_f, out_f = 96, 40  # blocks (64, 32) and (32, 8): non-power-of-two on both sides
    layer = random_glq_linear(in_f, out_f, bpw, seed=10 + bpw, tables="random", signs_dtype=signs_dtype)
    assert layer.signs_in.dtype == getattr(torch, signs_dtype)
    if signs_dtype == "float16":
        assert not bool(((layer.signs_in == 1) | (layer.signs_in == -1)).all())  # gains are really there
        x = torch.randn(5, in_f, generator=torch.Generator().manual_seed(2))
        assert _rel(layer(x), F.linear(x, layer.dequantize())) < 1e-5
    st = [StageTable(s["bits"], s.get("abs"), s.get("parity"), s.get("table"), s["scale"])
          for s in stage_tables(bpw, "random")]
    codes = tuple(c.reshape(-1) for c in layer.codes)
    wt = decode(st, codes).reshape(out_f, in_f).double()
    h_in, h_out = _sylvester_blockdiag(layer.spec.in_blocks), _sylvester_blockdiag(layer.spec.out_blocks)
    w = (torch.diag(layer.signs_out.double()) @ h_out @ torch.diag(layer.row_scale.double()) @ wt @ h_in
         @ torch.diag(layer.signs_in.double()))
    assert _rel(layer.dequantize(), w) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_low_precision_input_and_batch_dims(dtype):
    layer = random_glq_linear(160, 96, 3, bias=True, tables="random")
    x = torch.randn(2, 5, 160, generator=torch.Generator().manual_seed(2))
    ref = F.linear(x, layer.dequantize(), layer.bias)
    y = layer(x.to(dtype))
    assert y.shape == (2, 5, 96) and y.dtype == dtype
    # The input rounding alone costs ~2^-8 relative in bf16; allow twice that plus output rounding.
    assert _rel(y.float(), ref) < (2e-2 if dtype == torch.bfloat16 else 3e-3)


def test_codes_keep_their_stored_dtypes():
    layer = random_glq_linear(64, 16, 7, tables="random")
    assert [c.dtype for c in layer.codes] == [torch.int16] * 3 + [torch.uint8]
    assert len(layer.codes) == len(stage_bits(7))
    assert layer.row_scale.dtype == torch.float32 and layer.signs_in.dtype == torch.int8
    assert not any(k.startswith("_") for k in layer.state_dict())  # float signs are derived, not saved


@pytest.mark.parametrize("cast", ["half", "bfloat16", "to"])
def test_casting_the_model_keeps_the_stored_dtypes(cast):
    """model.half() / .bfloat16() / .to(dtype) cast only the bias: row scales, fine-tuned float16
    gains and the derived float32 signs keep their dtype and every bit (a bfloat16 row scale would
    move outputs by up to 0.4%), so the cast layer computes what the uncast one does on the same
    input. Also for a fused group's joined buffers."""
    import copy

    from torch import nn

    from glq.hf.linear import SharedInput, fuse_siblings

    layer = random_glq_linear(96, 48, 3, bias=True, tables="random", signs_dtype="float16")
    ref = copy.deepcopy(layer)
    dtype = torch.float16 if cast == "half" else torch.bfloat16
    cast_layer = layer.to(dtype) if cast == "to" else getattr(layer, cast)()
    assert cast_layer is layer and layer.bias.dtype == dtype
    for name, buf in ref.named_buffers():
        if name != "bias":
            got = getattr(layer, name)
            assert got.dtype == buf.dtype and torch.equal(got, buf), name
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(4)).to(dtype)
    ref.bias.data = ref.bias.to(dtype)
    assert torch.equal(layer(x), ref(x))
    # a fused head holds the group's rows in its own buffers: the same rule
    a, b = random_glq_linear(64, 16, 2, tables="random"), random_glq_linear(64, 24, 2, tables="random")
    b.signs_in.copy_(a.signs_in)
    b.attach(a.tables)
    holder = nn.ModuleDict({"a": a, "b": b})
    a.shared_input = b.shared_input = SharedInput(2)
    assert fuse_siblings(holder) == 1
    rows = {n: t.clone() for n, t in a.named_buffers()}
    holder.half()
    assert {n: t.dtype for n, t in a.named_buffers()} == {n: t.dtype for n, t in rows.items()}
    assert all(torch.equal(t, rows[n]) for n, t in a.named_buffers())


def test_unattached_layer_and_wrong_tables_fail_clearly():
    from glq.hf.linear import GLQLinear

    layer = random_glq_linear(64, 16, 2, tables="random")
    bare = GLQLinear(layer.spec)
    with pytest.raises(RuntimeError, match="no codebook tables attached"):
        bare(torch.randn(1, 64))
    with pytest.raises(ValueError, match=r"tables have stages \(16, 8\) but bpw=2 needs \(16,\)"):
        bare.attach(random_glq_linear(64, 16, 3, tables="random").tables)
