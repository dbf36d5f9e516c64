"""The web playground in a real headless Chromium (Debian's), driven by Playwright: chat streamed token by token,
model switch, stop mid-stream, embeddings and ranking, the live metrics chart, the API key prompt, accessibility
(axe-core) and no request leaving the server.

Set MICROSERVE_SCREENSHOTS=docs/img to refresh the screenshots in the docs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import Server, start_server
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, expect, sync_playwright
from tiny_gguf import write_tiny_llama

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MODEL = "smollm2-135m-instruct"
TINY = "tiny-llama"
EMBEDDER = "all-minilm-l6-v2"
KEY = "sk-playground"
SCREENSHOTS = os.environ.get("MICROSERVE_SCREENSHOTS")


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of the server's /v1/metrics, read as a Prometheus client would (0 when absent)."""
    text = httpx.get(f"{server.v1}/metrics", timeout=10).text
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith(name + "{") and all(w in line for w in wanted):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two chat models (SmolLM2 and a tiny random one to switch to) and the embedding model."""
    tmp = Path(tmp_path_factory.mktemp("playground"))
    tiny = write_tiny_llama(tmp / "tiny.gguf")
    server = start_server(
        tmp,
        *("--model", MODEL, "--model", str(tiny)),
        *("--served-model-name", MODEL, "--served-model-name", TINY),
        *("--parallel", "4"),
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = Path(tmp_path_factory.mktemp("playground-keys"))
    tiny = write_tiny_llama(tmp / "tiny.gguf")
    server = start_server(
        tmp,
        *("--model", str(tiny), "--served-model-name", TINY, "--embedding-model", "none"),
        env={"MICROSERVE_API_KEYS": KEY},
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    assert Path(CHROMIUM).is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
    yield browser
    browser.close()


class Recorder:
    """Every request a page makes, and every response status it got."""

    def __init__(self, context: BrowserContext) -> None:
        self.urls: list[str] = []
        self.bodies: list[tuple[str, Any]] = []
        self.statuses: list[tuple[str, int]] = []
        context.on("request", self._request)
        context.on("response", lambda r: self.statuses.append((r.url, r.status)))

    def _request(self, request: Any) -> None:
        self.urls.append(request.url)
        if request.method == "POST" and request.post_data:
            self.bodies.append((request.url, json.loads(request.post_data)))

    def assert_all_local(self, origin: str) -> None:
        outside = [u for u in self.urls if not u.startswith(origin + "/") and not u.startswith("data:")]
        assert self.urls and outside == [], outside


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    yield context
    context.close()


def open_page(context: BrowserContext, server: Server) -> tuple[Page, Recorder]:
    recorder = Recorder(context)
    page = context.new_page()
    page.goto(server.url + "/")
    assert page.url == server.url + "/playground"
    return page, recorder


def shot(page: Page, name: str) -> None:
    if SCREENSHOTS:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SCREENSHOTS) / name))


def watch_reply(page: Page) -> None:
    """Record every change of the newest reply's text, with its time, in window.__updates."""
    page.evaluate(
        """() => {
        window.__updates = [];
        new MutationObserver(() => {
            const texts = document.querySelectorAll('.message.assistant .text');
            const last = texts[texts.length - 1];
            if (last) window.__updates.push([performance.now(), last.textContent.length]);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }"""
    )


def send(page: Page, text: str) -> None:
    page.get_by_label("Message").fill(text)
    page.get_by_label("Message").press("Enter")


def last_reply(page: Page) -> Any:
    return page.locator(".message.assistant").last


def chart_heights(page: Page) -> dict[str, int]:
    """Pixels of each series' colour drawn clear of the chart's zero line (its lowest fifth): 0 while the series is
    flat at zero, more once the chart shows tokens or requests."""
    return dict(
        page.evaluate(
            """() => {
        const canvas = document.getElementById('chart');
        const style = getComputedStyle(canvas);
        const rgb = (name) => {
            const probe = document.createElement('span');
            probe.style.color = style.getPropertyValue(name);
            document.body.append(probe);
            const value = getComputedStyle(probe).color.match(/\\d+/g).map(Number);
            probe.remove();
            return value;
        };
        const series = {toks: rgb('--chart-toks'), running: rgb('--chart-running')};
        const rows = Math.floor(canvas.height * 0.8);
        const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, rows).data;
        const counts = {toks: 0, running: 0};
        for (let i = 0; i < data.length; i += 4) {
            for (const [name, [r, g, b]] of Object.entries(series)) {
                const near = Math.abs(data[i] - r) + Math.abs(data[i + 1] - g) + Math.abs(data[i + 2] - b) < 40;
                if (near && data[i + 3] > 200) counts[name] += 1;
            }
        }
        return counts;
    }"""
        )
    )


