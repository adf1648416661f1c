"""What the API and the workers share about metrics: where workers leave their snapshots in Redis, and the
folder prometheus-client's multiprocess mode keeps the API processes' values in.

Workers push: each worker writes its whole exposition text to `llm:metrics:worker:<name>` on every
heartbeat, with a TTL of WORKER_DEAD_S, and adds its name to the `llm:metrics:workers` set; the API's
`/metrics` reads them at scrape time (`api/metrics.py`), so one scrape target covers every worker on every
host, a worker needs no port of its own, and a dead worker's series go with its key.

Nothing here imports prometheus_client at module level: its multiprocess mode is chosen when it is first
imported, from PROMETHEUS_MULTIPROC_DIR, which `prepare_multiprocess_dir` must set first.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

WORKER_SET = "llm:metrics:workers"
"""Names of the workers that have pushed a snapshot (the API drops names whose snapshot expired)."""

WORKER_KEY_PREFIX = "llm:metrics:worker:"

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
"""prometheus-client's own variable: the folder its multiprocess mode keeps every process's values in."""


def worker_key(name: str) -> str:
    """The Redis key holding a worker's latest metrics snapshot (JSON: worker, pools, exposition text)."""
    return f"{WORKER_KEY_PREFIX}{name}"


MADE_DIR_PREFIX = "llm-api-metrics-"
"""Name prefix of the temporary folders `prepare_multiprocess_dir` makes."""


def prepare_multiprocess_dir(configured: str = "") -> tuple[Path, bool]:
    """The multiprocess folder, `configured` or a new temporary one, exported in PROMETHEUS_MULTIPROC_DIR for
    the processes started from here. Returns it and whether it was made here."""
    made = not configured
    folder = Path(configured) if configured else Path(tempfile.mkdtemp(prefix=MADE_DIR_PREFIX))
    folder.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(folder)
    return folder, made


def clear_multiprocess_dir(folder: Path) -> None:
    """Remove the value files a previous run left (their counts would be added to this run's)."""
    for path in folder.glob("*.db"):
        path.unlink(missing_ok=True)


def remove_made_multiprocess_dir(folder: Path) -> None:
    """Remove the folder if `prepare_multiprocess_dir` made it (a temporary one); leave a configured one."""
    if folder.parent == Path(tempfile.gettempdir()) and folder.name.startswith(MADE_DIR_PREFIX):
        shutil.rmtree(folder, ignore_errors=True)


def mark_process_dead(pid: int) -> None:
    """Drop a finished API process's live gauges (in-progress requests), as multiprocess mode requires."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
