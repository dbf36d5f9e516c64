"""API keys: every route but the health probes needs ``Authorization: Bearer <key>`` once keys are configured; the
Anthropic Messages routes also take the key as ``x-api-key``, as Anthropic's clients send it.

A request with a valid key carries the key's owner, the hex sha256 of the key, in its state (:func:`request_owner`):
the fine-tuning routes keep each owner's files and jobs apart with it. The key itself goes no further than here.
"""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from microserve.server.errors import ANTHROPIC_PREFIX, send_error
from microserve.settings import Settings

HEALTH_PREFIX = "/v1/health/"
HEALTH_PATHS = frozenset({"/health"})
METRICS_PATHS = frozenset({"/metrics", "/v1/metrics"})

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="microserve"'}
OWNER_STATE = "api_key_owner"


class KeyFileError(ValueError):
    """The key file cannot be read or has a malformed line."""


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def load_key_digests(settings: Settings) -> list[bytes]:
    """SHA-256 digests of every configured key; plain keys are hashed here so only digests stay in memory."""
    digests: list[bytes] = []
    if settings.api_keys is not None:
        digests += [_digest(k.strip()) for k in settings.api_keys.get_secret_value().split(",") if k.strip()]
    if settings.api_key_file is not None:
        try:
            lines = Path(settings.api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise KeyFileError(f"cannot read the API key file {settings.api_key_file}: {exc.strerror or exc}") from exc
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("sha256:"):
                try:
                    digest = bytes.fromhex(line.removeprefix("sha256:"))
                except ValueError:
                    digest = b""
                if len(digest) != 32:
                    # The line number only: the line itself may be a secret.
                    raise KeyFileError(f"{settings.api_key_file}:{number}: `sha256:` needs 64 hex digits")
                digests.append(digest)
            else:
                digests.append(_digest(line))
    return digests


def request_owner(request: Request) -> str | None:
    """Who owns what this request creates: the hex sha256 of its API key, or None when the server has no keys."""
    owner = getattr(request.state, OWNER_STATE, None)
    return owner if isinstance(owner, str) else None


def is_public(path: str, metrics_public: bool) -> bool:
    """Health probes are always open; metrics only when the operator says so."""
    if path.startswith(HEALTH_PREFIX) or path in HEALTH_PATHS:
        return True
    return metrics_public and path in METRICS_PATHS


class ApiKeyMiddleware:
    """Rejects requests without a valid Bearer key with 401 before routing, so new routes are covered too."""

    def __init__(
        self,
        app: ASGIApp,
        digests: list[bytes],
        metrics_public: bool = False,
        public_paths: frozenset[str] = frozenset(),
    ) -> None:
        self.app = app
        self.digests = digests
        self.metrics_public = metrics_public
        # Pages a browser navigates to (it cannot send a Bearer key); the API calls they make still need one.
        self.public_paths = public_paths

    def _valid(self, presented: str) -> bool:
        return self._matches(_digest(presented))

    def _matches(self, candidate: bytes) -> bool:
        # Compare against every key, without stopping at a match, so timing says nothing about which matched.
        matched = False
        for digest in self.digests:
            matched |= hmac.compare_digest(candidate, digest)
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or not self.digests
            or is_public(scope["path"], self.metrics_public)
            or scope["path"] in self.public_paths
        ):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        anthropic = path.startswith(ANTHROPIC_PREFIX)
        header = ""
        api_key: str | None = None
        for name, value in scope.get("headers") or []:
            if name == b"authorization":
                header = value.decode("latin-1")
            elif name == b"x-api-key" and anthropic:
                api_key = value.decode("latin-1")
        scheme, _, token = header.partition(" ")
        if api_key is not None and not header:
            scheme, token = "bearer", api_key
        if not header and api_key is None:
            how = (
                "`x-api-key: <key>` or `Authorization: Bearer <key>`" if anthropic else "`Authorization: Bearer <key>`"
            )
            await send_error(
                send, 401, f"Missing API key: send it as {how}.", headers=_CHALLENGE, code="missing_api_key", path=path
            )
            return
        candidate = _digest(token.strip())
        if scheme.lower() != "bearer" or not self._matches(candidate):
            await send_error(
                send,
                401,
                "Incorrect API key provided.",
                headers={"WWW-Authenticate": 'Bearer realm="microserve", error="invalid_token"'},
                code="invalid_api_key",
                path=path,
            )
            return
        scope.setdefault("state", {})[OWNER_STATE] = candidate.hex()
        await self.app(scope, receive, send)
