"""Helpers shared by the pipeline tests (as fixtures: test modules do not import each other)."""

from __future__ import annotations

import pytest


@pytest.fixture
def assert_same_folder(folder_tensors):
    """Two GLQ folders hold the same tensors, bit for bit."""
    import torch

    def check(a, b) -> None:
        ta, tb = folder_tensors(a), folder_tensors(b)
        assert ta.keys() == tb.keys()
        for k in tb:
            assert torch.equal(ta[k], tb[k]), k
    return check


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