def test_chat_streams_switches_model_stops_and_the_chart_follows(context: BrowserContext, served: Server) -> None:
    page, recorder = open_page(context, served)
    expect(page.locator("#server-state")).to_have_text("ready")
    picker = page.get_by_label("Model", exact=True)
    expect(picker.locator("option")).to_have_count(2)
    assert picker.input_value() == MODEL
    expect(page.locator("#chart")).to_have_attribute("data-points", re.compile(r"^[2-9]|\d\d"))
    assert chart_heights(page) == {"toks": 0, "running": 0}  # nothing has run yet: both lines lie at zero

    page.get_by_label("Temperature").fill("0")
    page.get_by_label("Max tokens").fill("48")
    page.get_by_label("System prompt").fill("You are a helpful assistant.")
    watch_reply(page)
    send(page, "What is the capital of France? Answer in one sentence.")
    reply = last_reply(page)
    expect(reply).to_have_attribute("data-finish", re.compile("stop|length"), timeout=60_000)
    updates = page.evaluate("() => window.__updates")
    lengths = sorted({n for _, n in updates if n})
    assert len(lengths) >= 5, updates  # the text grew piece by piece...
    assert updates[-1][0] - next(t for t, n in updates if n) > 20, updates  # ...over time, not in one go
    meta = reply.locator(".meta").inner_text()
    assert re.search(r"\d+ prompt tokens · \d+ completion tokens · [\d.]+ tok/s · first token \d+ ms", meta), meta
    chat_bodies = [b for u, b in recorder.bodies if u.endswith("/v1/chat/completions")]
    assert chat_bodies[-1]["model"] == MODEL and chat_bodies[-1]["stream"] is True
    assert chat_bodies[-1]["stream_options"] == {"include_usage": True}
    assert chat_bodies[-1]["temperature"] == 0 and chat_bodies[-1]["max_tokens"] == 48
    assert chat_bodies[-1]["messages"][0] == {"role": "system", "content": "You are a helpful assistant."}
    shot(page, "playground-chat.png")

    # Another model: the request names it, the reply is headed with it, and the history goes along.
    picker.select_option(TINY)
    send(page, "hello")
    expect(last_reply(page)).to_have_attribute("data-finish", re.compile("stop|length"), timeout=60_000)
    expect(last_reply(page).locator(".who")).to_have_text(TINY)
    body = [b for u, b in recorder.bodies if u.endswith("/v1/chat/completions")][-1]
    assert body["model"] == TINY
    assert [m["role"] for m in body["messages"]] == ["system", "user", "assistant", "user"]

    # A long answer, stopped mid-stream: the server sees the client leave and frees the sequence.
    page.get_by_role("button", name="New chat").click()
    expect(page.locator(".message")).to_have_count(0)
    picker.select_option(MODEL)
    page.get_by_label("Max tokens").fill("3000")
    aborted_before = metric(served, "request_success_total", model_name=MODEL, finished_reason="abort")
    send(page, "Write a very long story about a dragon who learns to fly.")
    expect(last_reply(page).locator(".text")).to_have_text(re.compile(r"(\S+\s+){8}"), timeout=30_000)
    expect(page.locator("#stat-running")).to_have_text("1", timeout=15_000)
    assert metric(served, "num_requests_running", model_name=MODEL) == 1
    expect(page.locator("#stat-toks")).not_to_have_text(re.compile(r"^(–|0\.0)$"))
    page.get_by_role("button", name="Stop").click()
    expect(last_reply(page)).to_have_attribute("data-finish", "stopped")
    expect(last_reply(page).locator(".meta")).to_contain_text(re.compile(r"\d+ completion tokens · .*stopped"))
    streamed = last_reply(page).locator(".text").inner_text()
    deadline = time.monotonic() + 10
    while metric(served, "num_requests_running", model_name=MODEL) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(served, "num_requests_running", model_name=MODEL) == 0
    assert metric(served, "request_success_total", model_name=MODEL, finished_reason="abort") == aborted_before + 1
    expect(page.locator("#stat-running")).to_have_text("0", timeout=5_000)
    assert page.get_by_role("button", name="Send").is_enabled()
    time.sleep(1.5)
    assert last_reply(page).locator(".text").inner_text() == streamed  # nothing came after the stop
    drawn = chart_heights(page)
    assert drawn["toks"] > 0 and drawn["running"] > 0, drawn
    shot(page, "playground-stopped.png")
    recorder.assert_all_local(served.url)


def test_embedding_comparison_and_ranking(context: BrowserContext, served: Server) -> None:
    page, recorder = open_page(context, served)
    expect(page.get_by_label("Embedding model").locator("option")).to_have_count(1)
    first, second = "The weather is lovely today.", "It is sunny and warm outside."
    page.get_by_label("First text").fill(first)
    page.get_by_label("Second text").fill(second)
    page.get_by_role("button", name="Compare").click()
    output = page.locator("#similarity")
    expect(output).to_contain_text("Cosine similarity")
    shown = float(output.get_attribute("data-value") or "nan")
    vectors = httpx.post(f"{served.v1}/embeddings", json={"model": EMBEDDER, "input": [first, second]}).json()["data"]
    a, b = (np.array(v["embedding"]) for v in vectors)
    assert shown == pytest.approx(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)), abs=1e-6)
    assert "384 dimensions" in output.inner_text()

    page.get_by_role("button", name="Rank").click()
    ranked = page.locator("#rankings li")
    expect(ranked).to_have_count(3)
    assert "stock market" in ranked.nth(2).inner_text()  # the one passage not about plants ranks last
    assert "logit" in ranked.nth(0).inner_text()
    shot(page, "playground-retrieval.png")
    recorder.assert_all_local(served.url)


