"""A broken GLQ folder fails in from_pretrained, naming the layer and the problem."""

from __future__ import annotations

import pytest
import torch

from glq.hf.checks import GLQLoadError

Q = "model.layers.1.self_attn.q_proj"


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def _set(key, fn):
    def hook(t):
        t[key] = fn(t[key])
    return hook


def test_unknown_format_version(make_folder):
    def bump(cfg):
        cfg["quantization_config"]["format_version"] = 2

    with pytest.raises(ValueError, match=r"GLQ format version 2 is not supported .*upgrade glq-hf"):
        _load(make_folder(config_hook=bump))


def test_missing_tensor(make_folder):
    folder = make_folder(tensors_hook=lambda t: t.pop(f"{Q}.signs_in"))
    with pytest.raises(GLQLoadError, match=rf"layer '{Q}': tensor '{Q}.signs_in' is missing"):
        _load(folder)


def test_code_shape_contradicts_config(make_folder):
    folder = make_folder(tensors_hook=_set(f"{Q}.codes_0", lambda c: c[:95]))
    with pytest.raises(GLQLoadError, match=rf"'{Q}.codes_0' has shape \(95, 12\) but the config needs \(96, 12\)"):
        _load(folder)


def test_config_contradicts_model(make_folder):
    def shrink(cfg):
        cfg["quantization_config"]["layers"][Q].update(out_features=64, out_blocks=[64])

    with pytest.raises(GLQLoadError, match=rf"layer '{Q}': the config says .*out_features=64 but the model's "
                                           r"linear has .*out_features=96"):
        _load(make_folder(config_hook=shrink))


def test_unknown_layer_name(make_folder):
    def add(cfg):
        layers = cfg["quantization_config"]["layers"]
        layers["model.layers.7.mlp.up_proj"] = dict(layers[Q])

    with pytest.raises(GLQLoadError, match=r"layer 'model.layers.7.mlp.up_proj': the LlamaForCausalLM has no module"):
        _load(make_folder(config_hook=add))


def test_eight_bit_stage_with_sixteen_bit_codes_is_out_of_range(make_folder):
    folder = make_folder(rates=3, tensors_hook=_set(f"{Q}.codes_1", lambda c: c.to(torch.int16)))
    with pytest.raises(GLQLoadError, match=rf"'{Q}.codes_1' is I16 but must be U8 \(stage 1 of bpw=3 is 8-bit"):
        _load(folder)


def test_extra_stage_contradicts_rate(make_folder):
    def extra(t):
        t[f"{Q}.codes_1"] = t[f"{Q}.codes_0"].clone()

    with pytest.raises(GLQLoadError, match=rf"has '{Q}.codes_1' but bpw=2 has only 1 stage"):
        _load(make_folder(tensors_hook=extra))


def test_table_with_too_few_patterns(make_folder):
    folder = make_folder(tensors_hook=_set("glq_tables.bpw2_stage0_abs", lambda a: a[:256]))
    with pytest.raises(GLQLoadError, match=r"'glq_tables.bpw2_stage0_abs' has shape \(256, 8\) but the config needs "
                                           r"\(512, 8\) .*16-bit codes index 512 patterns"):
        _load(folder)


def test_bad_values_found_after_loading(make_folder):
    def corrupt(t):
        t[f"{Q}.signs_in"][5] = 0
        t[f"{Q}.row_scale"][3] = float("nan")
        t["glq_tables.bpw2_stage0_parity"][0] = 2

    with pytest.raises(GLQLoadError, match=r"3 problem\(s\)") as err:
        _load(make_folder(tensors_hook=corrupt))
    text = str(err.value)
    assert f"layer '{Q}': signs_in must be ±1 but element 5 is 0" in text
    assert f"layer '{Q}': row_scale[3] is nan, not finite" in text
    assert "glq_tables.bpw2_stage0_parity must be 0 or 1, found [2]" in text


def test_all_header_problems_are_listed_at_once(make_folder):
    def two(t):
        t.pop(f"{Q}.signs_out")
        t["model.layers.0.mlp.down_proj.row_scale"] = t["model.layers.0.mlp.down_proj.row_scale"].double()

    with pytest.raises(GLQLoadError, match=r"2 problem\(s\)") as err:
        _load(make_folder(tensors_hook=two))
    assert "'model.layers.0.mlp.down_proj.row_scale' is F64 but must be F32" in str(err.value)
