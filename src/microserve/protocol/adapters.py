"""Wire shapes of vLLM's adapter routes, ``POST /v1/load_lora_adapter`` and ``POST /v1/unload_lora_adapter``."""

from __future__ import annotations

from pydantic import Field

from microserve.protocol.common import WireModel

# An adapter's name is a plain file name (catalog/adapters.py check_name): in the schema, so a name the server
# would refuse is refused by validation.
ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"


class LoadLoraAdapterRequest(WireModel):
    lora_name: str = Field(pattern=ADAPTER_NAME)
    # Inside the adapter directory (relative to it, or absolute); default: its sub-directory named lora_name.
    lora_path: str | None = Field(None, min_length=1, max_length=4096, pattern=r"^[^\x00]*$")


class UnloadLoraAdapterRequest(WireModel):
    lora_name: str = Field(pattern=ADAPTER_NAME)
