"""Arguments of the taskray Serve application (the ``args`` of ``configs/serve.yaml``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class ServedModel(BaseModel):
    """One model served for one task."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="model id")
    task: Literal["classification"] = "classification"
    bundle: str = Field(description="bundle directory (or a plain HF model directory)")
    max_batch_size: int = Field(default=32, ge=1, le=1024)
    batch_wait_timeout_s: float = Field(default=0.01, ge=0, le=5)
    device: str = "auto"


class Limits(BaseModel):
    """Refused before any model sees the request."""

    model_config = ConfigDict(extra="forbid")

    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    max_text_chars: int = Field(default=20_000, ge=1)
    max_batch_texts: int = Field(default=256, ge=1)


class AppArgs(BaseModel):
    """Everything the application builder needs."""

    model_config = ConfigDict(extra="forbid")

    models: list[ServedModel] = Field(min_length=1)
    limits: Limits = Limits()
    api_key_env: str | None = Field(
        default="TASKRAY_API_KEY",
        description="environment variable holding the API key; unset or empty = no auth",
    )
    api_key_file: str | None = Field(default=None, description="file holding the API key")
