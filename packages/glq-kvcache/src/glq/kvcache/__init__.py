"""INT8 KV cache for Hugging Face Transformers (keys per channel, values per token)."""
