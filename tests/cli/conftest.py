"""Fixtures of the glq command's tests: a tiny model folder with a tiny real tokenizer."""

from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A byte-level BPE of 512 tokens (tiny_llama's vocabulary size), trained in a second on
    the shipped task text, so whole CLI paths run on the tiny model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from glq.cli import tasks

    corpus = [ctx + cont for name in tasks.TASKS for it in tasks.load_task(name, limit=150)
              for ctx, cont in it.requests]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(corpus, trainer)
    assert tk.get_vocab_size() <= 512
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_llama_path, tiny_tokenizer, tmp_path_factory):
    """tiny_llama's folder plus the tiny tokenizer: a complete (random) model folder."""
    path = tmp_path_factory.mktemp("tiny-llama-tok") / "model"
    shutil.copytree(tiny_llama_path, path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
