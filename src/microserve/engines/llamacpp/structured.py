"""Structured outputs as GBNF grammars: JSON schemas, regexes, choices and user grammars.

JSON schemas go through llama-cpp-python's maintained ``SchemaConverter`` (a port of llama.cpp's
``json_schema_to_grammar``), extended here with what it lacks: integer bounds and Python-syntax string patterns.
Before conversion every schema is checked against the subset the converter honours; a keyword it would silently
ignore is a 400 that names it, so a constrained answer never quietly violates its schema.

Everything here is pure text. Grammars are memoised by a hash of their guide; callers that may miss the cache run
:meth:`GrammarBuilder.build` in a worker thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any

from llama_cpp.llama_grammar import RESERVED_NAMES, SchemaConverter

from microserve.engines.base import Guide
from microserve.engines.llamacpp.gbnf_analysis import GrammarSyntax, unending_rules
from microserve.engines.llamacpp.regex_grammar import RegexError, gbnf_literal, regex_to_gbnf
from microserve.errors import InvalidRequest

# Annotations: they never constrain the value.
_ANNOTATIONS = {
    "title",
    "description",
    "$schema",
    "$id",
    "$comment",
    "default",
    "examples",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$defs",
    "definitions",
    "strict",
}
_TYPES = {"string", "integer", "number", "boolean", "null", "object", "array"}
_STRING_FORMATS = {"date", "time", "date-time", "uuid", "uuid1", "uuid2", "uuid3", "uuid4", "uuid5"}
_BY_TYPE: dict[str, set[str]] = {
    "string": {"pattern", "minLength", "maxLength", "format"},
    "integer": {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"},
    "number": set(),
    "boolean": set(),
    "null": set(),
    "object": {"properties", "required", "additionalProperties", "unevaluatedProperties"},
    "array": {"items", "prefixItems", "minItems", "maxItems"},
}
_GENERIC = {"type", "enum", "const", "anyOf", "oneOf", "allOf", "$ref"}
MAX_INTEGER_DIGITS = 15
_JSON_CHAR = r'[^"\\\x7F\x00-\x1F] | "\\" (["\\/bfnrt] | "u" [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F] [0-9a-fA-F])'


class SchemaError(InvalidRequest):
    """A schema, pattern or grammar that cannot be enforced; the message names the construct."""


def _check(schema: Any, path: str) -> None:
    """Reject what the converter would ignore or mishandle; ``path`` locates the node in messages."""
    if isinstance(schema, bool):
        if schema is False:
            raise SchemaError(f"the schema at {path} is `false`, which no value satisfies")
        return
    if not isinstance(schema, dict):
        raise SchemaError(f"the schema at {path} must be an object, got {type(schema).__name__}")
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind is not None else []
    for k in kinds:
        if k not in _TYPES:
            raise SchemaError(f"unsupported JSON schema type {k!r} at {path}")
    allowed = _ANNOTATIONS | _GENERIC
    for k in kinds or _TYPES:
        allowed |= _BY_TYPE[k]
    for key in schema:
        if key not in allowed:
            raise SchemaError(f"the JSON schema keyword `{key}` at {path} is not supported for constrained decoding")
    if "format" in schema and schema["format"] not in _STRING_FORMATS:
        raise SchemaError(
            f"the string format {schema['format']!r} at {path} is not supported for constrained decoding "
            f"(supported: {', '.join(sorted(_STRING_FORMATS))})"
        )
    if "pattern" in schema and ({"minLength", "maxLength", "format"} & schema.keys()):
        raise SchemaError(f"`pattern` cannot be combined with length or format constraints at {path}")
    if "unevaluatedProperties" in schema and schema["unevaluatedProperties"] is not False:
        raise SchemaError(f"`unevaluatedProperties` other than false is not supported at {path}")
    ref = schema.get("$ref")
    if ref is not None and not (isinstance(ref, str) and ref.startswith("#/")):
        raise SchemaError(f"only local `$ref`s (#/...) are supported, got {ref!r} at {path}")
    if isinstance(kind, list) and len(schema.keys() - _ANNOTATIONS - {"type"}) > 0:
        raise SchemaError(f"a list of types cannot be combined with other keywords at {path}; use anyOf")
    if "allOf" in schema:
        raise SchemaError(f"the JSON schema keyword `allOf` at {path} is not supported for constrained decoding")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise SchemaError(f"`enum` at {path} must be a non-empty list")
    for key in ("anyOf", "oneOf"):
        if key in schema:
            options = schema[key]
            if not isinstance(options, list) or not options:
                raise SchemaError(f"`{key}` at {path} must be a non-empty list")
            for i, sub in enumerate(options):
                _check(sub, f"{path}/{key}/{i}")
    if isinstance(schema.get("properties"), dict):
        for name, sub in schema["properties"].items():
            _check(sub, f"{path}/properties/{name}")
    additional = schema.get("additionalProperties")
    if isinstance(additional, dict):
        _check(additional, f"{path}/additionalProperties")
    items = schema.get("items")
    if isinstance(items, dict):
        _check(items, f"{path}/items")
    elif isinstance(items, list):
        for i, sub in enumerate(items):
            _check(sub, f"{path}/items/{i}")
    for i, sub in enumerate(schema.get("prefixItems") or []):
        _check(sub, f"{path}/prefixItems/{i}")
    for section in ("$defs", "definitions"):
        for name, sub in (schema.get(section) or {}).items():
            _check(sub, f"{path}/{section}/{name}")
    _check_bounds(schema, path)


def _check_bounds(schema: dict[str, Any], path: str) -> None:
    for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
        value = schema.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise SchemaError(f"`{key}` at {path} must be a number")
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        value = schema.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise SchemaError(f"`{key}` at {path} must be a non-negative integer")
    lo, hi = _int_bounds(schema)
    if lo is not None and hi is not None and lo > hi:
        raise SchemaError(f"the integer bounds at {path} admit no value")
    for lo_key, hi_key in (("minLength", "maxLength"), ("minItems", "maxItems")):
        if lo_key in schema and hi_key in schema and schema[lo_key] > schema[hi_key]:
            raise SchemaError(f"`{lo_key}` exceeds `{hi_key}` at {path}")


def _int_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None]:
    import math

    lo: int | None = None
    hi: int | None = None
    if schema.get("minimum") is not None:
        lo = math.ceil(schema["minimum"])
    if schema.get("exclusiveMinimum") is not None:
        candidate = math.floor(schema["exclusiveMinimum"]) + 1
        lo = candidate if lo is None else max(lo, candidate)
    if schema.get("maximum") is not None:
        hi = math.floor(schema["maximum"])
    if schema.get("exclusiveMaximum") is not None:
        candidate = math.ceil(schema["exclusiveMaximum"]) - 1
        hi = candidate if hi is None else min(hi, candidate)
    return lo, hi


# -- integer ranges -------------------------------------------------------------------------------------------


def _digits_range(lo: str, hi: str) -> list[str]:
    """GBNF alternatives for the same-length decimal strings from ``lo`` to ``hi`` inclusive."""
    n = len(lo)
    if n == 1:
        return [f"[{lo}-{hi}]" if lo != hi else f'"{lo}"']
    if lo[0] == hi[0]:
        return [f'"{lo[0]}" ({" | ".join(_digits_range(lo[1:], hi[1:]))})']
    out: list[str] = []
    first, last = int(lo[0]), int(hi[0])
    if lo[1:] != "0" * (n - 1):
        out.append(f'"{lo[0]}" ({" | ".join(_digits_range(lo[1:], "9" * (n - 1)))})')
        first += 1
    tail: list[str] = []
    if hi[1:] != "9" * (n - 1):
        tail.append(f'"{hi[0]}" ({" | ".join(_digits_range("0" * (n - 1), hi[1:]))})')
        last -= 1
    if first <= last:
        head = f'"{first}"' if first == last else f"[{first}-{last}]"
        out.append(head + " [0-9]" * (n - 1))
    return out + tail


def _natural_range(lo: int, hi: int | None) -> list[str]:
    """Alternatives for the integers ``lo..hi`` (``hi`` None: up to 15 digits), ``lo >= 0``, no leading zeros."""
    top = hi if hi is not None else 10**MAX_INTEGER_DIGITS - 1
    out: list[str] = []
    full: list[int] = []  # widths whose every value is in range, written as one repetition
    for width in range(len(str(lo)), len(str(top)) + 1):
        a = max(lo, 10 ** (width - 1) if width > 1 else 0)
        b = min(top, 10**width - 1)
        if width > 1 and a == 10 ** (width - 1) and b == 10**width - 1:
            full.append(width)
        elif a <= b:
            out.extend(_digits_range(str(a).zfill(width), str(b)))
    if full:
        low, high = full[0] - 1, full[-1] - 1
        out.append(f"[1-9] [0-9]{{{low}}}" if low == high else f"[1-9] [0-9]{{{low},{high}}}")
    return out


def integer_range_gbnf(lo: int | None, hi: int | None) -> str:
    """A GBNF expression for the decimal integers in ``[lo, hi]`` (either end may be open).

    Values are kept within 15 digits, as the converter's plain integers are: a wider bound is narrowed to that,
    which keeps every generated value inside the schema's bounds.
    """
    limit = 10**MAX_INTEGER_DIGITS - 1
    lo = None if lo is None or lo < -limit else lo
    hi = None if hi is None or hi > limit else hi
    if (lo is not None and lo > limit) or (hi is not None and hi < -limit):
        raise SchemaError(f"integer bounds beyond {MAX_INTEGER_DIGITS} digits are not supported")
    alts: list[str] = []
    if lo is None or lo < 0:
        # Negative part: "-" then the magnitudes |hi|..|lo| (at least 1).
        mag_lo = 1 if hi is None or hi >= 0 else -hi
        mag_hi = None if lo is None else -lo
        alts.extend(f'"-" {a}' for a in _natural_range(mag_lo, mag_hi))
    if hi is None or hi >= 0:
        alts.extend(_natural_range(max(lo or 0, 0), hi))
    return "(" + " | ".join(alts) + ")"


class _Converter(SchemaConverter):
    """llama-cpp-python's converter, with integer bounds and Python-syntax patterns."""

    def visit(self, schema: Any, name: str) -> str:
        if isinstance(schema, bool):
            schema = {}
        # Annotations do not constrain; left in, they make the converter take {"description": ...} for unknown.
        schema = {k: v for k, v in schema.items() if k not in _ANNOTATIONS}
        if schema.get("type") == "integer" and _int_bounds(schema) != (None, None):
            lo, hi = _int_bounds(schema)
            rule_name = name + "-" if name in RESERVED_NAMES else name or "root"
            return str(self._add_rule(rule_name, integer_range_gbnf(lo, hi) + " space"))
        return str(super().visit(schema, name))

    def _add_primitive(self, name: str, rule: Any) -> str:
        if name == "char":
            # Raw control characters are not valid inside JSON strings; the upstream rule allows them.
            return str(self._add_rule("char", _JSON_CHAR))
        return str(super()._add_primitive(name, rule))

    def _visit_pattern(self, pattern: str, name: str) -> str:
        try:
            body = regex_to_gbnf(pattern, json_string=True)
        except RegexError as exc:
            raise SchemaError(f"the pattern {pattern!r}: {exc}") from exc
        return str(self._add_rule(name, f'"\\"" {body} "\\"" space'))


