"""The GPU pool: a CUDA bf16/fp16 decoder (fp32 on the CPU for tests) and its RQ worker."""
