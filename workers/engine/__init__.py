"""The inference engine both worker pools share: model, KV cache, sampling, detokenisation, batching."""
