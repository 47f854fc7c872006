"""GPU: loading onto CUDA, the CUDA-graph decode wrapper, torch.compile. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def gpu_model(glq_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(glq_folder, device_map="cuda", dtype=torch.bfloat16)


def test_cuda_load_holds_compact_tensors_and_matches_cpu(gpu_model, glq_folder):
    from transformers import AutoModelForCausalLM

    from glq.hf.linear import GLQLinear

    layers = [m for m in gpu_model.modules() if isinstance(m, GLQLinear)]
    assert layers and all(m.codes_0.is_cuda and m.codes_0.dtype == torch.int16 for m in layers)
    cpu = AutoModelForCausalLM.from_pretrained(glq_folder, dtype=torch.float32)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = gpu_model(ids.cuda()).logits.float().cpu()
        b = cpu(ids).logits
    assert float((a - b).norm() / b.norm()) < 3e-2  # bf16 activations vs float32


def _eager_and_graph(model, ids, n, seed=None, **kw):
    """Decode ``n`` tokens eagerly and through the wrapper; with ``seed``, each run samples from its
    own generator seeded alike (one shared generator would give the second run a later stream)."""
    from transformers import StaticCache

    from glq.hf.cuda_graph import CUDAGraphWrapper, decode

    def gen():
        return {} if seed is None else {"generator": torch.Generator("cuda").manual_seed(seed)}

    step = CUDAGraphWrapper(model)
    eager = decode(model, ids, StaticCache(config=model.config, max_cache_len=64), n, **gen(), **kw)
    graph = decode(step, ids, StaticCache(config=model.config, max_cache_len=64), n, **gen(), **kw)
    return eager, graph, step


def test_graph_greedy_decode_equals_eager(gpu_model):
    ids = torch.tensor([[1, 5, 9, 2]], device="cuda")
    eager, graph, step = _eager_and_graph(gpu_model, ids, 12)
    assert torch.equal(eager, graph)
    assert step.captures == 1 and step.replays == 11  # prefill eager, then one replay per new token


def test_graph_sampling_decode_equals_eager(gpu_model):
    ids = torch.tensor([[1, 5, 9, 2]], device="cuda")
    kw = {"do_sample": True, "top_k": 40, "temperature": 0.8}
    eager, graph, step = _eager_and_graph(gpu_model, ids, 10, seed=7, **kw)
    assert torch.equal(eager, graph) and step.replays == 9
    other, _, _ = _eager_and_graph(gpu_model, ids, 10, seed=8, **kw)
    assert not torch.equal(other, eager)  # the samples do depend on the generator


def test_graph_falls_back_for_other_shapes_and_arguments(gpu_model):
    from transformers import StaticCache

    from glq.hf.cuda_graph import CUDAGraphWrapper, decode, forward_params

    name, _ = forward_params(gpu_model)
    step = CUDAGraphWrapper(gpu_model)
    ids = torch.tensor([[1, 5, 9, 2]], device="cuda")
    decode(step, ids, StaticCache(config=gpu_model.config, max_cache_len=32), 3)  # captures
    two = torch.tensor([[1, 5], [9, 2]], device="cuda")
    with torch.no_grad():
        a = step(input_ids=two).logits
        b = gpu_model(input_ids=two).logits
    assert torch.equal(a, b) and "shape" in step.last_fallback
    cache = StaticCache(config=gpu_model.config, max_cache_len=32)
    with torch.no_grad():
        out = step(input_ids=ids[:, :1], output_hidden_states=True, **{name: cache})
    assert out.hidden_states is not None and "output_hidden_states" in step.last_fallback


def test_torch_compile_matches_eager(gpu_model):
    ids = torch.tensor([[1, 5, 9, 2, 7]], device="cuda")
    compiled = torch.compile(gpu_model, fullgraph=False)
    with torch.no_grad():
        a = compiled(ids).logits.float()
        b = gpu_model(ids).logits.float()
    assert float((a - b).norm() / b.norm()) < 1e-2


def test_fused_siblings_on_cuda_match_unfused_and_capture(tiny_llama_path, monkeypatch):
    """Fused siblings (the default) on the GPU: q/k/v and gate/up as one linear each give the unfused logits up
    to the kernels' rounding (other split-K plans), and a CUDA-graph decode equals eager."""
    from transformers import AutoConfig

    from glq.hf.linear import FusedGLQLinear, link_shared_inputs, unfuse_siblings
    from glq.hf.testing import random_glq_model

    monkeypatch.setenv("GLQ_HF_FUSE", "1")
    config = AutoConfig.from_pretrained(tiny_llama_path)
    m = random_glq_model(config, 2, device="cuda", dtype=torch.bfloat16, tables="random")
    assert sum(isinstance(x, FusedGLQLinear) for x in m.modules()) == 5 * config.num_hidden_layers
    ids = torch.tensor([[1, 5, 9, 2, 7]], device="cuda")
    with torch.no_grad():
        fused = m(ids).logits.float()
        unfuse_siblings(m)
        plain = m(ids).logits.float()
    assert float((fused - plain).norm() / plain.norm()) < 1e-2
    link_shared_inputs(m)  # fused again
    eager, graph, step = _eager_and_graph(m, ids[:, :4], 8)
    assert torch.equal(eager, graph) and step.replays == 7


def test_loading_on_cuda_tiles_the_codes_and_changes_no_bit(monkeypatch):
    """On the CUDA C backend loading holds every layer with a tiled layout tiled (GLQ_HF_TILE=0: row-major), fused
    or not; the logits are the row-major model's bit for bit (same kernels and plans, other addresses), and a
    CUDA-graph decode of the tiled model equals eager."""
    from transformers import LlamaConfig

    from glq.hf.linear import GLQLinear
    from glq.hf.testing import random_glq_model

    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=320, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=64, max_position_embeddings=64)
    ids = torch.tensor([[1, 5, 9, 2, 7]], device="cuda")
    logits = {}
    for fuse in ("0", "1"):
        monkeypatch.setenv("GLQ_HF_FUSE", fuse)
        for tile in ("0", "1"):
            monkeypatch.setenv("GLQ_HF_TILE", tile)
            m = random_glq_model(config, 3, device="cuda", dtype=torch.bfloat16, tables="random")
            tiled = [x.codes_tiled for x in m.modules() if isinstance(x, GLQLinear)]
            assert sum(tiled) == (12 if tile == "1" else 0), tiled  # all but down_proj (in 320)
            with torch.no_grad():
                logits[fuse, tile] = m(ids).logits
    assert torch.equal(logits["0", "1"], logits["0", "0"]) and torch.equal(logits["1", "1"], logits["1", "0"])
    eager, graph, step = _eager_and_graph(m, ids[:, :4], 8)
    assert torch.equal(eager, graph) and step.replays == 7