def json_schema_gbnf(schema: Any) -> str:
    """GBNF text whose sentences are JSON documents valid against ``schema``."""
    _check(schema, "#")
    converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        resolved = converter.resolve_refs(schema if isinstance(schema, dict) else {}, "")
        converter.visit(resolved, "")
    except SchemaError:
        raise
    except (AssertionError, KeyError, ValueError, TypeError, RecursionError) as exc:
        raise SchemaError(f"the JSON schema cannot be converted to a grammar: {exc}") from exc
    return str(converter.format_grammar())


def tool_calls_gbnf(functions: list[tuple[str, Any]], *, parallel: bool, open_text: str, close_text: str) -> str:
    """GBNF text for one (or, with ``parallel``, several) ``open_text {"name", "arguments"} close_text`` blocks.

    Each call names one of ``functions`` (name, parameters schema) and its arguments satisfy that schema.
    """
    converter = _Converter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    alternatives = []
    for i, (name, parameters) in enumerate(functions):
        params = parameters if parameters else {"type": "object", "properties": {}}
        _check(params, f"tools[{i}].function.parameters")
        if "$ref" in params and "anyOf" not in params and len(params) > 1:
            # llama.cpp's resolver does not look inside a node that holds a `$ref`, so the refs inside a `$defs`
            # beside it (the usual layout of a recursive schema) would keep their local form, which names nothing
            # under this tool's prefix. The same reference as a one-way union is visited whole.
            params = {**{k: v for k, v in params.items() if k != "$ref"}, "anyOf": [{"$ref": params["$ref"]}]}
        try:
            params = converter.resolve_refs(params, f"tool{i}")
        except (AssertionError, KeyError, ValueError, TypeError) as exc:
            raise SchemaError(f"the parameters of tool {name!r} cannot be converted to a grammar: {exc}") from exc
        alternatives.append(
            {
                "type": "object",
                "properties": {"name": {"const": name}, "arguments": params},
                "required": ["name", "arguments"],
            }
        )
    try:
        call = converter.visit({"anyOf": alternatives} if len(alternatives) > 1 else alternatives[0], "call")
    except SchemaError:
        raise
    except (AssertionError, KeyError, ValueError, TypeError, RecursionError) as exc:
        raise SchemaError(f"the tool parameters cannot be converted to a grammar: {exc}") from exc
    block = f"{gbnf_literal(open_text)} {call} {gbnf_literal(close_text)}"
    root = f'root ::= {block} ("\\n" {block})*' if parallel else f"root ::= {block}"
    return root + "\n" + str(converter.format_grammar())


