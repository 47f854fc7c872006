"""The offline test model and the shipped text: real model, real data, standard protocol."""

from __future__ import annotations

import json

import pytest
import torch

from glq.quant import data
from glq.quant.models import SMOLLM2_NAME, resolve_model


def test_wikitext_string_is_the_standard_one():
    text = data.wikitext2_test_text()
    # "\n\n".join of HF-style rows: the string starts with a blank row, then the title row.
    assert text.startswith("\n\n = Robert Boulter = \n")
    assert "\n\n\n\n" in text  # blank rows survive as empty joins
    assert text.count("\n = ") > 600  # section headings of the whole split


def test_calibration_never_reads_the_evaluation_text():
    with pytest.raises(ValueError, match="evaluation text"):
        data.calibration_text(data.WIKITEXT2_TEST)
    with pytest.raises(ValueError, match="neither a shipped name"):
        data.calibration_text("no-such-source")
    text = data.calibration_text("c4")
    assert len(text) > 300_000
    assert "\n\n\n" not in text  # empty rows are dropped before joining


def test_resolve_model_passes_through_hub_ids_and_folders(tmp_path):
    assert resolve_model("meta-llama/Llama-3.1-8B") == "meta-llama/Llama-3.1-8B"
    assert resolve_model(tmp_path) == str(tmp_path)


@pytest.mark.slow
def test_smollm2_is_the_documented_model(smollm2_path):
    cfg = json.loads((smollm2_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (576, 1536, 30)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (9, 3, 49152)
    assert cfg["tie_word_embeddings"] is True
    assert "quantization_config" not in cfg  # a plain folder, not a "gguf-quantized" one
    assert resolve_model(SMOLLM2_NAME) == str(smollm2_path)


@pytest.mark.slow
def test_smollm2_tokens_and_perplexity(smollm2_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glq.quant.evaluate import perplexity, wikitext2_ids

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    ids = wikitext2_ids(tok)
    assert ids.shape == (1, 304_986)  # the count documented for this tokenizer
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    result = perplexity(model, ids, seqlen=2048, limit=2)
    assert result.windows == 2
    # ANCHORS.md: 20.38 over the first 40 windows; two windows land near it, and a
    # broken conversion (wrong tokenizer, transposed weights) lands in the thousands.
    assert 12 < result.ppl < 35, result
