"""Shared fixtures and switches for the whole GLQ test suite.

CPU CI collects everything; tests marked ``cuda`` skip without a GPU.
"""

from __future__ import annotations

import os

# Triton kernels run on the CPU through its interpreter; the switch must be set
# before any @triton.jit decorator executes, i.e. before test modules import.
if not os.environ.get("GLQ_TESTS_NATIVE_TRITON"):
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:  # pragma: no cover - torch is a dependency of every member
        pass

import pytest


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if _has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_path():
    """Folder of the offline SmolLM2-135M-Instruct (fp32, converted once from its Q4_1 GGUF)."""
    from glq.quant.models import smollm2_135m_path

    return smollm2_135m_path()


@pytest.fixture(scope="session")
def tiny_llama_path(tmp_path_factory):
    """A random-initialised Llama of a few MB with SmolLM2's tokenizer-free shape rules.

    Sizes are awkward on purpose: hidden 96 and intermediate 160 are not powers of
    two, so block-diagonal Hadamard paths are exercised.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=96,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    _tiny_tokenizer(cfg.vocab_size).save_pretrained(path)
    return path


def _tiny_tokenizer(vocab_size: int):
    """A byte-level BPE of ``vocab_size`` tokens trained on the shipped C4 text (about a second)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from glq.quant.data import CALIBRATION_FILES

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(CALIBRATION_FILES["c4"])], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def _folder_tensors(folder) -> dict:
    """Every tensor of a safetensors folder, by key."""
    from safetensors import safe_open

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[k] = st.get_tensor(k)
    return out


@pytest.fixture
def folder_tensors():
    return _folder_tensors
