"""`bin/wait-ready` against nothing: it says what it waits for and gives up at its timeout (the ready line is
tested on the real processes, tests/test_integration_startup.py)."""

from __future__ import annotations

import subprocess

from tests.service_fixtures import ROOT, free_port


def test_with_nothing_listening_it_says_so_and_exits_1_at_its_timeout():
    url = f"http://127.0.0.1:{free_port()}"
    done = subprocess.run([str(ROOT / "bin" / "wait-ready"), url, "--timeout", "1"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 1
    assert done.stdout.splitlines() == ["waiting: the API does not answer yet",
                                        "not ready after 1 s (waiting: the API does not answer yet)"]
