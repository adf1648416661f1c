"""Service settings: one frozen dataclass, read from the environment once at start-up."""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from shared.exceptions import ConfigurationError

BACKENDS = ("gpu", "cpu")
"""Worker pools, which are also the RQ queue names."""

BACKEND_MODES = (*BACKENDS, "auto")
"""What `BACKEND_MODE` and a request's `backend` field may say."""

WORKER_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
"""What `WORKER_DEVICE` may say: the GPU worker's device."""

WORKER_DTYPES = ("auto", "bfloat16", "float16", "float32")
"""What `WORKER_DTYPE` may say: the GPU worker's weights, activations and KV cache."""

LOG_FORMATS = ("text", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def parse_bool(raw: str) -> bool:
    """`1/true/yes/on` or `0/false/no/off`, any case; anything else is a ValueError."""
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything configurable, with production defaults; environment variables override by name."""

    port: int = 8080
    redis_url: str = "redis://localhost:6379/0"
    backend_mode: str = "auto"
    model_dir: str = "weights"
    worker_device: str = "cuda"  # GPU workers: `cuda`, `cuda:N` (one worker per GPU) or `cpu`
    worker_dtype: str = "auto"  # GPU workers: bf16 on a GPU that has it, else fp16; fp32 on the CPU
    torch_threads: int = 0  # 0: one per core
    max_batch_size: int = 32
    max_tokens_in_flight: int = 32768
    max_seq_len: int = 2048
    compile_decode: bool = True  # CPU: torch.compile the decode step; GPU: CUDA graphs of it (workers/gpu/graphs.py)
    int8_residual: bool = False  # CPU workers: two-pass INT8, ~16-bit accurate, slower (workers/engine/int8/linear.py)
    prefill_chunk: int = 256  # bounds the stall a long prompt causes running streams (bench.prefill_stall, DESIGN.md)
    default_max_tokens: int = 32
    max_new_tokens_limit: int = 4096
    backlog_ttl_s: int = 600
    job_timeout_s: int = 600
    keepalive_s: float = 5.0
    max_batch_prompts: int = 64  # prompts one POST /generate_batch may carry
    batch_ttl_s: int = 3600  # how long a batch's record and its jobs' results stay readable
    worker_dead_s: int = 10  # a worker silent this long is dead: it stops counting and its jobs are recovered
    max_recoveries: int = 2  # times a job whose worker died is resumed on another before it fails
    drain_s: float = 30.0  # on SIGTERM a worker finishes its jobs for this long, then hands the rest back
    max_queued: int = 0  # jobs a pool's lane may hold waiting beyond its free slots; 0: MAX_QUEUE_WAIT_S's worth
    max_queue_wait_s: float = 1.0  # with MAX_QUEUED 0: admit what the lane's workers start within this
    max_queued_batch: int = 1024  # /generate_batch items a pool may hold waiting (batches are meant to wait)
    queue_deadline_s: float = 60.0  # a job that waited this long in its queue fails instead of starting; 0: never
    batch_lane_slots: int = 0  # slots batch items, beam and scoring rows may hold; 0: 3/4 of MAX_BATCH_SIZE
    crash_after_tokens: int = 0  # test-only fault hook: a worker exits abruptly once a job has this many tokens
    # Security (README, "Security"): API keys, the routes open without one, a per-key limit, CORS.
    api_keys: str = dataclasses.field(default="", repr=False)  # `[name:]key`, comma-separated; never in a repr
    api_keys_file: str = ""  # a file of `[name:]key` lines (`#` comments), read at start-up; adds to API_KEYS
    open_routes: str = "/,/static,/docs,/openapi.json,/health,/metrics"  # paths (and their subpaths) needing no key
    max_concurrent_per_key: int = 0  # requests one API key may have in progress at once; 0: no limit
    cors_origins: str = ""  # origins (comma-separated, or `*`) whose pages may call the API; none by default
    # Logs (README, "Monitoring").
    log_format: str = "text"  # `text` (human-readable) or `json` (one JSON object a line)
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides) -> Settings:
        """Defaults, then `UPPER_CASE` environment variables, then keyword overrides."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in fields(cls):
            raw = environ.get(field.name.upper())
            if raw is None or raw == "":
                continue
            kind = type(field.default)
            try:
                values[field.name] = parse_bool(raw) if kind is bool else kind(raw)
            except ValueError as exc:
                raise ConfigurationError(f"{field.name.upper()}={raw!r} is not a valid {kind.__name__}") from exc
        settings = replace(cls(**values), **overrides)
        settings.validate()
        return settings

    def validate(self) -> None:
        """Refuse settings that cannot work, naming the variable."""
        if self.backend_mode not in BACKEND_MODES:
            raise ConfigurationError(
                f"BACKEND_MODE must be one of {', '.join(BACKEND_MODES)}, not {self.backend_mode!r}")
        if not WORKER_DEVICE.fullmatch(self.worker_device):
            raise ConfigurationError(
                f"WORKER_DEVICE must be 'cuda', 'cuda:N' (N a GPU's index) or 'cpu', not {self.worker_device!r}")
        if self.worker_dtype not in WORKER_DTYPES:
            raise ConfigurationError(
                f"WORKER_DTYPE must be one of {', '.join(WORKER_DTYPES)}, not {self.worker_dtype!r}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigurationError(f"LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}, not {self.log_format!r}")
        if self.log_level.upper() not in LOG_LEVELS:
            raise ConfigurationError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, not {self.log_level!r}")
        if self.max_concurrent_per_key < 0:
            raise ConfigurationError("MAX_CONCURRENT_PER_KEY must be 0 (no limit) or more")
        for name in ("max_batch_size", "max_seq_len", "prefill_chunk", "max_tokens_in_flight", "max_batch_prompts",
                     "batch_ttl_s", "worker_dead_s", "max_queued_batch"):
            if getattr(self, name) < 1:
                raise ConfigurationError(f"{name.upper()} must be at least 1")
        for name in ("max_queued", "max_queue_wait_s", "queue_deadline_s", "batch_lane_slots"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name.upper()} must not be negative")

    @staticmethod
    def split_list(raw: str) -> list[str]:
        """The entries of a comma-separated setting, stripped, empty ones left out."""
        return [entry.strip() for entry in raw.split(",") if entry.strip()]

    @property
    def model_path(self) -> Path:
        """The prepared weights folder (fp weights, config, tokenizer)."""
        return Path(self.model_dir)

    @property
    def int8_path(self) -> Path:
        """The INT8 weights made from `model_path` by the weights command (`python -m workers.preparation`)."""
        return self.model_path / "int8"
