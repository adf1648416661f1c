"""Offline preparation of the model: the weights command, SmoothQuant and INT8 quantization."""
