"""schemathesis, a maintained OpenAPI fuzzer, against the real service: it reads the served /openapi.json,
sends every operation the document's examples, boundary and random values (valid and invalid), unexpected
methods, and chains of calls that follow the responses (a job id to /jobs/<id>), then checks every answer: no
5xx, and the status, content type, headers and body (each SSE event too) as the document says.

The service is gunicorn and a CPU worker on the tiny model (`tiny_service`): with a worker, generation routes
answer 200 and their JSON and events are checked too, not only their errors. The settings and the exceptions
to two checks are in tests/schemathesis.toml and tests/schemathesis_checks.py; the seed is fixed, so a failure
in CI reproduces with the command the failure report prints.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict

import pytest
import requests

from tests.service_fixtures import ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CONFIG = "tests/schemathesis.toml"


def requests_sent(report) -> tuple[Counter, dict[str, Counter]]:
    """From schemathesis's NDJSON report: requests per test phase, and the statuses each operation answered."""
    phases: Counter = Counter()
    statuses: dict[str, Counter] = defaultdict(Counter)
    for line in report.read_text().splitlines():
        event = json.loads(line).get("ScenarioFinished")
        if not event or not event.get("recorder"):
            continue
        recorder = event["recorder"]
        phases[event["phase"]] += len(recorder.get("cases", {}))  # none: the phase had nothing to send
        for case_id, interaction in recorder.get("interactions", {}).items():
            case = recorder["cases"][case_id]["value"]
            # A stateful scenario chains operations: its cases name theirs.
            label = f"{case['method']} {case['path']}" if event["phase"] == "stateful" else recorder["label"]
            if interaction.get("response"):
                statuses[label][interaction["response"]["status_code"]] += 1
    return phases, statuses


def test_every_answer_is_the_documented_one(tiny_service, tmp_path, capsys):
    report = tmp_path / "schemathesis.ndjson"
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "--config-file", CONFIG, "run", tiny_service.url("/openapi.json"),
         "--report", "ndjson", "--report-ndjson-path", str(report), "--no-color"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-20_000:] + run.stderr[-5_000:]

    phases, statuses = requests_sent(report)
    documented = requests.get(tiny_service.url("/openapi.json"), timeout=10).json()["paths"]
    operations = {f"{method.upper()} {path}" for path, methods in documented.items() for method in methods}
    operations.remove("GET /openapi.json")  # the document's own URL, which schemathesis leaves out
    answered_2xx = {label for label, counts in statuses.items() if any(200 <= s < 300 for s in counts)}
    assert answered_2xx == operations, "operations the fuzzer never got a success from"
    per_operation = ", ".join(f"{label} {sum(counts.values())}" for label, counts in sorted(statuses.items()))
    with capsys.disabled():  # the counts belong in every run's output, passing or not
        print(f"\nschemathesis: {sum(phases.values())} requests {dict(phases)} over {len(operations)} operations: "
              f"{per_operation}")
