"""Fused decode-matmul: ``reference`` (plain PyTorch), ``triton``, and CUDA C in ``../csrc``."""
