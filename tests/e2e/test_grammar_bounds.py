"""Grammars that would hold a slot: one that can never be completed is refused up front with a 400 naming why; one
that can go on for ever (``[a-z]*`` with ``ignore_eos``) ends at ``max_tokens`` like any request."""

from __future__ import annotations

import time

import httpx
from conftest import Server

MODEL = "smollm2-135m-instruct"
# A node whose required child is a node again: no finite JSON value satisfies it.
ENDLESS_TOOL = {
    "type": "function",
    "function": {
        "name": "tree",
        "parameters": {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {"child": {"$ref": "#/$defs/node"}},
                    "required": ["child"],
                }
            },
            "$ref": "#/$defs/node",
        },
    },
}
# The same recursion with a way out (an empty list of children) is an ordinary schema.
TREE_TOOL = {
    "type": "function",
    "function": {
        "name": "tree",
        "parameters": {
            "$defs": {
                "node": {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string"},
                        "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    },
                    "required": ["name", "children"],
                }
            },
            "$ref": "#/$defs/node",
        },
    },
}
# A bound against a hang, not a performance figure: the same requests take a second or two on a quiet machine.
BOUND_S = 60


def _chat(server: Server, **body: object) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = httpx.post(
        f"{server.v1}/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Go."}], "max_tokens": 48, **body},
        timeout=BOUND_S + 60,
    )
    return response, time.monotonic() - started


def test_a_grammar_that_never_ends_is_a_400_naming_the_rule(smollm: Server) -> None:
    response, _ = _chat(smollm, guided_grammar='root ::= "a" root')
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "grammar_never_ends" and error["param"] == "guided_grammar"
    assert "`root`" in error["message"]
    # With a way out it is served.
    response, _ = _chat(smollm, guided_grammar='root ::= "a" root | "b"', max_tokens=8)
    assert response.status_code == 200, response.text


def test_a_recursive_tool_schema_without_a_way_out_is_a_400(smollm: Server) -> None:
    response, _ = _chat(smollm, tools=[ENDLESS_TOOL], tool_choice="required")
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "grammar_never_ends"
    response, took = _chat(smollm, tools=[TREE_TOOL], tool_choice="required")
    assert response.status_code == 200, response.text
    assert took < BOUND_S


def test_an_open_ended_grammar_with_ignore_eos_ends_at_max_tokens(smollm: Server) -> None:
    response, took = _chat(smollm, guided_regex="[a-z]*", ignore_eos=True, max_tokens=64)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 64
    assert set(body["choices"][0]["message"]["content"]) <= set("abcdefghijklmnopqrstuvwxyz")
    assert took < BOUND_S
