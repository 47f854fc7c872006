"""GLQ quantization toolkit: calibration, Hessians, RHT, block LDLQ, bit allocation.

Also holds the offline test model (``glq.quant.models``), the shipped calibration and
evaluation text (``glq.quant.data``) and perplexity evaluation (``glq.quant.evaluate``).
"""
