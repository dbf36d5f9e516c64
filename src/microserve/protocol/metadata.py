"""Wire shapes of NIM's ``GET /v1/metadata`` and ``GET /v1/version``."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class ModelInfo(BaseModel):
    """One served model, in NIM's ``modelInfo`` field names plus what microserve chose for it."""

    model_config = ConfigDict(populate_by_name=True)

    short_name: str = Field(serialization_alias="shortName")
    model_url: str | None = Field(None, serialization_alias="modelUrl")
    task: str
    profile: str | None
    engine: str | None


class AdapterInfo(BaseModel):
    """One served LoRA adapter: its base model, rank, alpha and the format it was found in."""

    name: str
    parent: str
    rank: int
    alpha: float
    format: str
    source: str


class CpuInfo(BaseModel):
    """The CPUs the service found: all of them, those it may use (affinity and cgroup quota), and the quota."""

    logical_cores: int
    usable_cores: int
    cpu_quota: float | None = Field(None, description="CPUs the cgroup quota (cpu.max) allows; null: no quota.")


class Metadata(BaseModel):
    """``GET /v1/metadata``."""

    model_config = ConfigDict(populate_by_name=True)

    version: str
    model_info: list[ModelInfo] = Field(serialization_alias="modelInfo")
    engines: dict[str, str | None]
    adapters: list[AdapterInfo] = []
    repository_override: str = ""
    cpu: CpuInfo | None = None


class Version(BaseModel):
    """``GET /v1/version``: the release and the engine libraries behind it."""

    release: str
    api: str = "v1"
    engines: dict[str, str | None]
