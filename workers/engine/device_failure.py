"""Errors that mean the device broke, not a job: after a CUDA error the process's CUDA context is unusable.

No job is to blame for those, and none can run in this process any more: the worker exits (non-zero), its
supervisor starts a new one, and its jobs resume on another worker through the recovery of dead workers'
jobs (workers/batching.py, `exit_for_broken_device`).
"""

from __future__ import annotations

import torch

DEVICE_FAILURE_EXIT = 69
"""The worker's exit status after a device failure (EX_UNAVAILABLE): any supervisor restarts on non-zero."""

DEVICE_ERROR_WORDS = ("CUDA", "CUBLAS", "cuBLAS", "CUDNN", "cuDNN")
"""Words of the errors CUDA and its libraries raise as a plain RuntimeError."""


def is_device_failure(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is an error of the device rather than of the work given to it."""
    while exc is not None:
        if isinstance(exc, torch.OutOfMemoryError):
            return False  # the allocator said no: the context is intact, and the batch fails as any other
        if isinstance(exc, torch.AcceleratorError):
            return True
        if isinstance(exc, RuntimeError) and any(word in str(exc) for word in DEVICE_ERROR_WORDS):
            return True
        exc = exc.__cause__
    return False


def reraise_device_failure(exc: BaseException) -> None:
    """Raise `exc` again if the device broke: per-job isolation must not blame one job for it."""
    if is_device_failure(exc):
        raise exc
