"""Sampling parameters: validated once by the API, carried in the job payload, applied by the worker."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from shared.exceptions import ValidationError

MAX_STOP_SEQUENCES = 4
"""As in OpenAI's API: at most four stop strings."""

MAX_SEED = 2**63 - 1


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token and when to stop. temperature 0 means greedy."""

    max_tokens: int = 32
    temperature: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    @property
    def greedy(self) -> bool:
        """Whether the next token is simply the most likely one."""
        return self.temperature == 0.0 or self.top_k == 1

    def to_dict(self) -> dict:
        """Plain JSON for the job payload."""
        data = asdict(self)
        data["stop"] = list(self.stop)
        return data

    @classmethod
    def from_dict(cls, data: dict, *, max_tokens_limit: int = 4096) -> SamplingParams:
        """Validate user-supplied fields (absent or null ones keep their defaults); errors name the field."""
        present = {key: value for key, value in data.items() if value is not None}
        values: dict = {}
        if "max_tokens" in present:
            values["max_tokens"] = _integer(present, "max_tokens", 1, max_tokens_limit)
        if "temperature" in present:
            values["temperature"] = _number(present, "temperature", 0.0, 2.0)
        if "top_k" in present:
            values["top_k"] = _integer(present, "top_k", 0, 1_000_000)
        if "top_p" in present:
            values["top_p"] = _number(present, "top_p", 0.0, 1.0, low_open=True)
        if "repetition_penalty" in present:
            values["repetition_penalty"] = _number(present, "repetition_penalty", 0.0, 10.0, low_open=True)
        if "seed" in present:
            values["seed"] = _integer(present, "seed", 0, MAX_SEED)
        if "stop" in present:
            values["stop"] = _stop_sequences(present["stop"])
        return cls(**values)


def _integer(data: dict, name: str, low: int, high: int) -> int:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"'{name}' must be an integer", field=name)
    if not low <= value <= high:
        raise ValidationError(f"'{name}' must be between {low} and {high}, got {value}", field=name)
    return value


def _number(data: dict, name: str, low: float, high: float, *, low_open: bool = False) -> float:
    value = data[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValidationError(f"'{name}' must be a number", field=name)
    too_low = value <= low if low_open else value < low
    if too_low or value > high:
        bracket = "(" if low_open else "["
        raise ValidationError(f"'{name}' must be in {bracket}{low}, {high}], got {value}", field=name)
    return float(value)


def _stop_sequences(value) -> tuple[str, ...]:
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise ValidationError("'stop' must be a string or a list of strings", field="stop")
    if len(stops) > MAX_STOP_SEQUENCES:
        raise ValidationError(f"'stop' may hold at most {MAX_STOP_SEQUENCES} sequences", field="stop")
    if any(s == "" for s in stops):
        raise ValidationError("'stop' sequences must not be empty", field="stop")
    return tuple(stops)
