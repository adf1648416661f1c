"""A GPU worker whose device breaks at its third decode step, as a CUDA error does mid-batch.

The device failure test runs it as the Procfile's `gpu` line with this class (`rq worker gpu -w
tests.broken_device.BrokenDeviceGPUWorker`, WORKER_DEVICE=cpu): a real process, so its exit status is real.
"""

from __future__ import annotations

import itertools

from workers.gpu import GPUWorker
from workers.gpu.decoder import CUDADecoder

CUDA_FAULT = "CUDA error: an illegal memory access was encountered"
"""What the broken device raises (as torch raises a kernel's failure)."""

BREAKS_AT_DECODE = 3


class BrokenDeviceGPUWorker(GPUWorker):
    """The GPU worker, its decoder raising CUDA_FAULT from its BREAKS_AT_DECODE-th decode step on."""

    def build_decoder(self) -> CUDADecoder:
        decoder = super().build_decoder()
        decode, calls = decoder.decode, itertools.count(1)

        def breaking(tokens: list[int], positions: list[int]):
            if next(calls) >= BREAKS_AT_DECODE:
                raise RuntimeError(CUDA_FAULT)
            return decode(tokens, positions)

        decoder.decode = breaking
        return decoder