def regex_gbnf(pattern: str) -> str:
    """GBNF text whose sentences fully match ``pattern``."""
    try:
        return f"root ::= {regex_to_gbnf(pattern)}"
    except RegexError as exc:
        raise SchemaError(str(exc), param="guided_regex") from exc


def choice_gbnf(choices: list[str]) -> str:
    """GBNF text whose sentences are exactly the given strings."""
    if not choices:
        raise SchemaError("`guided_choice` must list at least one choice", param="guided_choice")
    return "root ::= " + " | ".join(gbnf_literal(c) for c in choices)


# -- the cache ------------------------------------------------------------------------------------------------


class GrammarBuilder:
    """Builds grammars from guides, memoising the most recent ones (an LRU keyed by specification hash)."""

    def __init__(self, capacity: int = 256) -> None:
        self._capacity = capacity
        self._cache: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, guide: Guide) -> str | None:
        """The grammar if it was built before; cheap enough for the event loop."""
        try:
            key = guide.key()
        except RecursionError as exc:
            raise SchemaError("the schema is nested too deeply", param=guide.param) from exc
        with self._lock:
            grammar = self._cache.get(key)
            if grammar is not None:
                self._cache.move_to_end(key)
            return grammar

    def build(self, guide: Guide) -> str:
        """The grammar for ``guide``; may take milliseconds for big schemas, so call it off the event loop."""
        cached = self.cached(guide)
        if cached is not None:
            return cached
        try:
            grammar = _build(guide)
            _check_finite(grammar, guide)
        except SchemaError as exc:
            if exc.param is None:
                exc.param = guide.param
            raise
        except RecursionError as exc:
            raise SchemaError("the schema or pattern is nested too deeply", param=guide.param) from exc
        with self._lock:
            self._cache[guide.key()] = grammar
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
        return grammar


