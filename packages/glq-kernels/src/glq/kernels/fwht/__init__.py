"""Block-diagonal fast Walsh-Hadamard transform: ``reference`` (plain PyTorch) and CUDA C in
``../csrc``."""
