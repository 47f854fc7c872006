"""from_pretrained / generate / save_pretrained of GLQ folders through transformers' plugin API."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from torch import nn

import glq.hf
from glq.hf.config import GLQFormat
from glq.hf.linear import GLQLinear


def _load(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, **kwargs)


def _file_keys(folder) -> dict[str, torch.dtype]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[k] = h.get_tensor(k).dtype
    return out


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_warnings():
    handler = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    yield handler.messages
    logger.removeHandler(handler)


@pytest.fixture(scope="module")
def model(glq_folder):
    return _load(glq_folder, dtype=torch.float32)


def test_layers_replaced_and_tensors_kept_at_stored_dtypes(glq_folder, transformers_warnings):
    m = _load(glq_folder, dtype=torch.bfloat16, device_map="cpu")
    fmt = GLQFormat.from_dict(json.loads((glq_folder / "config.json").read_text())["quantization_config"])
    modules = dict(m.named_modules())
    for name, spec in fmt.layers.items():
        layer = modules[name]
        assert isinstance(layer, GLQLinear) and layer.spec == spec
        assert layer.row_scale.dtype == torch.float32 and layer.signs_in.dtype == torch.int8
    assert isinstance(m.lm_head, nn.Linear) and m.lm_head.weight.dtype == torch.bfloat16
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    # every stored tensor landed in the model at its stored dtype (the guards are ignored)
    stored = _file_keys(glq_folder)
    state = m.state_dict()
    for k, dt in stored.items():
        if k in state:
            assert state[k].dtype == (dt if not dt.is_floating_point or k.startswith("glq_tables") or
                                      k.endswith("row_scale") else torch.bfloat16), k
    assert not [msg for msg in transformers_warnings if "LOAD REPORT" in msg]  # nothing missing or unexpected


def test_tables_are_held_once_per_model(model):
    layers = [m for m in model.modules() if isinstance(m, GLQLinear)]
    by_rate = {}
    for layer in layers:
        by_rate.setdefault(layer.spec.bpw, set()).add(id(layer.tables))
        assert not any("abs" in n or "table" in n for n, _ in layer.named_buffers())
    assert sorted(by_rate) == [2, 3, 4] and all(len(ids) == 1 for ids in by_rate.values())
    n_tables = sum(1 for n, _ in model.named_buffers() if n.startswith("glq_tables."))
    assert n_tables == 3 + (3 + 2) + (3 + 3)  # the stage fields of bpw 2, 3 and 4, once


def test_logits_match_the_dense_model_built_from_dequantize(model, tiny_llama_path):
    """The whole wiring: a plain Llama whose quantized weights are GLQLinear.dequantize() gives
    the same logits as the GLQ model."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_llama_path, dtype=torch.float32)
    glq_layers = {n: m for n, m in model.named_modules() if isinstance(m, GLQLinear)}
    with torch.no_grad():
        for name, layer in glq_layers.items():
            dense.get_submodule(name).weight.copy_(layer.dequantize())
    ids = torch.randint(0, 512, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = model(ids).logits, dense(ids).logits
    assert float((a - b).abs().max()) < 1e-4 * float(b.abs().max())


def test_generate_greedy_and_sampling(model):
    ids = torch.tensor([[1, 5, 9, 2]])
    g1 = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    g2 = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert g1.shape == (1, 10) and torch.equal(g1, g2)
    torch.manual_seed(0)
    s = model.generate(ids, max_new_tokens=6, min_new_tokens=6, do_sample=True, top_k=50, temperature=1.0)
    assert s.shape == (1, 10) and torch.equal(s[:, :4], ids)


def test_static_cache_decode_loop_and_wrapper_fallback_match_generate(model):
    from transformers import StaticCache

    from glq.hf.cuda_graph import CUDAGraphWrapper, decode

    ids = torch.tensor([[1, 5, 9, 2]])
    want = model.generate(ids, max_new_tokens=5, do_sample=False)  # may stop early at EOS
    step = CUDAGraphWrapper(model)  # on the CPU every call falls back to eager
    got = decode(step, ids, StaticCache(config=model.config, max_cache_len=16), 5)
    assert got.shape == (1, 9) and torch.equal(got[:, : want.shape[1]], want) and step.captures == 0
    assert step.last_fallback == "input_ids is not a CUDA tensor"
    gen = torch.Generator().manual_seed(3)
    s = decode(step, ids, StaticCache(config=model.config, max_cache_len=16), 5, do_sample=True, top_k=20,
               generator=gen)
    assert s.shape == (1, 9)


def test_save_pretrained_round_trips_to_identical_logits(model, glq_folder, tmp_path):
    model.save_pretrained(tmp_path / "saved")
    ids = torch.tensor([[3, 1, 4, 1, 5]])
    again = _load(tmp_path / "saved", dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    src = json.loads((glq_folder / "config.json").read_text())["quantization_config"]
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())["quantization_config"]
    assert saved == src
    keys = _file_keys(tmp_path / "saved")
    assert keys == _file_keys(glq_folder)  # same tensors, same dtypes, guards included


def test_registration_is_idempotent_and_visible_to_transformers():
    from transformers.quantizers import auto

    glq.hf.register()
    assert auto.AUTO_QUANTIZER_MAPPING["glq"] is glq.hf.GLQHfQuantizer
    assert auto.AUTO_QUANTIZATION_CONFIG_MAPPING["glq"] is glq.hf.GLQConfig


def test_loading_without_import_fails_and_names_the_fix(glq_folder, transformers_warnings):
    """Without glq.hf, transformers skips the unknown quant_method; the folder's guard tensors
    (glq.hf.guard) make the load raise instead of returning a randomly initialised model."""
    from transformers.quantizers import auto

    saved = auto.AUTO_QUANTIZATION_CONFIG_MAPPING.pop("glq"), auto.AUTO_QUANTIZER_MAPPING.pop("glq")
    try:
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            _load(glq_folder)
    finally:
        auto.AUTO_QUANTIZATION_CONFIG_MAPPING["glq"], auto.AUTO_QUANTIZER_MAPPING["glq"] = saved
    text = "\n".join(transformers_warnings)
    assert "Unknown quantization type, got glq" in text
    assert "run `import glq.hf` before from_pretrained" in text


def test_import_is_light():
    """`import glq.hf` pulls in neither transformers, glq.quant, datasets, triton nor CUDA, and "glq"
    is registered by the time transformers' model code (which from_pretrained lives in) is loaded."""
    code = ("import sys, torch, glq.hf\n"
            "bad = [m for m in ('transformers', 'glq.quant', 'datasets', 'triton') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "import transformers.modeling_utils\n"
            "assert 'glq' in sys.modules['transformers.quantizers.auto'].AUTO_QUANTIZER_MAPPING\n"
            "assert not torch.cuda.is_initialized()\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_random_model_built_without_dense_weights_saves_and_loads(tiny_llama_path, tmp_path):
    """glq.hf.testing.random_glq_model (what the GPU memory benchmark builds) is a valid GLQ model."""
    from transformers import AutoConfig

    from glq.hf.testing import random_glq_model

    config = AutoConfig.from_pretrained(tiny_llama_path)
    m = random_glq_model(config, lambda n: 4 if "mlp" in n else 2, dtype=torch.float32, tables="random")
    assert not any(isinstance(mod, nn.Linear) and "layers" in n for n, mod in m.named_modules())
    m.save_pretrained(tmp_path / "r")
    again = _load(tmp_path / "r", dtype=torch.float32)
    ids = torch.tensor([[7, 7, 1]])
    with torch.no_grad():
        assert torch.equal(again(ids).logits, m(ids).logits)


def test_siblings_with_equal_input_signs_rotate_their_input_once(tiny_llama_path, monkeypatch):
    """q/k/v and gate/up with one set of input signs (as glq.quant writes them) share one input
    transform per forward: the logits are bit-identical to unshared layers, with 2 input
    transforms per block instead of 5; a modified input is transformed again."""
    from transformers import AutoConfig

    from glq.hf import _kernels
    from glq.hf.linear import GLQLinear, link_shared_inputs
    from glq.hf.testing import random_glq_model

    monkeypatch.setenv("GLQ_HF_FUSE", "0")  # fused siblings (test_fused.py, the default) make one call per group
    config = AutoConfig.from_pretrained(tiny_llama_path)
    m = random_glq_model(config, lambda n: 3 if "mlp" in n else 2, dtype=torch.float32, tables="random")
    attn, mlp = m.model.layers[0].self_attn, m.model.layers[0].mlp
    assert attn.q_proj.shared_input is attn.k_proj.shared_input is attn.v_proj.shared_input is not None
    assert mlp.gate_proj.shared_input is mlp.up_proj.shared_input is not None
    assert attn.o_proj.shared_input is None and mlp.down_proj.shared_input is None
    assert attn.q_proj.shared_input is not m.model.layers[1].self_attn.q_proj.shared_input

    calls = {"hadamard": 0, "linear": 0}
    for fn in calls:
        real = getattr(_kernels, fn)

        def counted(*a, _real=real, _fn=fn, **k):
            calls[_fn] += 1
            return _real(*a, **k)

        monkeypatch.setattr(_kernels, fn, counted)
    ids = torch.tensor([[5, 9, 2, 7]])
    with torch.no_grad():
        shared = m(ids).logits
        assert calls == {"hadamard": 2 * 2, "linear": 2 * 2}  # per block: qkv, gate/up | o, down
        assert attn.q_proj.shared_input._x is None  # let go once all three had it
        layers = [mod for mod in m.modules() if isinstance(mod, GLQLinear)]
        for layer in layers:
            layer.shared_input = None
        assert torch.equal(m(ids).logits, shared)
        assert link_shared_inputs(m) == 5 * config.num_hidden_layers

        x = torch.randn(3, config.hidden_size)
        attn.q_proj(x)
        x.mul_(2)  # in place: the cached transform of x is stale now
        k = attn.k_proj(x)
        attn.k_proj.shared_input = None
        assert torch.equal(k, attn.k_proj(x))
    # a folder whose layers all have their own signs links nothing
    m = random_glq_model(config, 2, dtype=torch.float32, tables="random", shared_input_signs=False)
    assert link_shared_inputs(m) == 0


def test_loaded_folder_links_layers_that_share_input_signs(glq_folder):
    """from_pretrained links q/k/v and gate/up of a folder whose groups share input signs (the
    fixture writes them as glq.quant does, in_seed recorded), whatever their rates."""
    model = _load(glq_folder, dtype=torch.float32)
    fmt = model.config.quantization_config.format
    attn = model.model.layers[0].self_attn
    assert fmt.layers["model.layers.0.self_attn.k_proj"].in_seed == fmt.layers["model.layers.0.self_attn.q_proj"].seed
    assert len({attn.q_proj.spec.bpw, attn.k_proj.spec.bpw, attn.v_proj.spec.bpw}) > 1  # mixed rates
    assert attn.q_proj.shared_input is attn.k_proj.shared_input is attn.v_proj.shared_input is not None
    assert attn.q_proj.shared_input.members == 3 and attn.o_proj.shared_input is None
