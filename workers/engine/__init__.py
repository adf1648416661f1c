"""The serving engine both worker pools share: model, attention, KV cache, sampling, detokenisation, batching."""
