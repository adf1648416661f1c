"""The CPU pool's RQ worker: `rq worker cpu -w workers.cpu.CPUWorker`."""

from __future__ import annotations

from workers.batching import BatchingWorker
from workers.cpu.decoder import INT8Decoder


class CPUWorker(BatchingWorker):
    """Continuous batching on the INT8 decoder."""

    def build_decoder(self) -> INT8Decoder:
        return INT8Decoder.from_settings(self.settings)
