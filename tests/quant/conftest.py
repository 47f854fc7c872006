"""Helpers shared by the pipeline tests (as fixtures: test modules do not import each other)."""

from __future__ import annotations

import pytest


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


def _assert_same_folder(a, b) -> None:
    """Two GLQ folders hold the same tensors, bit for bit."""
    import torch

    ta, tb = _folder_tensors(a), _folder_tensors(b)
    assert ta.keys() == tb.keys()
    for k in tb:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture
def assert_same_folder():
    return _assert_same_folder


@pytest.fixture
def crash_on_second_block(monkeypatch):
    """Make the pipeline raise KeyboardInterrupt (as Ctrl-C would) when it starts its second block;
    calling the returned function restores it."""
    from glq.quant import pipeline

    real = pipeline._quantize_block
    calls = {"n": 0}

    def crashing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "_quantize_block", crashing)
    return lambda: monkeypatch.setattr(pipeline, "_quantize_block", real)
