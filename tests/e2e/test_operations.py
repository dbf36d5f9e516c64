"""Operations on one guarded server: API keys, admission control, request limits, metrics and request logs."""

from __future__ import annotations

import asyncio
import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from conftest import Server, start_server

MODEL = "smollm2-135m-instruct"
EMBEDDER = "all-minilm-l6-v2"  # served beside the chat model by default
KEY = "sk-file-key"
HASHED_KEY = "sk-hashed-key"
ENV_KEY = "sk-env-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMITS = {"max_tokens": 200, "max_messages": 6, "max_stop_sequences": 2, "max_stop_length": 12, "max_n": 3}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = Path(tmp_path_factory.mktemp("guarded"))
    keys = tmp / "keys.txt"
    keys.write_text(f"# operators' keys\n{KEY}\nsha256:{hashlib.sha256(HASHED_KEY.encode()).hexdigest()}\n")
    server = start_server(
        tmp,
        "--parallel",
        "2",
        "--max-queue",
        "4",
        "--api-key-file",
        str(keys),
        "--max-tokens-limit",
        str(LIMITS["max_tokens"]),
        "--max-messages",
        str(LIMITS["max_messages"]),
        "--max-stop-sequences",
        str(LIMITS["max_stop_sequences"]),
        "--max-stop-length",
        str(LIMITS["max_stop_length"]),
        "--max-n",
        str(LIMITS["max_n"]),
        "--log-format",
        "json",
        env={"MICROSERVE_API_KEYS": f"{ENV_KEY}, other-env-key"},
    )
    yield server
    server.stop()


def chat_body(**extra: object) -> dict[str, object]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 4, **extra}


