"""GLQ quantization toolkit: calibration, Hessians, RHT, block LDLQ, bit allocation.

Also holds the offline test model (``glq.quant.models``), the shipped calibration and
evaluation text (``glq.quant.data``) and perplexity evaluation (``glq.quant.evaluate``).
"""

__all__ = ["quantize"]


def __getattr__(name: str):
    # Lazy: `import glq.quant` stays cheap (no transformers, no datasets) until used.
    if name == "quantize":
        from glq.quant.pipeline import quantize

        return quantize
    raise AttributeError(f"module 'glq.quant' has no attribute {name!r}")
