"""GLQ inference runtime for Hugging Face Transformers.

Will register ``quant_method: "glq"`` with transformers so ``from_pretrained``
loads GLQ model folders, and hold the GLQ linear module and CUDA-graph wrapper.
"""
