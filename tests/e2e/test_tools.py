"""Tool calling through the real openai client: forced calls, streamed call deltas, tool results in history."""

from __future__ import annotations

import asyncio
import json

import httpx
import jsonschema
from conftest import Server

MODEL = "smollm2-135m-instruct"

WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 30}, "unit": {"enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
ADD = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": ADD}},
]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather like in Paris today?"}]


def _required(smollm: Server, **extra: object) -> object:
    return smollm.client().chat.completions.create(
        model=MODEL,
        messages=ASK,  # type: ignore[arg-type]
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
        **extra,  # type: ignore[arg-type]
    )


def test_required_returns_a_valid_call_of_one_of_the_tools(smollm: Server) -> None:
    reply = _required(smollm)
    choice = reply.choices[0]  # type: ignore[attr-defined]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    calls = choice.message.tool_calls
    assert calls and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in SCHEMAS
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_streamed_call_deltas_reassemble_to_the_same_call(smollm: Server) -> None:
    whole = _required(smollm).choices[0].message.tool_calls[0]  # type: ignore[attr-defined]
    chunks = list(_required(smollm, stream=True))  # type: ignore[call-overload]
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas, "no tool-call deltas were streamed"
    first = deltas[0]
    # id, type and name come first, with no arguments yet; the arguments follow in pieces.
    assert first.index == 0 and first.id and first.type == "function" and first.function.name == whole.function.name
    assert not first.function.arguments
    assert all(d.index == 0 and d.id is None and d.function.name is None for d in deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert len(deltas) > 2
    assert arguments == whole.function.arguments
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert all(not (c.choices[0].delta.content or "") for c in chunks if c.choices)


def test_named_choice_forces_that_function(smollm: Server) -> None:
    reply = smollm.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is 2 plus 40?"}],
        tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "add"}},
        max_tokens=40,
        seed=5,
    )
    calls = reply.choices[0].message.tool_calls
    assert calls and [c.function.name for c in calls] == ["add"]
    jsonschema.validate(json.loads(calls[0].function.arguments), ADD)
    assert reply.choices[0].finish_reason == "tool_calls"


def test_parallel_required_calls_are_each_valid(smollm: Server) -> None:
    reply = smollm.client().chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=TOOLS,
        tool_choice="required",
        max_tokens=80,
        seed=2,  # type: ignore[arg-type]
    )
    calls = reply.choices[0].message.tool_calls or []
    assert calls
    for call in calls:
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
    assert len({c.id for c in calls}) == len(calls)


def test_follow_up_with_the_tool_result_is_answered(smollm: Server) -> None:
    call = _required(smollm).choices[0].message.tool_calls[0]  # type: ignore[attr-defined]
    messages = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})},
    ]
    reply = smollm.client().chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice="none",
        max_tokens=40,
        temperature=0,  # type: ignore[arg-type]
    )
    choice = reply.choices[0]
    assert choice.message.tool_calls is None
    assert (choice.message.content or "").strip()
    assert choice.finish_reason in ("stop", "length")


def test_auto_may_answer_in_text(smollm: Server) -> None:
    reply = smollm.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Say hello."}],
        tools=TOOLS,  # type: ignore[arg-type]
        max_tokens=30,
        temperature=0,
    )
    choice = reply.choices[0]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.function.name in SCHEMAS
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")


def test_unknown_tool_in_tool_choice_is_400(smollm: Server) -> None:
    body = {
        "model": MODEL,
        "messages": ASK,
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}},
    }
    response = httpx.post(f"{smollm.v1}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "tool_choice" and "launch_rocket" in error["message"]
    assert error["type"] == "invalid_request_error" and "code" in error


def test_tool_with_unsupported_parameters_schema_is_400(smollm: Server) -> None:
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "not": {}}}}]
    body = {"model": MODEL, "messages": ASK, "tools": tools, "tool_choice": "required"}
    response = httpx.post(f"{smollm.v1}/chat/completions", json=body, timeout=60)
    assert response.status_code == 400
    assert "`not`" in response.json()["error"]["message"]


def test_auto_constrains_a_call_once_the_model_opens_one() -> None:
    """With tool_choice auto the grammar is lazy: free text until ``<tool_call>``, then only valid calls.

    The prompt is a few-shot pattern that makes the model open a call; the schema accepts upper-case city names
    only, which the examples do not show, so an unconstrained model writes ``Lima`` where the grammar forces
    ``LIMA``.
    """
    from microserve.catalog.manifest import find_builtin
    from microserve.catalog.store import ModelStore
    from microserve.engines.base import GenerationRequest, SamplingParams
    from microserve.engines.llamacpp.engine import LlamaCppConfig, LlamaCppEngine
    from microserve.protocol.chat import ToolDefinition
    from microserve.services.tools import ToolCallParser, plan_tools
    from microserve.settings import Settings

    cities = {"type": "object", "properties": {"city": {"enum": ["ROME", "OSLO", "LIMA"]}}, "required": ["city"]}
    tools = [
        ToolDefinition.model_validate({"type": "function", "function": {"name": "get_weather", "parameters": cities}})
    ]
    plan = plan_tools(tools, "auto", False)
    guide = plan.guide
    assert guide is not None and guide.trigger
    manifest = find_builtin(MODEL)
    assert manifest is not None
    path = ModelStore(Settings().cache_dir).path_for(manifest)
    shot = 'Q: weather in Rome?\nA: <tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'

    async def main() -> list[str]:
        engine = LlamaCppEngine(LlamaCppConfig(path=str(path), model_id=MODEL, parallel=3, context_length=512))
        await engine.start()
        try:
            await engine.check_guide(guide)
            prompt = engine.encode_prompt(shot + shot.replace("Rome", "Oslo") + "Q: weather in Lima?\nA:")

            async def one(seed: int) -> str:
                params = SamplingParams(max_tokens=40, temperature=1.0, seed=seed)
                request = GenerationRequest(f"s{seed}", prompt, params, guide=guide)
                return "".join([d.text async for d in engine.generate(request)])

            return await asyncio.gather(*(one(seed) for seed in range(3)))
        finally:
            await engine.shutdown()

    outputs = asyncio.run(main())
    opened = [text for text in outputs if "<tool_call>" in text]
    assert opened, outputs
    for text in opened:
        parser = ToolCallParser(plan.names, parallel=False)
        parser.feed(text)
        parser.finish()
        assert len(parser.calls) == 1 and parser.calls[0].complete, text
        jsonschema.validate(json.loads(parser.calls[0].arguments), cities)
