"""Fixtures of the glq.hf tests: GLQ folders with random contents built from the tiny Llama."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def glq_folder(tiny_llama_path, tmp_path_factory):
    """The tiny Llama as a GLQ folder with layers cycling through 2, 3 and 4 bpw."""
    import glq.hf  # noqa: F401  (registers "glq")
    from glq.hf.testing import random_glq_folder

    return random_glq_folder(tiny_llama_path, tmp_path_factory.mktemp("glq") / "mixed", rates=[2, 3, 4])


@pytest.fixture
def make_folder(tiny_llama_path, tmp_path):
    """Build a GLQ folder from the tiny Llama, optionally broken by hooks (see random_glq_folder)."""
    import glq.hf  # noqa: F401
    from glq.hf.testing import random_glq_folder

    counter = iter(range(1000))

    def make(rates=2, **kwargs):
        return random_glq_folder(tiny_llama_path, tmp_path / f"f{next(counter)}", rates=rates, **kwargs)

    return make
