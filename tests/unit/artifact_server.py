"""A loopback HTTP server for artifacts: plain URLs and the paths ``huggingface_hub`` requests from a Hub mirror."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class Served:
    """What the server holds and what it was asked."""

    files: dict[str, bytes]
    delay: float = 0.0
    truncate: set[str] = field(default_factory=set)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    url: str = ""

    def count(self, method: str, path: str | None = None) -> int:
        """How many ``method`` requests (for ``path``, if given) arrived."""
        return sum(1 for m, p, _ in self.requests if m == method and (path is None or p == path))


def _handler(served: Served) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:  # keep test output clean
            pass

        def _head(self) -> bytes | None:
            path = self.path.split("?")[0]
            served.requests.append((self.command, path, dict(self.headers.items())))
            body = served.files.get(path)
            if body is None:
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.send_header("X-Error-Code", "EntryNotFound")
                self.end_headers()
                return None
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "application/octet-stream")
            # What the Hub sends for a file: its commit, and its sha256 as the ETag of an LFS blob.
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
            self.end_headers()
            return body

        def do_HEAD(self) -> None:
            self._head()

        def do_GET(self) -> None:
            body = self._head()
            if body is None:
                return
            path = self.path.split("?")[0]
            if path in served.truncate:
                body = body[: len(body) // 2]
            step = 64 * 1024
            try:
                for start in range(0, len(body), step):
                    self.wfile.write(body[start : start + step])
                    if served.delay:
                        time.sleep(served.delay)
            except (BrokenPipeError, ConnectionResetError):
                pass
            if path in served.truncate:
                self.close_connection = True

    return Handler


@contextmanager
def artifact_server(files: dict[str, bytes], delay: float = 0.0) -> Iterator[Served]:
    """Serve ``files`` (URL path → bytes) on a free loopback port until the block ends."""
    served = Served(files=files, delay=delay)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(served))
    served.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
