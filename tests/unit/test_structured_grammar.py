"""Pure text: JSON-schema checks, integer ranges, regex compilation and the tool-call parser."""

from __future__ import annotations

import re

import pytest

from microserve.engines.llamacpp.regex_grammar import RegexError, regex_to_gbnf
from microserve.engines.llamacpp.structured import SchemaError, integer_range_gbnf, json_schema_gbnf
from microserve.services.tools import CallArguments, CallStart, TextOut, ToolCallParser


def _range_regex(gbnf: str) -> re.Pattern[str]:
    # Integer-range grammars use only literals, classes, groups and alternation: a direct regex translation.
    return re.compile(re.sub(r'"([^"]*)"', lambda m: re.escape(m.group(1)), gbnf).replace(" ", ""))


@pytest.mark.parametrize(("lo", "hi"), [(0, 120), (18, 99), (-5, 37), (-250, -17), (7, 7), (95, 1005), (1, 10)])
def test_integer_ranges_accept_exactly_their_members(lo: int, hi: int) -> None:
    pattern = _range_regex(integer_range_gbnf(lo, hi))
    for value in range(lo - 300, hi + 300):
        assert bool(pattern.fullmatch(str(value))) == (lo <= value <= hi), value
    assert not pattern.fullmatch("007") or (lo <= 7 <= hi and False)


def test_half_open_ranges() -> None:
    at_least = _range_regex(integer_range_gbnf(10, None))
    assert at_least.fullmatch("10") and at_least.fullmatch("123456") and not at_least.fullmatch("9")
    at_most = _range_regex(integer_range_gbnf(None, -3))
    assert at_most.fullmatch("-3") and at_most.fullmatch("-4000") and not at_most.fullmatch("-2")
    assert not at_most.fullmatch("0")


@pytest.mark.parametrize(
    ("schema", "named"),
    [
        ({"type": "number", "minimum": 0}, "minimum"),
        ({"type": "object", "not": {}}, "not"),
        ({"type": "string", "format": "email"}, "email"),
        ({"type": ["string", "null"], "maxLength": 3}, "anyOf"),
        ({"type": "integer", "minimum": 5, "maximum": 1}, "no value"),
        ({"allOf": [{"type": "string"}]}, "allOf"),
        ({"type": "object", "properties": {"a": {"$ref": "other.json"}}}, "$ref"),
    ],
)
def test_unenforceable_schemas_are_named(schema: dict, named: str) -> None:
    with pytest.raises(SchemaError) as info:
        json_schema_gbnf(schema)
    assert named in info.value.message


def test_supported_schema_converts() -> None:
    grammar = json_schema_gbnf(
        {
            "type": "object",
            "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 3}, "s": {"type": "string"}},
            "required": ["n"],
        }
    )
    rules = dict(line.split(" ::= ", 1) for line in grammar.splitlines())
    assert rules["n"] == "([1-3]) space"
    assert rules["root"] == '"{" space n-kv ( "," space ( s-kv ) )? "}" space'
    # Raw control characters are not valid inside JSON strings.
    assert rules["char"].startswith('[^"\\\\\\x7F\\x00-\\x1F]')


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?=a)a", r"\bword", r"(?i)abc", "a^b"])
def test_regex_constructs_without_a_grammar_equivalent_are_rejected(pattern: str) -> None:
    with pytest.raises(RegexError):
        regex_to_gbnf(pattern)


def test_regex_classes_in_json_strings_exclude_quotes_and_backslashes() -> None:
    # Everything but the newline, minus control characters, the quote (0x22) and the backslash (0x5C).
    assert regex_to_gbnf(".", json_string=True) == "[ -!#-\\x5B\\x5D-\\U0010FFFF]"
    assert regex_to_gbnf("[^a]", json_string=True) == "[ -!#-\\x5B\\x5D-`b-\\U0010FFFF]"
    # A literal quote is written escaped, as it appears inside JSON text.
    assert regex_to_gbnf('a"b', json_string=True) == '"a" "\\x5C\\x22" "b"'


CALL = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": [2, "}"]}}\n</tool_call>'


def _replay(parser: ToolCallParser, text: str, step: int) -> list[object]:
    events: list[object] = []
    for i in range(0, len(text), step):
        events += parser.feed(text[i : i + step])
    return events + parser.finish()


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_parser_gives_the_same_call_however_the_text_is_split(step: int) -> None:
    parser = ToolCallParser(frozenset({"add"}))
    events = _replay(parser, "Sure. " + CALL, step)
    assert "".join(e.text for e in events if isinstance(e, TextOut)) == "Sure. "
    starts = [e for e in events if isinstance(e, CallStart)]
    assert [s.name for s in starts] == ["add"]
    pieces = "".join(e.text for e in events if isinstance(e, CallArguments))
    assert pieces == '{"a": 1, "b": [2, "}"]}' == parser.calls[0].arguments
    assert parser.calls[0].complete
    # The name is announced before any argument text.
    assert isinstance(next(e for e in events if not isinstance(e, TextOut)), CallStart)


def test_parser_leaves_unknown_functions_and_plain_text_alone() -> None:
    parser = ToolCallParser(frozenset({"add"}))
    text = '<tool_call>\n{"name": "rm", "arguments": {}}\n</tool_call> and <tool_ more'
    events = _replay(parser, text, 4)
    assert not parser.calls
    assert "".join(e.text for e in events if isinstance(e, TextOut)) == text


def test_parser_accepts_other_key_orders_once_complete() -> None:
    parser = ToolCallParser(frozenset({"add"}))
    _replay(parser, '<tool_call>{"arguments": {"a": 1}, "name": "add"}</tool_call>', 5)
    assert [(c.name, c.arguments) for c in parser.calls] == [("add", '{"a": 1}')]