def axe_source(tmp_path_factory: pytest.TempPathFactory) -> str:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "microserve-tests" / "npm"
    script = cache / "node_modules" / "axe-core" / "axe.min.js"
    if not script.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--prefix", str(cache), "--no-audit", "--no-fund", "axe-core@4"],
            check=True,
            capture_output=True,
            timeout=300,
        )
    return script.read_text()


@pytest.fixture(scope="module")
def axe(tmp_path_factory: pytest.TempPathFactory) -> str:
    return axe_source(tmp_path_factory)


@pytest.mark.parametrize("scheme", ["light", "dark"])
def test_page_passes_axe_on_labels_and_contrast(browser: Browser, served: Server, axe: str, scheme: str) -> None:
    context = browser.new_context(viewport={"width": 1400, "height": 900}, color_scheme=scheme)  # type: ignore[arg-type]
    try:
        page, recorder = open_page(context, served)
        expect(page.get_by_label("Model", exact=True).locator("option")).to_have_count(2)
        page.get_by_label("Max tokens").fill("8")
        send(page, "Hi")  # a conversation on the page, so its messages are checked too
        expect(last_reply(page)).to_have_attribute("data-finish", re.compile("stop|length"), timeout=60_000)
        page.get_by_role("button", name="Compare").click()
        expect(page.locator("#similarity")).to_contain_text("Cosine similarity")
        page.evaluate(axe + "\n;0")  # through the debugging protocol: the page's policy allows no inline script
        result = page.evaluate(
            """async () => {
            const r = await axe.run(document, {runOnly: {type: 'tag', values:
                ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa', 'best-practice']}});
            return {violations: r.violations.map(v => ({id: v.id, nodes: v.nodes.map(n => n.target.join(' '))})),
                    passes: r.passes.map(p => p.id)};
        }"""
        )
        assert result["violations"] == []
        # The rules this check is for did run, on elements of this page.
        assert {"label", "color-contrast", "select-name", "button-name"} <= set(result["passes"])
        recorder.assert_all_local(served.url)
    finally:
        context.close()


def test_with_keys_the_page_asks_for_one_and_keeps_it_in_session_storage(
    context: BrowserContext, keyed: Server
) -> None:
    assert httpx.get(f"{keyed.v1}/models").status_code == 401
    page, recorder = open_page(context, keyed)  # the page itself loads without a key
    dialog = page.get_by_role("dialog", name="API key")
    expect(dialog).to_be_visible()
    assert (f"{keyed.v1}/models", 401) in recorder.statuses
    expect(page.locator("#key-reason")).to_contain_text("Missing API key")
    shot(page, "playground-key.png")

    page.get_by_role("textbox", name="API key").fill("sk-wrong")
    page.get_by_role("button", name="Use key").click()
    expect(dialog).to_be_visible()  # refused again: asked again
    expect(page.locator("#key-reason")).to_contain_text("Incorrect API key")

    page.get_by_role("textbox", name="API key").fill(KEY)
    page.get_by_role("button", name="Use key").click()
    expect(dialog).to_be_hidden()
    expect(page.get_by_label("Model", exact=True).locator("option")).to_have_text([TINY])
    expect(page.locator("#stat-running")).to_have_text("0")  # the metrics are read with the key too
    assert page.evaluate("() => sessionStorage.getItem('microserve.apiKey')") == KEY
    assert page.evaluate("() => Object.keys(localStorage).length") == 0
    assert KEY not in page.context.cookies().__repr__()
    send(page, "hello")
    expect(last_reply(page)).to_have_attribute("data-finish", re.compile("stop|length"), timeout=60_000)
    recorder.assert_all_local(keyed.url)


def test_no_playground_serves_no_page(tmp_path: Path) -> None:
    tiny = write_tiny_llama(tmp_path / "tiny.gguf")
    server = start_server(tmp_path, "--model", str(tiny), "--embedding-model", "none", "--no-playground")
    try:
        for path in ("/", "/playground", "/playground/app.js"):
            response = httpx.get(server.url + path)
            assert response.status_code == 404, path
            assert response.json()["error"]["type"] == "not_found_error"
    finally:
        server.stop()


def test_page_files_come_with_a_policy_that_keeps_them_local(served: Server) -> None:
    page = httpx.get(f"{served.url}/playground")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "script-src 'self'" in policy
    scripts = re.findall(r'src="([^"]+)"', page.text) + re.findall(r'href="([^"]+)"', page.text)
    assert scripts and all(s.startswith("/playground/") or s == "data:," for s in scripts), scripts
    for name in ("app.js", "api.js", "metrics.js", "style.css"):
        asset = httpx.get(f"{served.url}/playground/{name}")
        assert asset.status_code == 200, name
        assert "http://" not in asset.text and "https://" not in asset.text, name
    assert httpx.get(f"{served.url}/playground/missing.js").status_code == 404
