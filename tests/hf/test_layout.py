"""Tiled codes in glq.hf (glq.hf.linear.set_code_layout): what loading does on a GPU running the CUDA C kernels,
tried here on the CPU, where the reference reads tiled codes by untiling them, so every result must be
bit-identical to the row-major model's. The GPU side (the kernels reading the tiled layout, loading tiling by
default) is in tests/hf/test_cuda.py and tests/kernels/test_cuda.py."""

from __future__ import annotations

import pytest
import torch

from glq.hf import _kernels
from glq.hf.linear import FUSE_ENV, TILE_ENV, FusedGLQLinear, GLQLinear, set_code_layout

IDS = torch.tensor([[5, 9, 2, 7, 3, 1]])


@pytest.fixture(scope="module")
def tileable_config():
    """A Llama whose projections all have a tiled layout but the down one (in_features 320 = 2.5 x 128), so a
    model mixes both layouts."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=320, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=64)


def _model(config):
    from glq.hf.testing import random_glq_model

    def rate(name):  # one rate per block (siblings fuse), 2 and 3 bpw (an 8-bit stage)
        return 2 + int(name.split(".")[2]) % 2

    return random_glq_model(config, rate, dtype=torch.float32, tables="random")


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _layers(model):
    return [m for m in model.modules() if isinstance(m, GLQLinear)]


@pytest.mark.parametrize("fuse", ["0", "1"])
def test_tiled_model_gives_the_same_logits_and_state_dict(tileable_config, monkeypatch, fuse):
    """Tiling every layer that has the layout (fused groups unfused and fused again around it) changes neither
    the logits nor state_dict(), which stays row-major; untiling restores the very same tensors."""
    monkeypatch.setenv(FUSE_ENV, fuse)
    model = _model(tileable_config)
    assert not any(m.codes_tiled for m in _layers(model))  # on the CPU loading keeps row-major codes
    want, sd = _logits(model), {k: v.clone() for k, v in model.state_dict().items()}
    codes_before = [c.clone() for m in _layers(model) for c in m.codes]

    assert set_code_layout(model, True) == 6 * tileable_config.num_hidden_layers  # all but down_proj
    layers = _layers(model)
    assert [m.codes_tiled for m in layers] == [m.in_features != 320 for m in layers]
    assert any(isinstance(m, FusedGLQLinear) for m in layers) == (fuse == "1")
    changed = [not torch.equal(a, b) for a, b in zip(codes_before, (c for m in layers for c in m.codes), strict=True)]
    assert any(changed)
    assert torch.equal(_logits(model), want)
    got = model.state_dict()
    assert got.keys() == sd.keys() and all(torch.equal(got[k], v) for k, v in sd.items())

    assert set_code_layout(model, False) == 0
    assert all(torch.equal(a, b) for a, b in zip(codes_before, (c for m in _layers(model) for c in m.codes),
                                                 strict=True))


def test_dequantize_and_load_state_dict_of_a_tiled_layer(tileable_config, monkeypatch):
    """A tiled layer's dense weight is the row-major one's; load_state_dict (row-major tensors) puts the layer
    back to row-major codes instead of reading them as tiled."""
    monkeypatch.setenv(FUSE_ENV, "0")
    model = _model(tileable_config)
    layer = model.model.layers[0].self_attn.q_proj
    w, sd = layer.dequantize(), {k: v.clone() for k, v in layer.state_dict().items()}
    assert layer.set_code_layout(True) and layer.codes_tiled
    assert torch.equal(layer.dequantize(), w)
    layer.load_state_dict(sd)
    assert not layer.codes_tiled and torch.equal(layer.codes_0, sd["codes_0"])
    assert torch.equal(layer.dequantize(), w)
    down = model.model.layers[0].mlp.down_proj
    assert not down.set_code_layout(True) and not down.codes_tiled  # in_features 320: no tiled layout


def test_loading_tiles_where_the_cuda_kernels_run_unless_turned_off(tileable_config, monkeypatch):
    """set_code_layout(model) (what loading calls) tiles where wants_tiled_codes says the device's backend reads
    tiled codes faster (the CUDA C one; stood in for here), and GLQ_HF_TILE=0 keeps the folder's layout."""
    monkeypatch.setenv(FUSE_ENV, "1")
    model = _model(tileable_config)
    assert not _kernels.wants_tiled_codes(torch.device("cpu"))
    want = _logits(model)
    monkeypatch.setattr(_kernels, "wants_tiled_codes", lambda device: True)
    monkeypatch.setenv(TILE_ENV, "0")
    assert set_code_layout(model) == 0
    monkeypatch.delenv(TILE_ENV)
    assert set_code_layout(model) == 12
    assert torch.equal(_logits(model), want)


def test_saved_folder_of_a_tiled_model_is_the_row_major_folder(tileable_config, tmp_path, monkeypatch):
    """save_pretrained of a tiled (and fused) model writes the same file as the row-major model."""
    monkeypatch.setenv(FUSE_ENV, "1")
    model = _model(tileable_config)
    model.save_pretrained(tmp_path / "plain")
    set_code_layout(model, True)
    model.save_pretrained(tmp_path / "tiled")
    file = "model.safetensors"
    assert (tmp_path / "tiled" / file).read_bytes() == (tmp_path / "plain" / file).read_bytes()