def metric(server: Server, name: str, **labels: str) -> float:
    """One sample of the metrics route, read the way Prometheus would (summed over labels not named; an empty
    value leaves that label out, as for metrics that have no model_name)."""
    text = httpx.get(f"{server.v1}/metrics", headers=AUTH, timeout=10).text
    wanted = {k: v for k, v in {"model_name": MODEL, **labels}.items() if v}
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        label_text = line[len(name) + 1 : line.index("}")]
        pairs = dict(part.split("=", 1) for part in label_text.split(",") if part)
        if all(pairs.get(k) == json.dumps(v) for k, v in wanted.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def assert_openai_error(response: httpx.Response, status: int, param: str | None = None) -> dict[str, object]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


def assert_anthropic_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"} and body["error"]["message"]


# -- API keys ----------------------------------------------------------------------------------------------------

# A valid request for every operation that needs a body; GETs need none.
BODIES: dict[str, dict[str, object]] = {
    "/v1/chat/completions": chat_body(),
    "/v1/completions": {"model": MODEL, "prompt": "Hello", "max_tokens": 4},
    "/v1/embeddings": {"model": EMBEDDER, "input": "Hello"},
    "/v1/ranking": {"model": EMBEDDER, "query": {"text": "greeting"}, "passages": [{"text": "Hello"}]},
    "/v1/rerank": {"model": EMBEDDER, "query": "greeting", "documents": ["Hello", "Goodbye"]},
}


def operations(server: Server) -> list[tuple[str, str]]:
    schema = httpx.get(f"{server.url}/openapi.json", headers=AUTH, timeout=10).json()
    return [(method.upper(), path) for path, item in schema["paths"].items() for method in item]


def test_every_route_but_health_needs_a_key(guarded: Server) -> None:
    ops = operations(guarded)
    assert ("POST", "/v1/chat/completions") in ops and ("GET", "/v1/metrics") in ops
    assert {("POST", "/v1/embeddings"), ("GET", "/v1/metadata"), ("GET", "/v1/version")} <= set(ops)
    with httpx.Client(base_url=guarded.url, timeout=60) as http:
        assert http.get("/openapi.json").status_code == 401
        for method, path in ops:
            body = BODIES.get(path)
            if path.startswith("/v1/health/") or path == "/health":
                assert http.request(method, path).status_code == 200, path
                continue
            # Anthropic's routes answer in Anthropic's error shape.
            check = assert_anthropic_error if path.startswith("/v1/messages") else assert_openai_error
            missing = http.request(method, path, json=body)
            check(missing, 401)
            assert missing.headers["WWW-Authenticate"].startswith("Bearer")
            for wrong in ("Bearer sk-wrong", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"):
                refused = http.request(method, path, json=body, headers={"Authorization": wrong})
                check(refused, 401)
                assert "WWW-Authenticate" in refused.headers
            if (method == "POST" and body is None) or "{" in path:
                continue  # no known body, or a path naming a resource: its 401s are what this test owns
            for key in (KEY, HASHED_KEY, ENV_KEY, "other-env-key"):
                ok = http.request(method, path, json=body, headers={"Authorization": f"Bearer {key}"})
                assert ok.status_code == 200, (path, ok.text)


def test_the_openai_client_authenticates_with_its_api_key(guarded: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=guarded.v1, api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == [MODEL, EMBEDDER]
    assert len(client.embeddings.create(model=EMBEDDER, input="hello").data[0].embedding) == 384
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=guarded.v1, api_key="nope", max_retries=0).models.list()


# -- request limits ----------------------------------------------------------------------------------------------


def test_a_3_mib_body_is_refused_with_413_before_parsing(guarded: Server) -> None:
    # Not even JSON: a 400 would mean the parser saw it.
    junk = b"{" * (3 * 1024 * 1024)
    with httpx.Client(base_url=guarded.url, headers=AUTH, timeout=60) as http:
        declared = http.post("/v1/chat/completions", content=junk, headers={"content-type": "application/json"})
        assert_openai_error(declared, 413)

        def chunks() -> Iterator[bytes]:
            for offset in range(0, len(junk), 64 * 1024):
                yield junk[offset : offset + 64 * 1024]

        # A generator body goes out with chunked transfer encoding and no Content-Length.
        chunked = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
        assert "content-length" not in chunked.request.headers
        assert_openai_error(chunked, 413)
        # A body just under the limit is parsed (and is a 400 for being junk).
        small = http.post("/v1/chat/completions", content=b"{" * 1024, headers={"content-type": "application/json"})
        assert_openai_error(small, 400)


@pytest.mark.parametrize(
    ("field", "body"),
    [
        ("messages", chat_body(messages=[{"role": "user", "content": "hi"}] * (LIMITS["max_messages"] + 1))),
        ("max_tokens", chat_body(max_tokens=LIMITS["max_tokens"] + 1)),
        ("max_tokens", chat_body(max_tokens=None, max_completion_tokens=LIMITS["max_tokens"] + 1)),
        ("stop", chat_body(stop=["a", "b", "c"])),
        ("stop", chat_body(stop="x" * (LIMITS["max_stop_length"] + 1))),
        ("n", chat_body(n=LIMITS["max_n"] + 1)),
        ("max_tokens", chat_body(max_tokens=5000)),  # beyond the context as well as the limit
    ],
)
def test_each_limit_is_a_400_naming_the_field(guarded: Server, field: str, body: dict[str, object]) -> None:
    response = httpx.post(f"{guarded.v1}/chat/completions", json=body, headers=AUTH, timeout=60)
    assert_openai_error(response, 400, param=field)


def test_limits_apply_to_completions_too(guarded: Server) -> None:
    base = {"model": MODEL, "prompt": "Hello", "max_tokens": 4}
    for field, extra in (
        ("max_tokens", {"max_tokens": LIMITS["max_tokens"] + 1}),
        ("stop", {"stop": ["a", "b", "c"]}),
        ("n", {"n": LIMITS["max_n"] + 1}),
    ):
        response = httpx.post(f"{guarded.v1}/completions", json={**base, **extra}, headers=AUTH, timeout=60)
        assert_openai_error(response, 400, param=field)


def test_an_unset_max_tokens_defaults_to_the_limit(guarded: Server) -> None:
    body = chat_body(max_tokens=None, ignore_eos=True)
    response = httpx.post(f"{guarded.v1}/chat/completions", json=body, headers=AUTH, timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == LIMITS["max_tokens"]
    assert response.json()["choices"][0]["finish_reason"] == "length"


# -- admission control -------------------------------------------------------------------------------------------


def test_overload_gives_only_200s_and_429s_and_the_server_stays_ready(guarded: Server) -> None:
    rejected_before = metric(guarded, "num_requests_rejected_total", reason="queue_full")

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=guarded.v1, headers=AUTH, timeout=180) as http:
            body = chat_body(max_tokens=16, ignore_eos=True)
            return await asyncio.gather(*(http.post("/chat/completions", json=body) for _ in range(32)))

    responses = asyncio.run(main())
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    # 2 running + 4 queued must get through; the rest of the burst arrives while they hold the queue.
    assert statuses.count(200) >= 6, statuses
    assert statuses.count(429) >= 1, statuses
    for response in responses:
        if response.status_code == 429:
            error = assert_openai_error(response, 429)
            assert error["type"] == "rate_limit_error"
            assert int(response.headers["Retry-After"]) >= 1
        else:
            assert response.json()["usage"]["completion_tokens"] == 16
    assert metric(guarded, "num_requests_rejected_total", reason="queue_full") - rejected_before == statuses.count(429)
    assert httpx.get(f"{guarded.v1}/health/ready", timeout=10).status_code == 200
    assert httpx.post(f"{guarded.v1}/chat/completions", json=chat_body(), headers=AUTH, timeout=60).status_code == 200


async def _abort_stream(http: httpx.AsyncClient, body: dict[str, object]) -> None:
    async with http.stream("POST", "/chat/completions", json=body) as response:
        assert response.status_code == 200
        lines = 0
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                lines += 1
                if lines >= 3:
                    return  # leaving the block closes the connection mid-stream


def test_aborted_streams_bring_num_requests_running_back_to_zero(guarded: Server) -> None:
    body = chat_body(max_tokens=LIMITS["max_tokens"], ignore_eos=True, stream=True)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=guarded.v1, headers=AUTH, timeout=120) as http:
            for _ in range(10):  # 20 streams, two at a time: both slots busy each round
                await asyncio.gather(_abort_stream(http, body), _abort_stream(http, body))

    aborted_before = metric(guarded, "request_success_total", finished_reason="abort")
    asyncio.run(main())
    deadline = time.monotonic() + 2
    running = metric(guarded, "num_requests_running")
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = metric(guarded, "num_requests_running")
    assert running == 0
    assert metric(guarded, "num_requests_waiting") == 0
    assert metric(guarded, "request_success_total", finished_reason="abort") - aborted_before == 20


async def settle(server: Server, name: str, done: Callable[[float], bool], seconds: float) -> float:
    """Poll a metric until ``done`` holds or ``seconds`` pass; the last value read."""
    value = await asyncio.to_thread(metric, server, name)
    for _ in range(int(seconds * 10)):
        if done(value):
            break
        await asyncio.sleep(0.1)
        value = await asyncio.to_thread(metric, server, name)
    return value


async def idle(server: Server) -> bool:
    """Wait until nothing runs or waits: the requests of the test before (a cancelled client's sequence leaves the
    engine at its next step, after its admission slot is free) must not count in the next test's queue."""
    running = await settle(server, "num_requests_running", lambda v: v == 0, 10)
    waiting = await settle(server, "num_requests_waiting", lambda v: v == 0, 10)
    return running == 0 and waiting == 0


def test_a_client_leaving_the_queue_gives_its_place_up(guarded: Server) -> None:
    long = chat_body(max_tokens=LIMITS["max_tokens"], ignore_eos=True, stream=True)

    async def main() -> None:
        async with httpx.AsyncClient(base_url=guarded.v1, headers=AUTH, timeout=120) as http:
            release = asyncio.Event()

            async def hold() -> None:
                async with http.stream("POST", "/chat/completions", json=long) as response:
                    async for _ in response.aiter_lines():
                        if release.is_set():
                            return

            assert await idle(guarded)
            holders = [asyncio.create_task(hold()) for _ in range(2)]
            assert await settle(guarded, "num_requests_running", lambda v: v == 2, 30) == 2
            # Both slots taken (200 tokens each): these wait in the queue until cancelled.
            queued = [asyncio.create_task(http.post("/chat/completions", json=chat_body())) for _ in range(3)]
            assert await settle(guarded, "num_requests_waiting", lambda v: v >= 3, 30) == 3
            for task in queued:
                task.cancel()
            await asyncio.gather(*queued, return_exceptions=True)
            assert await settle(guarded, "num_requests_waiting", lambda v: v == 0, 5) == 0
            assert await settle(guarded, "num_requests_running", lambda v: v == 2, 1) == 2
            release.set()
            await asyncio.gather(*holders)

    asyncio.run(main())


def test_a_request_for_n_choices_holds_n_slots(guarded: Server) -> None:
    # Two slots and a queue of four. A stream of n=2 choices takes both slots, so single requests arriving
    # behind it all queue: the fifth finds the queue full. Counted one slot per request, the first single
    # would have run beside it and none would be refused.
    wide = chat_body(max_tokens=LIMITS["max_tokens"], ignore_eos=True, stream=True, n=2)

    async def main() -> httpx.Response:
        async with httpx.AsyncClient(base_url=guarded.v1, headers=AUTH, timeout=120) as http:
            release = asyncio.Event()

            async def hold() -> None:
                async with http.stream("POST", "/chat/completions", json=wide) as response:
                    assert response.status_code == 200
                    async for _ in response.aiter_lines():
                        if release.is_set():
                            return

            # The slot counts below assume an idle server: the streams of the test before may still be leaving.
            assert await idle(guarded)
            holder = asyncio.create_task(hold())
            assert await settle(guarded, "num_requests_running", lambda v: v == 2, 30) == 2
            queued = [asyncio.create_task(http.post("/chat/completions", json=chat_body())) for _ in range(4)]
            assert await settle(guarded, "num_requests_waiting", lambda v: v >= 4, 30) == 4
            refused = await http.post("/chat/completions", json=chat_body())
            for task in queued:
                task.cancel()
            await asyncio.gather(*queued, return_exceptions=True)
            release.set()
            await holder
            return refused

    assert_openai_error(asyncio.run(main()), 429)


def test_retrieval_routes_are_counted_and_report_encoder_passes(guarded: Server) -> None:
    def count(path: str) -> float:
        return metric(guarded, "http_requests_total", method="POST", path=path, status="200", model_name="")

    before_passes = metric(guarded, "encoder_forward_passes_total", model_name=EMBEDDER)
    before_inputs = metric(guarded, "encoder_inputs_total", model_name=EMBEDDER)
    before = {path: count(path) for path in ("/v1/embeddings", "/v1/ranking")}
    for path in before:
        response = httpx.post(f"{guarded.url}{path}", json=BODIES[path], headers=AUTH, timeout=60)
        assert response.status_code == 200, response.text
    for path, value in before.items():
        assert count(path) - value == 1, path
    assert metric(guarded, "encoder_forward_passes_total", model_name=EMBEDDER) - before_passes >= 2
    # One embedding input plus the query and one passage the embedding ranker encodes.
    assert metric(guarded, "encoder_inputs_total", model_name=EMBEDDER) - before_inputs == 3
    assert metric(guarded, "num_requests_running", model_name=EMBEDDER) == 0


# -- metrics and logs --------------------------------------------------------------------------------------------


def test_metrics_count_tokens_latencies_and_statuses(guarded: Server) -> None:
    before = {
        name: metric(guarded, name)
        for name in ("prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_count")
    }
    response = httpx.post(f"{guarded.v1}/chat/completions", json=chat_body(max_tokens=6, ignore_eos=True), headers=AUTH)
    usage = response.json()["usage"]
    assert metric(guarded, "prompt_tokens_total") - before["prompt_tokens_total"] == usage["prompt_tokens"]
    assert metric(guarded, "generation_tokens_total") - before["generation_tokens_total"] == 6
    assert metric(guarded, "time_to_first_token_seconds_count") - before["time_to_first_token_seconds_count"] == 1
    text = httpx.get(f"{guarded.url}/metrics", headers=AUTH, timeout=10).text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prefix_cache_hit_tokens_total",
        "inter_token_latency_seconds_bucket",
        "e2e_request_latency_seconds_bucket",
        "request_queue_time_seconds_bucket",
        'request_success_total{finished_reason="length"',
        'http_requests_total{method="POST",path="/v1/chat/completions",status="200"}',
    ):
        assert name in text, name


