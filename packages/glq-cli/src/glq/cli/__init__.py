"""The ``glq`` command line: quantize, evaluate, generate and inspect GLQ models."""
