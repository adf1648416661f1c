"""The GPU pool's RQ worker: `rq worker gpu -w workers.gpu.GPUWorker`.

Refuses to start without CUDA unless `WORKER_DEVICE=cpu`, which runs the same decoder in fp32 on the CPU.
"""

from __future__ import annotations

from workers.batching import BatchingWorker
from workers.gpu.decoder import CUDADecoder


class GPUWorker(BatchingWorker):
    """Continuous batching on the CUDA decoder."""

    def build_decoder(self) -> CUDADecoder:
        settings = self.settings
        decoder = CUDADecoder(device=settings.worker_device, max_batch_size=settings.max_batch_size,
                              max_seq_len=settings.max_seq_len, threads=settings.torch_threads)
        return decoder.load_weights(settings.model_path)
