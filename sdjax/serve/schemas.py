"""Request and response bodies: OpenAI's images/videos shapes plus the diffusion extensions, flat.

Static bounds here keep the OpenAPI schema honest; the model's and the operator's limits (allowed sizes and
frame counts, max steps, prompt length) are checked per request and answered with a 422 naming the field.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from sdjax.config import CACHE_POLICIES, SOLVERS

Status = Literal["queued", "in_progress", "completed", "failed", "cancelled"]


class CacheSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    policy: Literal[CACHE_POLICIES] | None = Field(None, description="absent: the model's default policy")
    threshold: float | None = Field(None, ge=0, le=1e6, allow_inf_nan=False,
                                    description="absent: the model's recommended threshold for the policy")


class _Generation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, max_length=1_000_000)
    model: str | None = Field(None, max_length=256, description="must name the served model when given")
    negative_prompt: str | None = Field(None, max_length=1_000_000)
    num_inference_steps: int | None = Field(None, ge=1, le=10_000)
    guidance_scale: float | None = Field(None, ge=0, le=1000, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="drawn at random when absent; returned")
    size: str | None = Field(None, pattern=r"^[0-9]{1,5}x[0-9]{1,5}$", description="WIDTHxHEIGHT")
    width: int | None = Field(None, ge=1, le=100_000)
    height: int | None = Field(None, ge=1, le=100_000)
    flow_shift: float | None = Field(None, gt=0, le=1000, allow_inf_nan=False)
    solver: Literal[SOLVERS] | None = None
    cache: CacheSpec | None = Field(None, description="feature cache (policy, threshold)")
    user: str | None = Field(None, max_length=256)


class VideoCreate(_Generation):
    num_frames: int | None = Field(None, ge=1, le=100_000)
    seconds: float | None = Field(None, gt=0, le=3600, allow_inf_nan=False,
                                  description="length; mapped to the nearest allowed frame count at fps")
    fps: int | None = Field(None, ge=1, le=240)


class ImageCreate(_Generation):
    n: int = Field(1, ge=1, le=1)
    response_format: Literal["b64_json"] = "b64_json"
    output_format: Literal["png"] = "png"


class JobError(BaseModel):
    code: str
    message: str


class Video(BaseModel):
    """A video job (OpenAI's `video` object plus diffusion fields)."""

    id: str
    object: Literal["video"] = "video"
    status: Status
    progress: int = Field(ge=0, le=100)
    stage: str | None = Field(None, description="leased, encode, denoise, decode or save while in progress")
    created_at: int
    started_at: int | None = None
    completed_at: int | None = None
    model: str
    weights_version: str | None = None
    prompt: str
    negative_prompt: str
    seed: int
    size: str
    width: int
    height: int
    num_frames: int
    fps: int
    seconds: float
    num_inference_steps: int
    guidance_scale: float
    cache: dict
    steps_done: int
    steps_total: int
    queue_position: int | None = None
    attempts: int
    cancel_requested: bool
    timings: dict[str, float]
    result: dict | None = Field(None, description="content_type, bytes, sha256 of the artefact once completed")
    error: JobError | None = None
    expires_at: int | None = Field(None, description="when the ended job and its result are deleted (--result-ttl)")


class VideoList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Video]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool


class ImageData(BaseModel):
    b64_json: str
    revised_prompt: str | None = None
    seed: int


class ImageResponse(BaseModel):
    id: str
    created: int
    data: list[ImageData]
    output_format: Literal["png"] = "png"
    size: str
    timings: dict[str, float]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sdjax"
    version: str
    sizes: list[str]
    frames: list[int]
    fps: int
    max_steps: int
    defaults: dict


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str | None = Field(None, max_length=4096, description="model dir; default: reload the current one")
    version: str | None = Field(None, max_length=256, description="label reported as weights_version")


class ReloadStatus(BaseModel):
    seq: int
    status: Literal["pending", "ok", "failed"]
    workers: dict[str, dict]
    error: str | None = None


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
