"""The web playground: one page and its scripts, served from package data, that talks to this server's own API.

The page and its static files are public (a browser cannot send a Bearer key when it navigates); every API call
the page makes carries the key the user typed and passes the same key check, limits, admission and request log as
any client's. The Content-Security-Policy lets the page load and connect to this server alone.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import JSONResponse, RedirectResponse, Response

from microserve.protocol.common import ErrorResponse
from microserve.server.errors import error_body

PAGE = "/playground"
_PACKAGE = "microserve.server"
_FOLDER = "playground"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with the package: revalidating costs one round trip on loopback.
    "Cache-Control": "no-cache",
}


@cache
def _files() -> dict[str, tuple[bytes, str]]:
    """Every file of the page by name, read once from the installed package."""
    folder = resources.files(_PACKAGE).joinpath(_FOLDER)
    found: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        if entry.is_file() and suffix in _TYPES:
            found[entry.name] = (entry.read_bytes(), _TYPES[suffix])
    return found


# Exact paths the API key check lets through: the page, its files and the redirect to it, nothing else.
PUBLIC_PATHS = frozenset({"/", PAGE, f"{PAGE}/", *(f"{PAGE}/{name}" for name in _files())})

router = APIRouter(tags=["playground"], include_in_schema=False)


@router.get("/")
async def root() -> RedirectResponse:
    """The server's front door leads to the playground."""
    return RedirectResponse(PAGE, status_code=307)


@router.get(f"{PAGE}/")
async def page_slash() -> RedirectResponse:
    """One URL for the page, so its relative links resolve one way."""
    return RedirectResponse(PAGE, status_code=307)


@router.get(PAGE)
async def page() -> Response:
    """The playground page."""
    return _serve("index.html")


@router.get(f"{PAGE}/{{name}}", responses={404: {"model": ErrorResponse}})
async def asset(name: str) -> Response:
    """A script or stylesheet of the page."""
    if name == "index.html":  # the page has one address
        return RedirectResponse(PAGE, status_code=307)
    return _serve(name)


def _serve(name: str) -> Response:
    found = _files().get(name)
    if found is None:
        return JSONResponse(error_body(404, f"no playground file `{name}`"), status_code=404)
    body, media_type = found
    return Response(body, media_type=media_type, headers=_HEADERS)
