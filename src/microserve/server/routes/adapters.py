"""vLLM's routes for adapters at run time: ``POST /v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``.

Both sit behind the API key like every model route. Their success bodies are plain text, as vLLM's are.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from microserve.protocol.adapters import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from microserve.protocol.common import ErrorResponse
from microserve.server.adapters import AdapterManager
from microserve.server.routes import ERRORS

# The success bodies are text, the errors JSON: both documented, so that the schema says what clients get.
TEXT_OK: dict[int | str, dict[str, Any]] = {
    200: {"description": "Success", "content": {"text/plain": {"schema": {"type": "string"}}}}
}
router = APIRouter(tags=["adapters"], responses={**ERRORS, 403: {"model": ErrorResponse}, **TEXT_OK})


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapterRequest, request: Request) -> PlainTextResponse:
    """Serve a LoRA adapter from the adapter directory under ``lora_name``."""
    manager: AdapterManager = request.app.state.adapters
    await manager.load(body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, request: Request) -> PlainTextResponse:
    """Stop serving an adapter; requests already running on it finish first."""
    manager: AdapterManager = request.app.state.adapters
    await manager.unload(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
