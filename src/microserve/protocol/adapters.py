"""Wire shapes of vLLM's adapter routes, ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``."""

from __future__ import annotations

from pydantic import Field

from microserve.protocol.common import WireModel


class LoadLoraAdapterRequest(WireModel):
    # An adapter's name is a plain file name (catalog.adapters.check_name).
    lora_name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    # Inside the adapter directory (relative to it, or absolute); default: its sub-directory named lora_name.
    lora_path: str | None = Field(None, min_length=1, max_length=4096)


class UnloadLoraAdapterRequest(WireModel):
    lora_name: str = Field(min_length=1, max_length=128)
