"""The CPU pool's RQ worker: `rq worker cpu -w workers.cpu.CPUWorker`."""

from __future__ import annotations

from workers.batching import BatchingWorker
from workers.cpu.decoder import INT8Decoder


class CPUWorker(BatchingWorker):
    """Continuous batching on the INT8 decoder."""

    def build_decoder(self) -> INT8Decoder:
        settings = self.settings
        decoder = INT8Decoder(max_batch_size=settings.max_batch_size, max_seq_len=settings.max_seq_len,
                              threads=settings.torch_threads, compile_decode=settings.compile_decode)
        return decoder.load_quantized_weights(settings.int8_path)
