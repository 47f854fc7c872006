"""End to end: a real model in, a GLQ folder out, at true size, resumable, streamable."""

from __future__ import annotations

import json

import pytest
import torch

from glq.hf.config import GLQFormat, stage_bits
from glq.quant import pipeline, quantize

# Both tunings off: these tests check the folder's layout and the quantizer itself (the tunings'
# own tests are in test_finetune.py; tuned layers store float16 gains, not bare signs).
TINY = {"nsamples": 4, "seqlen": 32, "dataset": "c4", "progress": False, "finetune_epochs": 0,
        "finetune_model_epochs": 0}


@pytest.fixture(scope="module")
def tiny_2bpw(tiny_llama_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "glq"
    summary = quantize(str(tiny_llama_path), out, bpw=2, **TINY)
    return out, summary


def test_folder_holds_codes_at_their_true_width(tiny_2bpw, tiny_llama_path, folder_tensors):
    out, summary = tiny_2bpw
    cfg = json.loads((out / "config.json").read_text())
    fmt = GLQFormat.from_dict(cfg["quantization_config"])
    assert len(fmt.layers) == 2 * 7 and fmt.rates == (2,)
    tensors = folder_tensors(out)
    for name, spec in fmt.layers.items():
        # No dense copy of a quantized weight (one layer carries glq.hf's empty guard tensor).
        assert tensors.get(f"{name}.weight", torch.empty(0)).numel() == 0
        codes = tensors[f"{name}.codes_0"]
        assert codes.dtype == torch.int16 and codes.shape == (spec.out_features, spec.in_features // 8)
        assert sorted(tensors[f"{name}.signs_in"].unique().tolist()) == [-1, 1]
    # seeds are per layer: signs differ between layers of equal width
    a, b = (tensors[f"model.layers.{i}.self_attn.q_proj.signs_in"] for i in (0, 1))
    assert not torch.equal(a, b)
    # ... except that layers reading one input share its signs (recorded as in_seed), so glq.hf
    # rotates that input once; their output signs stay their own
    sig = lambda rel, kind="in": tensors[f"model.layers.1.{rel}.signs_{kind}"]  # noqa: E731
    q, k, v, o = (f"self_attn.{n}_proj" for n in "qkvo")
    gate, up, down = (f"mlp.{n}_proj" for n in ("gate", "up", "down"))
    assert torch.equal(sig(q), sig(k)) and torch.equal(sig(q), sig(v)) and torch.equal(sig(gate), sig(up))
    assert not torch.equal(sig(q), sig(o)) and not torch.equal(sig(gate)[:64], sig(down)[:64])
    assert not torch.equal(sig(k, "out"), sig(v, "out"))
    specs = {n.split("layers.1.")[1]: s for n, s in fmt.layers.items() if ".layers.1." in n}
    assert specs[k].in_seed == specs[v].in_seed == specs[q].seed != specs[k].seed and specs[q].in_seed is None
    assert specs[up].in_seed == specs[gate].seed and specs[o].in_seed is None and specs[down].in_seed is None
    assert summary["bpw_codes"] == pytest.approx(2.0)
    assert summary["bpw_with_overhead"] < 2.0 + 8 * 6 / 96  # row scale + two sign bytes per row/col
    assert "model.embed_tokens.weight" in tensors and "lm_head.weight" not in tensors  # tied
    assert "model.layers.0.input_layernorm.weight" in tensors
    assert any(k.startswith("glq_tables.bpw2_stage0_") for k in tensors)
    assert not (out / pipeline.PARTIAL).exists()
    assert json.loads((out / "bpw_allocation.json").read_text())["mean_bpw"] == 2


@pytest.mark.parametrize("bpw", [3, 4])
def test_odd_and_even_rates_store_their_stages(tiny_llama_path, tmp_path, bpw, folder_tensors):
    out = tmp_path / "glq"
    summary = quantize(str(tiny_llama_path), out, bpw=bpw, **TINY)
    tensors = folder_tensors(out)
    name = "model.layers.1.mlp.down_proj"
    widths = [tensors[f"{name}.codes_{s}"].element_size() * 8 for s in range(len(stage_bits(bpw)))]
    assert widths == list(stage_bits(bpw))
    assert summary["bpw_codes"] == pytest.approx(bpw)


def test_quantization_error_shrinks_with_rate(tiny_llama_path, tmp_path):
    sqnr = {}
    for bpw in (2, 4):
        s = quantize(str(tiny_llama_path), tmp_path / f"b{bpw}", bpw=bpw, **TINY)
        sqnr[bpw] = sum(v["sqnr_db"] for v in s["layers"].values()) / len(s["layers"])
    # Each extra bit per weight is worth about 6 dB; demand most of it.
    assert sqnr[4] - sqnr[2] > 9, sqnr
    assert sqnr[2] > 7, sqnr


def test_resume_after_a_crash_gives_the_same_folder(tiny_llama_path, tmp_path, crash_on_second_block, tiny_2bpw,
                                                     assert_same_folder):
    out = tmp_path / "glq"
    with pytest.raises(KeyboardInterrupt):
        quantize(str(tiny_llama_path), out, bpw=2, **TINY)
    assert json.loads((out / pipeline.PARTIAL / "state.json").read_text())["blocks"] == 1
    crash_on_second_block()  # restore
    with pytest.raises(ValueError, match="other arguments"):
        quantize(str(tiny_llama_path), out, bpw=3, **TINY)
    quantize(str(tiny_llama_path), out, bpw=2, **TINY)
    assert_same_folder(out, tiny_2bpw[0])


def test_streaming_gives_the_same_folder(tiny_llama_path, tmp_path, tiny_2bpw, folder_tensors):
    out = tmp_path / "glq"
    quantize(str(tiny_llama_path), out, bpw=2, streaming=True, **TINY)
    streamed, fresh = folder_tensors(out), folder_tensors(tiny_2bpw[0])
    assert streamed.keys() == fresh.keys()
    for k in fresh:
        assert torch.equal(streamed[k], fresh[k]), k


def test_fractional_rate_allocates_and_accepts_its_map(tiny_llama_path, tmp_path):
    out = tmp_path / "mixed"
    s = quantize(str(tiny_llama_path), out, bpw=2.5, min_bpw=2, max_bpw=3, **TINY)
    alloc = json.loads((out / "bpw_allocation.json").read_text())
    assert 2.3 < alloc["mean_bpw"] <= 2.5
    assert {v["bpw"] for v in alloc["layers"].values()} == {2, 3}
    assert s["bpw_codes"] == pytest.approx(alloc["mean_bpw"])
    again = quantize(str(tiny_llama_path), tmp_path / "again", bpw=2.5, bpw_map=out / "bpw_allocation.json", **TINY)
    assert again["bpw_codes"] == pytest.approx(s["bpw_codes"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"bpw": 9}, "out of range"),
        ({"bpw": 1.5}, "out of range"),
        ({"bpw": 2.5, "min_bpw": 4, "max_bpw": 3}, "min_bpw=4 is above max_bpw=3"),
        ({"bpw": 2, "device": "cuda:0"}, "no CUDA GPU") if not torch.cuda.is_available() else ({"bpw": 10}, "range"),
        ({"bpw": 2, "nsamples": 100000}, "fewer than nsamples x seqlen"),
    ],
    ids=["bpw9", "bpw1.5", "min-above-max", "cuda", "short-calibration"],
)
def test_bad_arguments_are_named(tiny_llama_path, tmp_path, kwargs, message):
    args = {**TINY, **kwargs}
    with pytest.raises(ValueError, match=message):
        quantize(str(tiny_llama_path), tmp_path / "x", **args)


def test_output_folder_that_is_not_a_run_is_refused(tiny_llama_path, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a resumable GLQ run"):
        quantize(str(tiny_llama_path), out, bpw=2, **TINY)


def test_unquantized_tensors_keep_the_checkpoint_dtype(tiny_llama_path, tmp_path, folder_tensors):
    """A bf16 checkpoint quantized on the CPU (computed in float32) is written back in bf16."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.bfloat16).save_pretrained(src)
    AutoTokenizer.from_pretrained(tiny_llama_path).save_pretrained(src)
    out = tmp_path / "glq"
    quantize(str(src), out, bpw=2, **TINY)
    tensors = folder_tensors(out)
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16
    assert tensors["model.layers.0.mlp.up_proj.row_scale"].dtype == torch.float32
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
