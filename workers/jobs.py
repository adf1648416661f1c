"""The job function RQ records for generation jobs.

Generation jobs are executed by `workers.batching.BatchingWorker`, which reads each job's JSON payload
and runs it inside its running batch; RQ never calls this function on that path. It exists so the
job has a well-defined callable, and so a plain RQ worker picking the job up fails it loudly.
"""

from __future__ import annotations


def generate(payload: dict) -> None:
    """Refuse to run outside a batching worker (the job would otherwise never publish its events)."""
    raise RuntimeError("generation jobs must be run by "
                       "`rq worker cpu|gpu -w workers.cpu.CPUWorker|workers.gpu.GPUWorker`")
