"""GLQ compute kernels: fused decode-matmul and fast Hadamard transforms.

Each op has a plain-PyTorch reference beside its CUDA C and Triton backends.
Importing this package neither compiles anything nor initialises CUDA.
"""
