"""The endpoint's contract as clients see it in ``/openapi.json``: request bodies, answers and every error.

Response models are pydantic (FastAPI's own choice), so the schema a client or a fuzzer (schemathesis) reads
is the one the answers are validated against.
"""

from typing import Any, Literal

from pydantic import BaseModel, Field

from serving.decode import ACCEPTED_TYPES

_BINARY = {"schema": {"type": "string", "format": "binary"}}
PREDICT_REQUEST = {
    "requestBody": {
        "required": True,
        "description": "One image: raw bytes with their Content-Type, or a multipart upload in the field `file`.",
        "content": {
            **{content_type: _BINARY for content_type in ACCEPTED_TYPES},
            "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                               "properties": {"file": {"type": "string", "format": "binary"}}}},
        },
    }
}


class Prediction(BaseModel):
    label: str = Field(description="NORMAL or PNEUMONIA: probability >= threshold")
    probability: float = Field(ge=0, le=1, description="P(PNEUMONIA), calibrated as the package says")
    threshold: float = Field(description="the operating point chosen on validation")
    model_version: str
    certainty: Literal["firm", "borderline"] | None = Field(
        None, description="borderline: the probability lies inside borderline_band, so near the threshold that a "
                          "benign re-encoding of the film (a JPEG save, a 2 % resize) could flip the label; firm: "
                          "outside it. Absent for a package without a band")
    borderline_band: list[float] | None = Field(
        None, min_length=2, max_length=2, description="[low, high]: probabilities strictly between them are "
                                                      "borderline (fitted on validation; see /metadata's borderline)")
    ood_score: float | None = Field(None, description="out-of-distribution score; absent without a gate")
    ood_threshold: float | None = Field(None, description="the gate refuses scores above it")
    out_of_distribution: bool | None = Field(None, description="true when ?force=true overrode a refusal")
    heatmap_png: str | None = Field(None, description="with ?explain=true: base64 PNG of the Grad-CAM overlay")


class ErrorDetail(BaseModel):
    detail: str = Field(description="what is wrong with the request")


class Refusal(BaseModel):
    detail: str = Field(description="why the image was refused")
    reason: str = Field(description="the check that refused it: ood_gate, or a check before the model "
                                    "(see /metadata's film_checks)")
    ood_score: float | None = Field(None, description="with reason ood_gate")
    ood_threshold: float | None = Field(None, description="with reason ood_gate")


class ValidationProblem(BaseModel):
    """FastAPI's own answer to a malformed query parameter (e.g. ``explain=maybe``)."""

    detail: list[dict[str, Any]]


class Health(BaseModel):
    status: str


class Metadata(BaseModel):
    model_version: str
    class_names: list[str]
    input: dict[str, Any] = Field(description="the input contract: size, channels, intensity normalisation...")
    threshold: float
    threshold_method: str
    test_metrics: dict[str, Any]
    calibration: dict[str, Any] | None
    ood: dict[str, Any] = Field(description="the out-of-distribution gate, or why there is none")
    film_checks: dict[str, Any] | None = Field(None, description="the checks before the model (too small, aspect, "
                                                                 "blank, inverted), or null for a package without")
    security: dict[str, Any] = Field(description="authentication: whether /predict needs a bearer token; warning: "
                                                 "when it was allowed to go without one")
    borderline: dict[str, Any] | None = Field(None, description="the borderline band (low, high, half_width in logit, "
                                                               "rule, fitted_on), or null for a package without")
    swap_error: str | None = Field(None, description="the last live swap to another package that failed (the package "
                                                     "and why); this one keeps serving meanwhile")


def errors(*codes: int) -> dict[int, dict]:
    """``responses=`` entries for the error statuses a route answers with."""
    described = {400: "the body is not an image this endpoint can read", 401: "missing or wrong bearer token",
                 413: "the body is larger than max_body_bytes", 415: "unsupported Content-Type"}
    table: dict[int, dict] = {code: {"model": ErrorDetail, "description": described[code]} for code in codes
                              if code in described}
    if 422 in codes:
        table[422] = {"model": Refusal | ValidationProblem,
                      "description": "refused: not a chest film like the training data (Refusal), or a malformed "
                                     "query parameter (ValidationProblem)"}
    return table
