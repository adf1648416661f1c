"""The OpenAI-compatible surface under /v1: its request and answer models, its answer formats, its routes."""