_NEVER_ENDS = {
    "grammar": "the grammar can never be completed: rule `{rule}` has no finite expansion (each way through it "
    "recurses without end)",
    "json": "the JSON schema admits no finite value: a required property refers back to its own schema without end",
    "tool_calls": "the tool parameters admit no finite value: a required property refers back to its own schema "
    "without end",
}


def _check_finite(grammar: str, guide: Guide) -> None:
    """Refuse a grammar without any finite sentence: it would hold a slot, token by token, until max_tokens."""
    try:
        stuck = unending_rules(grammar)
    except GrammarSyntax:
        return  # llama.cpp's parser reports what is wrong with it
    if stuck:
        template = _NEVER_ENDS.get(guide.kind, _NEVER_ENDS["grammar"])
        raise SchemaError(template.format(rule=stuck[0]), param=guide.param, code="grammar_never_ends")


def _build(guide: Guide) -> str:
    if guide.kind == "json":
        return json_schema_gbnf(guide.spec)
    if guide.kind == "regex":
        return regex_gbnf(guide.spec)
    if guide.kind == "choice":
        return choice_gbnf(guide.spec)
    if guide.kind == "grammar":
        if not isinstance(guide.spec, str) or not guide.spec.strip():
            raise SchemaError("`guided_grammar` must be a non-empty GBNF grammar")
        return guide.spec
    if guide.kind == "tool_calls":
        spec = guide.spec
        return tool_calls_gbnf(
            [(n, p) for n, p in spec["functions"]],
            parallel=spec["parallel"],
            open_text=spec["open"],
            close_text=spec["close"],
        )
    raise SchemaError(f"unknown guide kind {guide.kind}")
