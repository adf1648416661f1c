"""The CPU pool: an INT8 decoder and its RQ worker (`rq worker cpu -w workers.cpu.CPUWorker`)."""

from workers.cpu.worker import CPUWorker

__all__ = ["CPUWorker"]
