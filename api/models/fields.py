"""Fields several request models share: strictness, the backend choice, and the sampling fields.

`SamplingFields` is the one statement of what a client may ask for: it validates request bodies and
produces their JSON Schema in the OpenAPI document; `SamplingFields.sampling()` turns the validated fields
into the `shared.sampling.SamplingParams` that travel on to the worker.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

from shared.sampling import MAX_STOP_SEQUENCES, SamplingParams

STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
"""Request models: unknown fields refused, no type coercion ("10" is not 10, true is not 1), no NaN. (10.0 is
10: the body's parser reads a number without a fractional part as an integer, as JSON Schema does.)"""

SERVER_LIMITS_KEY = "x-server-limits"
"""In a field's JSON Schema: JSON Schema keywords whose values this server chooses, by name: a setting
(`{"maxItems": "max_batch_prompts"}`) or `vocabulary_size`. The OpenAPI document writes the running server's
values in their place (api/openapi.py), so the limits it states are the ones requests are checked against."""


def server_limits(**keywords: str) -> dict:
    """`json_schema_extra` stating limits the server chooses: `server_limits(maximum="max_new_tokens_limit")`."""
    return {SERVER_LIMITS_KEY: keywords}

MAX_TOKENS_LIMIT_KEY = "max_tokens_limit"
"""Validation-context key carrying the server's cap on max_tokens (a setting, so not in the schema)."""

MAX_SEED = 2**63 - 1

Backend = Literal["gpu", "cpu", "auto"]

BACKEND_FIELD = Field(None, description="Worker pool: `gpu`, `cpu`, or `auto` (GPU when a GPU worker is live). "
                                        "The server's BACKEND_MODE when left out.")

QueueDeadline = Annotated[float, Field(ge=1, le=3600)]
QUEUE_DEADLINE_FIELD = Field(None, description=(
    "Seconds the job may wait in its pool's queue; one that waited longer fails with a `queue_timeout` error "
    "instead of starting late for a client that may have gone. The server's QUEUE_DEADLINE_S (60 s by "
    "default) when left out; batch prompts have none unless given."))


def check_max_tokens_limit(value: int, info: ValidationInfo) -> int:
    """Refuse a max_tokens above the cap passed in the validation context (MAX_NEW_TOKENS_LIMIT)."""
    limit = (info.context or {}).get(MAX_TOKENS_LIMIT_KEY)
    if limit is not None and value > limit:
        raise ValueError(f"must be between 1 and {limit}, got {value}")
    return value


MaxTokens = Annotated[int, Field(ge=1, description="Tokens to generate at most; the server's MAX_NEW_TOKENS_LIMIT "
                                                   "caps it, and prompt + max_tokens must fit the context.",
                                 json_schema_extra=server_limits(maximum="max_new_tokens_limit")),
                      AfterValidator(check_max_tokens_limit)]
Temperature = Annotated[float, Field(ge=0.0, le=2.0, description="0 is greedy decoding; a positive value below "
                                                                  "0.001 is taken as 0.001.")]
TopK = Annotated[int, Field(ge=0, le=1_000_000, description="Keep the k most likely tokens; 0 keeps all.")]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="Nucleus sampling: the smallest set of tokens "
                                                          "whose probabilities add up to top_p.")]
RepetitionPenalty = Annotated[float, Field(ge=0.01, le=10.0, description="Above 1 discourages repeating tokens "
                                                                         "already in the text, below 1 favours "
                                                                         "them.")]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED, description="Makes sampling reproducible.")]
Stop = Annotated[
    Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[str, Field(min_length=1)]],
                                                   Field(max_length=MAX_STOP_SEQUENCES)],
    Field(description="A stop sequence or a list of at most four; generation ends before one would appear "
                      "and the text never includes it."),
]


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

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        """The parameters a worker samples with; the fields left out keep their defaults."""
        values = {name: getattr(self, name) for name in SamplingFields.model_fields if getattr(self, name) is not None}
        if "stop" in values:
            values["stop"] = (values["stop"],) if isinstance(values["stop"], str) else tuple(values["stop"])
        values.setdefault("max_tokens", default_max_tokens)
        return SamplingParams(**values)
