"""The playground's route module and its Prometheus parser, without a model: the page is public, its API calls are
not, and the live view reads the exposition format prometheus_client writes."""

from __future__ import annotations

import json
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from microserve.server.auth import ApiKeyMiddleware, _digest
from microserve.server.routes import playground
from microserve.settings import Settings


def app(keys: list[str]) -> FastAPI:
    application = FastAPI()
    application.include_router(playground.router)

    @application.get("/v1/models")
    async def models() -> dict[str, str]:
        return {"object": "list"}

    application.add_middleware(
        ApiKeyMiddleware, digests=[_digest(k) for k in keys], public_paths=playground.PUBLIC_PATHS
    )
    return application


def test_root_and_trailing_slash_lead_to_the_page() -> None:
    client = TestClient(app([]), follow_redirects=False)
    for path in ("/", "/playground/", "/playground/index.html"):
        response = client.get(path)
        assert response.status_code == 307 and response.headers["location"] == "/playground", path


def test_page_and_files_have_their_types_and_a_local_only_policy() -> None:
    client = TestClient(app([]))
    types = {"": "text/html", "/app.js": "text/javascript", "/api.js": "text/javascript", "/style.css": "text/css"}
    for suffix, media in types.items():
        response = client.get(f"/playground{suffix}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(media), suffix
        assert "connect-src 'self'" in response.headers["content-security-policy"]
        assert response.headers["x-content-type-options"] == "nosniff"
    missing = client.get("/playground/nothing.js")
    assert missing.status_code == 404 and missing.json()["error"]["type"] == "not_found_error"


def test_with_keys_the_page_is_public_and_the_api_is_not() -> None:
    client = TestClient(app(["sk-1"]))
    assert client.get("/playground").status_code == 200
    assert client.get("/playground/app.js").status_code == 200
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer sk-1"}).status_code == 200


def test_every_packaged_file_is_served_and_public() -> None:
    folder = resources.files("microserve.server").joinpath("playground")
    names = {entry.name for entry in folder.iterdir() if entry.name.endswith((".html", ".js", ".css"))}
    assert {"index.html", "app.js", "api.js", "metrics.js", "style.css"} <= names
    assert {f"/playground/{n}" for n in names} <= playground.PUBLIC_PATHS


def test_the_setting_and_its_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().playground is True
    monkeypatch.setenv("MICROSERVE_PLAYGROUND", "false")
    assert Settings().playground is False


def test_the_pages_prometheus_parser_reads_prometheus_client_output(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    Gauge("num_requests_running", "r", ["model_name"], registry=registry).labels('a "quoted" \\ name').set(3)
    tokens = Counter("generation_tokens", "t", ["model_name"], registry=registry)
    tokens.labels("m1").inc(40)
    tokens.labels("m2").inc(2)
    ttft = Histogram("time_to_first_token_seconds", "f", ["model_name"], registry=registry, buckets=(0.1, 1.0))
    ttft.labels("m1").observe(0.25)
    ttft.labels("m1").observe(0.75)
    text = generate_latest(registry).decode()
    tokens.labels("m1").inc(20)
    later = generate_latest(registry).decode()

    source = resources.files("microserve.server").joinpath("playground", "metrics.js").read_text()
    module = tmp_path / "metrics.mjs"
    module.write_text(source)
    script = tmp_path / "check.mjs"
    script.write_text(
        "import { parsePrometheus, total, LiveStats } from './metrics.mjs';\n"
        f"const samples = parsePrometheus({json.dumps(text)});\n"
        "const live = new LiveStats(3);\n"
        "live.add(samples, 0);\n"
        f"const figures = live.add(parsePrometheus({json.dumps(later)}), 2000);\n"
        "console.log(JSON.stringify({\n"
        "  running: samples.get('num_requests_running'),\n"
        "  tokens: total(samples, 'generation_tokens_total'),\n"
        "  ttftCount: total(samples, 'time_to_first_token_seconds_count'),\n"
        "  inf: samples.get('time_to_first_token_seconds_bucket').find(s => s.labels.le === '+Inf').value,\n"
        "  figures,\n"
        "}));\n"
    )
    node = shutil.which("node")
    assert node, "node is missing (it comes with npm, which the browser tests need too)"
    out = json.loads(subprocess.run([node, str(script)], capture_output=True, text=True, check=True).stdout)
    assert out["running"] == [{"labels": {"model_name": 'a "quoted" \\ name'}, "value": 3}]
    assert out["tokens"] == 42 and out["ttftCount"] == 2 and out["inf"] == 2
    # 20 more tokens in 2 s; the mean first-token time of the scrape's requests (none new: the last mean stays).
    assert out["figures"] == {"running": 3, "waiting": 0, "toks": 10, "ttft": 0.5}
