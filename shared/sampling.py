"""Sampling parameters: validated once by the API, carried in the job payload, applied by the worker.

`SamplingFields` (pydantic) is the one statement of what a client may ask for: it validates request
bodies and produces their JSON Schema in the OpenAPI document. `SamplingParams` is what travels on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

MAX_STOP_SEQUENCES = 4
"""As in OpenAI's API: at most four stop strings."""

MAX_SEED = 2**63 - 1

MaxTokens = Annotated[int, Field(ge=1, description="Tokens to generate at most; the server's MAX_NEW_TOKENS_LIMIT "
                                                   "caps it, and prompt + max_tokens must fit the context.")]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy decoding.")]
TopK = Annotated[int, Field(ge=0, le=1_000_000, description="Keep the k most likely tokens; 0 keeps all.")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="Nucleus sampling: the smallest set of tokens "
                                                          "whose probabilities add up to top_p.")]
RepetitionPenalty = Annotated[float, Field(gt=0.0, le=10.0, description="Above 1 discourages repeating "
                                                                        "tokens already in the text.")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="Makes sampling reproducible.")]
Stop = Annotated[
    Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                   Field(max_length=MAX_STOP_SEQUENCES)],
    Field(description="A stop sequence or a list of at most four; generation ends before one would appear "
                      "and the text never includes it."),
]

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
"""Request models: unknown fields refused, no type coercion ("10" is not 10, true is not 1), no NaN."""

MAX_TOKENS_LIMIT_KEY = "max_tokens_limit"
"""Validation-context key carrying the server's cap on max_tokens (a setting, so not in the schema)."""


class SamplingFields(BaseModel):
    """The sampling fields of a request body; absent or null fields keep the server's defaults."""

    model_config = STRICT

    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = Field(None, description="0 is greedy decoding; 1.0 by default.")
    top_k: TopK | None = None
    top_p: TopP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    seed: Seed | None = None
    stop: Stop | None = None

    @field_validator("max_tokens")
    @classmethod
    def _within_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        return check_max_tokens_limit(value, info)


def check_max_tokens_limit(value: int | None, info: ValidationInfo) -> int | None:
    """Refuse a max_tokens above the cap passed in the validation context (MAX_NEW_TOKENS_LIMIT)."""
    limit = (info.context or {}).get(MAX_TOKENS_LIMIT_KEY)
    if value is not None and limit is not None and value > limit:
        raise ValueError(f"must be between 1 and {limit}, got {value}")
    return value


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
    def from_fields(cls, fields: SamplingFields, *, default_max_tokens: int | None = None) -> SamplingParams:
        """Parameters from validated request fields; the ones left out keep their defaults."""
        values = {name: getattr(fields, name) for name in SamplingFields.model_fields
                  if getattr(fields, name) is not None}
        if "stop" in values:
            values["stop"] = (values["stop"],) if isinstance(values["stop"], str) else tuple(values["stop"])
        if default_max_tokens is not None:
            values.setdefault("max_tokens", default_max_tokens)
        return cls(**values)
