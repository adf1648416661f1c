"""Checks for the schemathesis run (tests/schemathesis.toml loads this module): two built-in checks with the
exceptions this service documents, and nothing else relaxed.

- `no_server_error`: no 5xx, but for the documented 503 `no_worker` of a request that asks for the GPU pool
  (the tested service has a CPU worker only).
- `accepted_unless_unstatable`: a request the document allows is accepted, but for the two rules JSON Schema
  cannot state: a prompt that does not fit the context (a length in tokens), and turns out of order (user and
  assistant alternate, for any number of turns).
"""

from __future__ import annotations

import re

import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

TURN_ORDER = re.compile(r"'messages\[\d+\]\.role' must be|has only a system message")
"""The messages of the 400s for turns out of order (api/models/conversation.py, `check_roles`)."""


def error_types(response) -> set:
    """The error type of a JSON error answer (native `type`, or OpenAI's `code`); empty for anything else."""
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        return set()
    return {error.get("type"), error.get("code")} if isinstance(error, dict) else set()


def error_message(response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return ""


@schemathesis.check
def no_server_error(ctx, response, case):
    """not_a_server_error, except the documented 503 `no_worker` for a request that asks for the GPU pool."""
    asks_gpu = isinstance(case.body, dict) and case.body.get("backend") == "gpu"
    if response.status_code == 503 and "no_worker" in error_types(response) and asks_gpu:
        return None
    return not_a_server_error(ctx, response, case)


@schemathesis.check
def accepted_unless_unstatable(ctx, response, case):
    """positive_data_acceptance, except a 400 for a prompt over the context or for turns out of order."""
    if response.status_code == 400 and ("context_length_exceeded" in error_types(response)
                                         or TURN_ORDER.search(error_message(response))):
        return None
    return positive_data_acceptance(ctx, response, case)
