"""The GPU pool: a CUDA bf16/fp16 decoder and its RQ worker (`rq worker gpu -w workers.gpu.GPUWorker`)."""

from workers.gpu.worker import GPUWorker

__all__ = ["GPUWorker"]
