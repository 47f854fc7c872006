"""Shapes shared by the glq-hf benchmarks."""

from __future__ import annotations


def llama_8b_config(**overrides):
    """Llama-3-8B's shape (no weights): 32 layers, hidden 4096, MLP 14336, GQA 32/8, vocab 128256."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=8192,
              rms_norm_eps=1e-5, tie_word_embeddings=False)
    kw.update(overrides)
    return LlamaConfig(**kw)


def bf16_bytes(config) -> int:
    """Bytes of the model's parameters in bf16, counted on a meta skeleton."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return sum(p.numel() * 2 for p in model.parameters())


def versions() -> dict:
    import torch
    import transformers

    v = {"torch": torch.__version__, "transformers": transformers.__version__}
    if torch.cuda.is_available():
        v["device"] = torch.cuda.get_device_name()
    return v
