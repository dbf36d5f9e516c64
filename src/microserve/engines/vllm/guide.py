"""From the engine-neutral :class:`~microserve.engines.base.Guide` to vLLM's structured outputs.

JSON schemas, regexes, choice lists and GBNF grammars map one to one onto ``StructuredOutputsParams`` (vLLM's
xgrammar backend reads GBNF). Tool calls become an xgrammar structural tag: one tag per function, its arguments
held to the function's schema, the blocks from the first token (``tool_choice`` required or named) or, with a
trigger, only once the model opens a call (``auto``: ``triggered_tags``), so free text before a call stays free.
:func:`check` compiles the same constraint with xgrammar, so that what vLLM would refuse is a 400 up front.
"""

from __future__ import annotations

import json
from typing import Any

from microserve.engines.base import Guide
from microserve.errors import InvalidRequest


def _call_tag(name: str, parameters: Any, open_text: str, close_text: str) -> dict[str, Any]:
    schema = parameters if parameters else {"type": "object", "properties": {}}
    return {
        "type": "tag",
        "begin": f'{open_text}{{"name": {json.dumps(name)}, "arguments": ',
        "content": {"type": "json_schema", "json_schema": schema},
        "end": f"}}{close_text}",
    }


def tool_calls_tag(spec: dict[str, Any], trigger: str | None) -> dict[str, Any]:
    """xgrammar's structural tag for a ``tool_calls`` guide's spec (functions, parallel, open, close)."""
    open_text, close_text = str(spec["open"]), str(spec["close"])
    tags = [_call_tag(str(name), params, open_text, close_text) for name, params in spec["functions"]]
    parallel = bool(spec.get("parallel", True))
    body: dict[str, Any]
    if trigger:
        body = {"type": "triggered_tags", "triggers": [trigger], "tags": tags, "stop_after_first": not parallel}
    else:
        body = {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": "\n",
            "at_least_one": True,
            "stop_after_first": not parallel,
        }
    return {"type": "structural_tag", "format": body}


def structured_outputs(guide: Guide | None) -> Any:
    """vLLM's ``StructuredOutputsParams`` for ``guide`` (None: unconstrained)."""
    if guide is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if guide.kind == "json":
        return StructuredOutputsParams(json=guide.spec)
    if guide.kind == "regex":
        return StructuredOutputsParams(regex=guide.spec)
    if guide.kind == "choice":
        return StructuredOutputsParams(choice=list(guide.spec))
    if guide.kind == "grammar":
        return StructuredOutputsParams(grammar=guide.spec)
    return StructuredOutputsParams(structural_tag=json.dumps(tool_calls_tag(guide.spec, guide.trigger)))


def check(guide: Guide) -> None:
    """Compile ``guide`` with xgrammar (blocking: run it in a worker thread); raise InvalidRequest naming
    ``guide.param`` when it cannot be enforced."""
    import xgrammar

    try:
        if guide.kind == "json":
            xgrammar.Grammar.from_json_schema(json.dumps(guide.spec), any_whitespace=True)
        elif guide.kind == "regex":
            xgrammar.Grammar.from_regex(guide.spec)
        elif guide.kind == "choice":
            if not guide.spec:
                raise InvalidRequest("the choice list is empty", param=guide.param)
        elif guide.kind == "grammar":
            xgrammar.Grammar.from_ebnf(guide.spec)
        else:
            xgrammar.Grammar.from_structural_tag(json.dumps(tool_calls_tag(guide.spec, guide.trigger)))
    except InvalidRequest:
        raise
    except Exception as exc:  # xgrammar raises RuntimeError/ValueError subclasses of its own
        raise InvalidRequest(f"cannot enforce {guide.param}: {exc}", param=guide.param) from exc
