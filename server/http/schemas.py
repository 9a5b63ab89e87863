"""Request and response bodies (pydantic), with the examples shown in /docs.

FLOPs are multiply-accumulates of convs and linears (MSDNet paper convention);
``flops`` of a result is the cumulative cost of the exit it took, at batch size 1,
with lazy evaluation.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr

from .. import errors
from . import params

# A real 28 x 28 grey PNG (an ankle boot from the Fashion-MNIST test split), so
# the examples in /docs work when sent.
EXAMPLE_IMAGE = (
    "iVBORw0KGgoAAAANSUhEUgAAABwAAAAcCAAAAABXZoBIAAABUElEQVR42t3Su0rDYBgG4Pf78ydpDk0roQcVPAylaJFOoljciu7i"
    "4uCiixfgfQkOTl6Bo5Pgoqhoiya2aWqb/AcHQdA70G98H953+oB/fQYBNhoA+xETw/y+JzUwxd5vhMJ25xgAqocJwH8OivWVXuMs"
    "cu7D4PFXkwlvnwpFYtTKY/6NBEYwFE56L06hJ1WaWYH3hQQNpQ2Jg/rLqPzWz7kJ5jW+UINxgsRR+yEsO8OiGueksQsOMGhSCpjb"
    "c259O8y0CzmVqeqAG1IBGpWl5mw2LAemrRbN91yxDyNpcYnaouc5y24+YiVHuOOp9VxyY38mrYcc3TlRMaRI/DrZMfONdDSoArFy"
    "bMF3jm+eE5YZlFiqSI4y67VViyF1J6M+v9pc60AkUTSwKGy6gW5f33VtDfE0LBIAf6O5VQk80iq6ubyYAOcLr0kipqd/65k+AWKC"
    "ff9NOm1OAAAAAElFTkSuQmCC")


def _positive_number(value, info) -> float | None:
    # The one rule of server.http.params, reported as a pydantic error naming the field.
    try:
        return params.positive_number(value, info.field_name)
    except errors.InvalidParameter as exc:
        raise ValueError(exc.message) from None


PositiveNumber = Annotated[float | None, BeforeValidator(_positive_number),
                           Field(json_schema_extra={"exclusiveMinimum": 0, "maximum": params.MAX_NUMBER})]


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"image": EXAMPLE_IMAGE, "deadline_ms": 1000}]})
    image: str = Field(description="The image file (PNG, JPEG, ...), base64-encoded.")
    deadline_ms: PositiveNumber = Field(None, description="Answer within this many milliseconds (from the "
                                                          "request's arrival) with the deepest exit that fits.")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"images": [EXAMPLE_IMAGE, EXAMPLE_IMAGE], "flops_budget": 2.0e7}]})
    images: list[str] = Field(min_length=1, description="Image files, base64-encoded.")
    flops_budget: PositiveNumber = Field(None, description="Total FLOPs for the whole batch; default: "
                                                           "N x the controller's current target.")


class TopK(BaseModel):
    class_id: int
    label: str
    probability: float


class ClassifyResult(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "class_id": 9, "label": "Ankle boot", "confidence": 0.998,
        "top_k": [{"class_id": 9, "label": "Ankle boot", "probability": 0.998}],
        "exit": 1, "num_exits": 4, "flops": 4801536, "deadline_met": None, "latency_ms": 3.1}]})
    class_id: int
    label: str
    confidence: float = Field(description="Temperature-scaled max softmax probability at the exit taken.")
    top_k: list[TopK]
    exit: int = Field(description="1-based exit the image left at.")
    num_exits: int
    flops: int = Field(description="FLOPs spent on this image (multiply-accumulates, cumulative to its exit).")
    deadline_met: bool | None = Field(description="null without a deadline.")
    latency_ms: float
    target_flops: float | None = Field(None, description="Target mean FLOPs per /classify request in force when "
                                       "this image was answered (multiply-accumulates); null for /batch.")
    degraded: bool = Field(False, description="True when that target was below the configured one: the latency "
                                              "objective lowered it because the queue would have broken it.")


class ErrorDetail(BaseModel):
    model_config = ConfigDict(extra="allow")
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class BatchResult(BaseModel):
    results: list[ClassifyResult | ErrorBody] = Field(description="One per input image, in input order; "
                                                                  "a bad image gets an error entry.")
    flops_used: int
    flops_budget: float
    exit_counts: dict[str, int] = Field(description="Images per exit, keys '1'..'K'.")


class ObjectiveState(BaseModel):
    objective_ms: float = Field(description="The latency objective (MSDNET_LATENCY_SLO_MS).")
    configured_flops: float = Field(description="The configured target mean FLOPs per request.")
    in_force_flops: float = Field(description="The target in force (FLOPs per request).")
    state: str = Field(description="'steady' (in force = configured), 'degraded' or 'refusing'.")
    reason: str = Field(description="Why, with the figures that decided.")
    wait_ms: float = Field(description="Forecast queueing delay of a request arriving now.")
    busy: float = Field(description="Share of the model threads' time spent in block steps (smoothed).")


class BudgetState(BaseModel):
    target_flops: float = Field(description="Target mean FLOPs per /classify request.")
    realised_flops: float | None = Field(description="Mean FLOPs per request over the last window.")
    window: int = Field(description="Requests in that window.")
    thresholds: list[float | None] = Field(description="Per-exit confidence thresholds (null: nobody leaves).")
    command_flops: float = Field(description="The per-request budget the controller commands now.")
    requests: int
    controller: bool
    mode: str = Field(description="'local' or 'fleet'.")
    fleet_realised_flops: float | None = None
    in_force_flops: float = Field(description="Target mean FLOPs per request in force: target_flops, or lower "
                                              "while the latency objective degrades.")
    objective: ObjectiveState | None = Field(None, description="The latency objective's state; null when "
                                                               "MSDNET_LATENCY_SLO_MS is not set.")


class BudgetUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"target_flops": 8.0e6}]})
    target_flops: Annotated[float, BeforeValidator(_positive_number)] = Field(
        description="Target mean FLOPs per /classify request.")


class Status(BaseModel):
    status: str = Field(description="'ok'.")


class Readiness(BaseModel):
    status: str = Field(description="'ready'.")
    num_exits: int


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={
        "examples": [{"request_id": "3f9c2a7d1b5e4c60", "label": "Ankle boot"}]})
    request_id: str = Field(min_length=1, max_length=128, description="The X-Request-ID of the /classify answer "
                            "being labelled (echoed on every answer; send your own to choose it).")
    # strict: a JSON true or 8.0 is no class id (lax parsing took true for class 1)
    label: StrictInt | StrictStr = Field(description="The true class: its id (0..num_classes-1) or its name.")


class FeedbackResult(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{
        "request_id": "3f9c2a7d1b5e4c60", "label": 9, "exit": 1, "class_id": 9, "correct": True, "audited": True,
        "last_exit_class_id": 9, "last_exit_correct": True}]})
    request_id: str
    label: int = Field(description="The true class id.")
    exit: int = Field(description="1-based exit the answer left at.")
    class_id: int = Field(description="The class answered.")
    correct: bool = Field(description="Whether the answered class is the label.")
    audited: bool = Field(description="Whether the request was sampled to be carried on to the last exit "
                                      "(MSDNET_AGREEMENT_SAMPLE).")
    last_exit_class_id: int | None = Field(description="The last exit's class when audited and its audit has "
                                           "finished; null otherwise (a finishing audit is scored later).")
    last_exit_correct: bool | None = Field(description="Whether the last exit's class is the label; null as above.")
