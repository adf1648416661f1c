"""The GPU pool's RQ worker: `rq worker gpu -w workers.gpu.GPUWorker`, one per GPU (WORKER_DEVICE=cuda:N, or
CUDA_VISIBLE_DEVICES naming one GPU).

Refuses to start without CUDA unless `WORKER_DEVICE=cpu`, which runs the same decoder on the CPU.
"""

from __future__ import annotations

from workers.batching import BatchingWorker
from workers.gpu.decoder import CUDADecoder


class GPUWorker(BatchingWorker):
    """Continuous batching on the CUDA decoder."""

    def build_decoder(self) -> CUDADecoder:
        return CUDADecoder.from_settings(self.settings)
