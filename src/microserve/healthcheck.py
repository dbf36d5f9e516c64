"""``python -m microserve.healthcheck``: exit 0 when the server this environment configures says it is ready.

A container's ``HEALTHCHECK`` runs it. It reads the same settings as ``microserve serve`` (``MICROSERVE_*`` and
NIM's names), so the port and the scheme follow whatever the container was started with, and it asks
``/v1/health/ready`` with the standard library's HTTP client: the image needs no curl.
"""

from __future__ import annotations

import ssl
import sys
import urllib.error
import urllib.request

from pydantic import ValidationError

from microserve.settings import Settings

_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


def ready_url(settings: Settings) -> str:
    """The readiness route of the server ``settings`` describe, reached over loopback when it binds every address."""
    host = _WILDCARDS.get(settings.host, settings.host)
    if ":" in host:
        host = f"[{host}]"
    scheme = "https" if settings.ssl_certfile else "http"
    return f"{scheme}://{host}:{settings.port}/v1/health/ready"


def _tls_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.ssl_certfile is None:
        return None
    context = ssl.create_default_context()
    # The probe asks its own server; the certificate names the service, not the loopback address it is asked on.
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if settings.ssl_ca_certs is not None and settings.ssl_keyfile is not None:
        # With client certificates required, the server's own pair is the one certificate the probe can present.
        context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    return context


def probe(settings: Settings, timeout: float = 5.0) -> tuple[bool, str]:
    """``(ready, what the server said)`` for the server ``settings`` describe."""
    url = ready_url(settings)
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=_tls_context(settings)) as response:
            return response.status == 200, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url}: {exc.code} {exc.read(500).decode('utf-8', 'replace')}"
    except (OSError, ssl.SSLError) as exc:
        return False, f"{url}: {exc}"


def main(argv: list[str] | None = None) -> int:
    """Exit status 0 when ready, 1 when not (or when the settings are invalid); one line on stdout says why."""
    args = sys.argv[1:] if argv is None else argv
    try:
        timeout = float(args[0]) if args else 5.0
        # From the environment only, as `microserve serve` reads it when no flag is given.
        settings = Settings(**{})
    except (ValueError, ValidationError) as exc:
        print(f"microserve healthcheck: {exc}")
        return 1
    ready, detail = probe(settings, timeout)
    print(detail)
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
