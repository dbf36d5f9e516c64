"""The HTTP routes, one module per API family."""

from __future__ import annotations

from typing import Any

from microserve.protocol.common import ErrorResponse

# The error responses every model route documents in the OpenAPI schema.
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 500, 503)
}
