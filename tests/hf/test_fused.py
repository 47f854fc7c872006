"""Fused sibling layers (the default; GLQ_HF_FUSE=0 turns it off): q/k/v and gate/up as one GLQ linear each.

On the CPU reference path the fused product happens to equal the unfused one bit for bit; the
checks allow float32 rounding (relative error < 1e-5) because GPU kernels may split the sum
differently for a taller matrix. The Hadamard-domain part is exact per segment (checked as such).
"""

from __future__ import annotations

import copy

import pytest
import torch

from glq.hf import _kernels
from glq.hf.linear import FUSE_ENV, FusedGLQLinear, GLQLinear, fuse_siblings, link_shared_inputs, unfuse_siblings

IDS = torch.tensor([[5, 9, 2, 7, 3, 1]])


@pytest.fixture(autouse=True)
def _unfused_by_default(monkeypatch):
    """Each test turns fusion on itself; models built before that are the plain reference."""
    monkeypatch.setenv(FUSE_ENV, "0")


@pytest.fixture
def config(tiny_llama_path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_llama_path)


def _model(config, rates=2, **kwargs):
    from glq.hf.testing import random_glq_model

    return random_glq_model(config, rates, dtype=torch.float32, tables="random", **kwargs)


def _load(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def _assert_close(a, b):
    """Equal up to float32 rounding of the sums (the fused product may add in another order)."""
    assert a.shape == b.shape and a.dtype == b.dtype
    assert float((a - b).abs().max()) <= 1e-5 * float(b.abs().max()), float((a - b).abs().max())


def _count_kernel_calls(monkeypatch) -> dict:
    """Count the layer-level kernel calls; ``rows`` lists the codes' row count of each linear call."""
    calls = {"linear": 0, "linear_rotated": 0, "hadamard": 0, "rows": []}
    for fn in ("linear", "linear_rotated", "hadamard"):
        real = getattr(_kernels, fn)

        def counted(*a, _real=real, _fn=fn, **k):
            calls[_fn] += 1
            if _fn == "linear":
                calls["rows"].append(a[1][0].shape[0])
            return _real(*a, **k)

        monkeypatch.setattr(_kernels, fn, counted)
    return calls


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _persistent_buffers(model) -> list[torch.Tensor]:
    return [b for m in model.modules() for n, b in m._buffers.items()
            if b is not None and n not in m._non_persistent_buffers_set]


def test_fused_logits_match_with_one_linear_per_group(config, monkeypatch):
    """(a) uniform rate: q/k/v and gate/up fuse; the logits equal the unfused model's; each block
    makes 4 linear calls (q/k/v, o, gate/up, down) and no separate transform."""
    plain = _model(config)
    monkeypatch.setenv(FUSE_ENV, "1")
    fused = _model(config)
    attn, mlp = fused.model.layers[0].self_attn, fused.model.layers[0].mlp
    members = (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj)
    assert all(isinstance(m, FusedGLQLinear) for m in members)
    assert type(attn.o_proj) is GLQLinear and type(mlp.down_proj) is GLQLinear
    assert attn.k_proj.fused.head is attn.q_proj
    assert attn.q_proj.fused is not fused.model.layers[1].self_attn.q_proj.fused

    want = _logits(plain)
    calls = _count_kernel_calls(monkeypatch)
    got = _logits(fused)
    _assert_close(got, want)
    n = config.num_hidden_layers
    assert calls["linear"] == 4 * n and calls["linear_rotated"] == 0 and calls["hadamard"] == 0
    h, kv = config.hidden_size, config.num_key_value_heads * config.head_dim
    assert calls["rows"] == [h + 2 * kv, h, 2 * config.intermediate_size, h] * n
    assert attn.q_proj.fused._x is None and mlp.up_proj.fused._y is None  # let go once every member had its part


def test_fused_output_transform_is_exact_per_segment():
    """The joined output transform is block-diagonal over the members' blocks: each member's
    columns are exactly its own transform (the only place fusing could change the math besides
    the summation order of the matmul)."""
    from glq.hf.testing import _out_blocks

    g = torch.Generator().manual_seed(0)
    outs = (96, 32, 32)
    blocks = [_out_blocks(n) for n in outs]
    v = torch.randn(5, sum(outs), generator=g)
    signs = (torch.randint(0, 2, (sum(outs),), generator=g) * 2 - 1).float()
    joined = _kernels.hadamard(v, [b for bs in blocks for b in bs], None, signs)
    off = 0
    for n, bs in zip(outs, blocks, strict=True):
        alone = _kernels.hadamard(v[:, off:off + n].contiguous(), bs, None, signs[off:off + n])
        assert torch.equal(joined[:, off:off + n], alone)
        off += n


def test_dequantize_of_a_member_is_its_own_weight(config, monkeypatch):
    """(h) each member's tensors read as its own rows: dequantize() gives the same dense weight."""
    plain = _model(config)
    monkeypatch.setenv(FUSE_ENV, "1")
    fused = _model(config)
    for name in ("q_proj", "k_proj", "v_proj"):
        a, b = fused.model.layers[1].self_attn.get_submodule(name), plain.model.layers[1].self_attn.get_submodule(name)
        assert a.codes_0.shape == b.codes_0.shape and a.row_scale.shape == b.row_scale.shape
        assert torch.equal(a.dequantize(), b.dequantize())


def test_fusing_holds_no_extra_memory(config, monkeypatch):
    """(b) the joined tensors are the only copy: the same bytes in buffers and in state_dict(),
    the members' rows are views into the head's storage, and state_dict() gives separate tensors."""
    plain = _model(config)
    monkeypatch.setenv(FUSE_ENV, "1")
    fused = _model(config)
    assert _nbytes(fused.state_dict().values()) == _nbytes(plain.state_dict().values())
    assert _nbytes(b for _, b in fused.named_buffers()) == _nbytes(b for _, b in plain.named_buffers())
    assert _nbytes(_persistent_buffers(fused)) <= _nbytes(_persistent_buffers(plain))

    attn = fused.model.layers[0].self_attn
    head_storage = attn.q_proj._buffers["_fused_codes_0"].untyped_storage().data_ptr()
    for layer in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert not {"codes_0", "row_scale", "signs_out", "_signs_out_f"} & set(layer._buffers)
        assert layer.codes_0.untyped_storage().data_ptr() == head_storage
    glq_keys = [k for k, m in fused.named_modules() if isinstance(m, GLQLinear)]
    sd = fused.state_dict()
    ptrs = [sd[k].untyped_storage().data_ptr() for k in sd if k.rpartition(".")[0] in glq_keys]
    assert len(ptrs) == len(set(ptrs))  # what safetensors needs: no two tensors share storage


def test_fused_model_saves_the_unfused_folder_and_loads_again(make_folder, tmp_path, monkeypatch, folder_tensors):
    """(c) from_pretrained fuses with the variable set; save_pretrained writes the folder's own
    per-layer tensors (names, shapes, dtypes, values; the same bytes as an unfused model saves);
    the saved folder loads fused and unfused to the same logits."""
    src = make_folder(2)
    monkeypatch.setenv(FUSE_ENV, "1")
    model = _load(src)
    assert isinstance(model.model.layers[0].self_attn.k_proj, FusedGLQLinear)
    want = _logits(model)
    model.save_pretrained(tmp_path / "saved")
    stored, saved = folder_tensors(src), folder_tensors(tmp_path / "saved")
    assert saved.keys() == stored.keys()
    for k, t in stored.items():
        assert saved[k].dtype == t.dtype and saved[k].shape == t.shape, k
        if ".layers." in k and not k.endswith("weight"):  # the GLQ layers' tensors, unchanged
            assert torch.equal(saved[k], t), k

    assert torch.equal(_logits(_load(tmp_path / "saved")), want)
    monkeypatch.setenv(FUSE_ENV, "0")
    plain = _load(tmp_path / "saved")
    assert not any(isinstance(m, FusedGLQLinear) for m in plain.modules())
    _assert_close(_logits(plain), want)
    plain.save_pretrained(tmp_path / "plain")  # the unfused model writes the very same file
    file = "model.safetensors"
    assert (tmp_path / "plain" / file).read_bytes() == (tmp_path / "saved" / file).read_bytes()


def test_moving_and_copying_a_fused_model(config, monkeypatch):
    """(d) the members look their rows up in the head at call time, so moving the model (which
    replaces the head's buffers; here every tensor is replaced by a copy, as a device move does) and
    deepcopy keep the group consistent; a dtype cast leaves the stored tensors as they are."""
    monkeypatch.setenv(FUSE_ENV, "1")
    model = _model(config)
    want = _logits(model)
    attn = model.model.layers[0].self_attn
    old = attn.q_proj._buffers["_fused_row_scale"]
    model._apply(lambda t: t.clone())  # what .to(other device) does: new tensors everywhere
    head_rs = attn.q_proj._buffers["_fused_row_scale"]
    assert head_rs.data_ptr() != old.data_ptr() and torch.equal(head_rs, old)
    # k's rows follow q's in the head's new tensor
    assert attn.k_proj.row_scale.data_ptr() == head_rs.data_ptr() + 96 * 4
    assert torch.equal(_logits(model), want)
    model.to(torch.float64)
    assert attn.k_proj.row_scale.dtype == torch.float32 and attn.k_proj._signs_out_f.dtype == torch.float32
    model.to(torch.float32)
    assert torch.equal(_logits(model), want)

    twin = copy.deepcopy(model)
    t_attn = twin.model.layers[0].self_attn
    assert t_attn.k_proj.fused.head is t_attn.q_proj and t_attn.k_proj.fused is not attn.k_proj.fused
    assert torch.equal(_logits(twin), want)


def test_mixed_rates_keep_the_shared_input_only(config, monkeypatch):
    """(e) q at 2 bpw, k at 3: q/k/v stay separate layers sharing their input transform; gate/up,
    at one rate, fuse."""
    rates = lambda n: 3 if "k_proj" in n else 2  # noqa: E731
    plain = _model(config, rates)
    monkeypatch.setenv(FUSE_ENV, "1")
    model = _model(config, rates)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    assert type(attn.q_proj) is GLQLinear and type(attn.k_proj) is GLQLinear
    assert attn.q_proj.shared_input is attn.k_proj.shared_input is attn.v_proj.shared_input is not None
    assert isinstance(mlp.gate_proj, FusedGLQLinear) and isinstance(mlp.up_proj, FusedGLQLinear)
    n = config.num_hidden_layers
    assert unfuse_siblings(model) == n and fuse_siblings(model) == n and fuse_siblings(model) == 0

    want = _logits(plain)
    calls = _count_kernel_calls(monkeypatch)
    _assert_close(_logits(model), want)
    assert calls["linear"] == 3 * n and calls["linear_rotated"] == 3 * n and calls["hadamard"] == n


def test_members_called_with_other_inputs(config, monkeypatch):
    """(f) a member called with another tensor than its siblings, or after the input was modified
    in place, computes its own rows; inference tensors are matched by identity."""
    plain = _model(config)
    monkeypatch.setenv(FUSE_ENV, "1")
    model = _model(config)
    attn, ref = model.model.layers[0].self_attn, plain.model.layers[0].self_attn
    kv = config.num_key_value_heads * config.head_dim
    qkv = config.hidden_size + 2 * kv  # rows of the whole group; kv: of k alone
    calls = _count_kernel_calls(monkeypatch)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(3, config.hidden_size, generator=g), torch.randn(3, config.hidden_size, generator=g)
    with torch.no_grad():
        q, k, v = attn.q_proj(x), attn.k_proj(y), attn.v_proj(x)
        assert calls["rows"] == [qkv, kv]  # q/k/v for x at once, then k alone for y; v took its part
        _assert_close(q, ref.q_proj(x))
        _assert_close(k, ref.k_proj(y))
        _assert_close(v, ref.v_proj(x))

        calls["rows"].clear()
        x2 = torch.randn(2, 4, config.hidden_size, generator=g)
        q = attn.q_proj(x2)  # q already had its part of x: a new round
        x2.mul_(2)  # in place: the kept result is stale now
        k, v = attn.k_proj(x2), attn.v_proj(x2)
        assert calls["rows"] == [qkv, kv, kv]
        assert q.shape == (2, 4, config.hidden_size) and k.shape == (2, 4, kv)
        _assert_close(k, ref.k_proj(x2))
        _assert_close(v, ref.v_proj(x2))

    calls["rows"].clear()
    with torch.inference_mode():
        x3 = torch.randn(3, config.hidden_size)
        outs = [attn.q_proj(x3), attn.k_proj(x3), attn.v_proj(x3)]
    assert calls["rows"] == [qkv] and attn.q_proj.fused._x is None
    for out, name in zip(outs, ("q_proj", "k_proj", "v_proj"), strict=True):
        with torch.no_grad():
            _assert_close(out, ref.get_submodule(name)(x3.clone()))


def test_qkv_biases_are_joined(monkeypatch):
    """(g) Qwen2's q/k/v carry biases: the group joins them and adds them once."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=256,
                         tie_word_embeddings=True)
    model = _model(config)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, GLQLinear) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=g))
    want, k_bias = _logits(model), attn.k_proj.bias.clone()

    monkeypatch.setenv(FUSE_ENV, "1")
    link_shared_inputs(model)
    assert isinstance(attn.k_proj, FusedGLQLinear) and "_fused_bias" in attn.q_proj._buffers
    assert torch.equal(attn.k_proj.bias, k_bias) and torch.equal(model.state_dict()[
        "model.layers.0.self_attn.k_proj.bias"], k_bias)
    calls = _count_kernel_calls(monkeypatch)
    _assert_close(_logits(model), want)
    assert calls["linear"] == 4 * config.num_hidden_layers


def test_unfusing_restores_the_plain_layers(config, monkeypatch):
    """With GLQ_HF_FUSE=0, link_shared_inputs leaves (and makes) the layers as before; a fused
    model refuses load_state_dict with the fix in the message."""
    plain = _model(config)
    monkeypatch.setenv(FUSE_ENV, "1")
    model = _model(config)
    sd = model.state_dict()
    with pytest.raises(RuntimeError, match="unfuse_siblings"):
        model.load_state_dict(sd)
    monkeypatch.setenv(FUSE_ENV, "0")
    assert link_shared_inputs(model) == 5 * config.num_hidden_layers
    assert not any(isinstance(m, FusedGLQLinear) for m in model.modules())
    assert [n for n, _ in model.named_buffers()] == [n for n, _ in plain.named_buffers()]
    again = model.state_dict()
    assert list(again) == list(sd) and all(torch.equal(again[k], sd[k]) for k in sd)
    model.load_state_dict(sd)
    assert torch.equal(_logits(model), _logits(plain))


def test_torch_compile_traces_each_member_alone(config, monkeypatch):
    """Under torch.compile every member computes its own rows (no state kept between calls);
    the eager backend traces the same code on the CPU, without graph breaks."""
    monkeypatch.setenv(FUSE_ENV, "1")
    model = _model(config)
    want = _logits(model)
    torch._dynamo.reset()
    try:
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(IDS)
            got = torch.compile(model, backend="eager")(IDS).logits
    finally:
        torch._dynamo.reset()
    assert explained.graph_break_count == 0
    _assert_close(got, want)


def test_fusion_is_the_default(config, monkeypatch):
    """Without the variable a loaded model comes fused; GLQ_HF_FUSE=0 keeps the layers apart."""
    from glq.hf.linear import fusion_enabled

    monkeypatch.delenv(FUSE_ENV, raising=False)
    assert fusion_enabled()
    model = _model(config)
    assert sum(isinstance(m, FusedGLQLinear) for m in model.modules()) == 5 * config.num_hidden_layers
    monkeypatch.setenv(FUSE_ENV, "0")
    link_shared_inputs(model)
    assert not any(isinstance(m, FusedGLQLinear) for m in model.modules())
