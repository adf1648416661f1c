"""A CPU worker whose start lasts until the test says: it registers and beats as every worker does, then waits for
the test's Redis key `START_GATE` before loading its model.

The start-up tests run it as the Procfile's `cpu` line with this class (`rq worker cpu -w
tests.startup_gate.GatedCPUWorker`), on a redis-server of their own. A real start on the tiny model takes about a
second, too short to send a request into reliably; a gate makes "a request sent while the worker starts" certain
instead of likely, and lets a test kill the worker mid-start.
"""

from __future__ import annotations

import threading

from workers.cpu import CPUWorker

START_GATE = "tests:start-gate"
"""Set it (to anything) to let gated workers load their model."""


class GatedCPUWorker(CPUWorker):
    """The CPU worker, its model load held until `START_GATE` exists."""

    def load_engine(self):
        while not self.connection.exists(START_GATE):
            threading.Event().wait(0.05)
        return super().load_engine()
