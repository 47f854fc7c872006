"""GLQ quantization toolkit: calibration, Hessians, RHT, block LDLQ, bit allocation.

Also holds the offline test model (``glq.quant.models``), the shipped calibration and
evaluation text (``glq.quant.data``) and perplexity evaluation (``glq.quant.evaluate``).
"""

__all__ = ["DEFAULT_FINETUNE_EPOCHS", "DEFAULT_FINETUNE_MODEL_EPOCHS", "quantize"]

# Block fine-tuning passes a run makes unless told otherwise. Two passes cut the WikiText-2 gap of
# SmolLM2-135M by a third at 2 bpw and a quarter at 3 bpw on the full protocol (BENCHMARKS.md).
DEFAULT_FINETUNE_EPOCHS = 2
# Whole-model tuning passes after the last block, when the model fits (see quantize): on the full
# protocol 2 passes cut the gap again, 1.586 -> 0.880 at 2 bpw, 0.235 -> 0.184 at 3, 0.0585 -> 0.056 at
# 4, and 4 passes took 4 bpw to 0.047 (at 2 / 3 bpw they gave 0.888 / 0.193, no better than 2 passes).
# The tuning keeps its best epoch by held-out loss, and the first passes of a longer run are the
# shorter run's, so more passes never end on a worse held-out loss (perplexity can still differ).
DEFAULT_FINETUNE_MODEL_EPOCHS = 4


def __getattr__(name: str):
    # Lazy: `import glq.quant` stays cheap (no transformers, no datasets) until used.
    if name == "quantize":
        from glq.quant.pipeline import quantize

        return quantize
    raise AttributeError(f"module 'glq.quant' has no attribute {name!r}")
