"""The model service: weights, KV cache, continuous batching, token selection. It never sees text."""
