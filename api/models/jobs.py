"""Answers of the job and service routes: a job's status, a cancellation, the service's health."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from shared.protocol import DoneEvent, ErrorDetail, ScoreDoneEvent


class JobStatus(BaseModel):
    """`GET /jobs/<id>` answer."""

    job_id: str
    status: str = Field(description="RQ's status: queued, started, finished, failed, canceled, ...")
    backend: str | None = Field(description="The pool the job was sent to (null once RQ forgot the job).")
    events: int = Field(description="Events published so far (the last one's id).")
    result: DoneEvent | ScoreDoneEvent | None = Field(None, description="Present once the job finished (a "
                                                                        "scoring job's has its scores).")
    error: ErrorDetail | None = Field(None, description="Present once the job failed or was cancelled.")


class CancelResult(BaseModel):
    """`DELETE /jobs/<id>` answer."""

    job_id: str
    status: Literal["cancelled", "cancelling", "finished", "failed"]


class Health(BaseModel):
    """`GET /health` answer."""

    status: Literal["ok", "starting", "unavailable"] = Field(description=(
        "`ok`: Redis answers (whether or not workers are ready); `starting`: no worker is ready yet but one is "
        "loading its model (requests for its pool wait in the queue meanwhile); `unavailable`: Redis does not "
        "answer."))
    redis: bool
    workers: dict[str, int] = Field(description="Live workers per pool that take jobs now (ready).")
    starting: dict[str, int] = Field(description="Workers per pool that are still loading their model: they "
                                                 "count for routing, and take jobs once loaded.")