def test_one_json_log_line_per_request_with_its_id_and_no_secrets(guarded: Server) -> None:
    secret_prompt = "my-private-prompt-text"
    response = httpx.post(
        f"{guarded.v1}/chat/completions",
        json=chat_body(messages=[{"role": "user", "content": secret_prompt}], max_tokens=3),
        headers={**AUTH, "X-Request-Id": "req-ops-42"},
        timeout=60,
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "req-ops-42"
    generated = httpx.get(f"{guarded.v1}/models", headers=AUTH).headers["x-request-id"]
    assert len(generated) >= 16
    time.sleep(0.5)
    log = guarded.log.read_text()
    lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == "req-ops-42"]
    assert len(mine) == 1
    entry = mine[0]
    assert entry["status"] == 200 and entry["model"] == MODEL
    assert entry["prompt_tokens"] > 0 and entry["completion_tokens"] == 3
    assert entry["ttft_ms"] > 0 and entry["duration_ms"] >= entry["ttft_ms"]
    for secret in (secret_prompt, KEY, HASHED_KEY, ENV_KEY):
        assert secret not in log


def test_embedding_and_ranking_requests_log_their_model_and_tokens(guarded: Server) -> None:
    before = metric(guarded, "prompt_tokens_total", model_name=EMBEDDER)
    used = 0
    for path, request_id in (("/v1/embeddings", "req-emb-7"), ("/v1/ranking", "req-rank-7")):
        response = httpx.post(
            f"{guarded.url}{path}", json=BODIES[path], headers={**AUTH, "X-Request-Id": request_id}, timeout=60
        )
        assert response.status_code == 200, response.text
        tokens = response.json()["usage"]["prompt_tokens"]
        assert tokens > 0
        used += tokens
        time.sleep(0.3)
        lines = [json.loads(line) for line in guarded.log.read_text().splitlines() if line.startswith("{")]
        (entry,) = [line for line in lines if line.get("request_id") == request_id]
        assert entry["model"] == EMBEDDER and entry["prompt_tokens"] == tokens, entry
    assert metric(guarded, "prompt_tokens_total", model_name=EMBEDDER) - before == used


# -- configuration errors stop the CLI before it serves ------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--api-key-file", "/nonexistent/keys"], "cannot read the API key file"),
        (["--ssl-certfile", "/tmp/cert.pem"], "--ssl-certfile and --ssl-keyfile go together"),
        (["--log-format", "xml"], "invalid setting log_format"),
    ],
)
def test_bad_operations_settings_are_a_clear_cli_error(args: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "microserve", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
