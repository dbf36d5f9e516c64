"""Regular expressions compiled to GBNF rules, for guided_regex and JSON-schema string patterns.

The pattern is parsed by Python's own regex parser (so the syntax is exactly Python's ``re``) and each node is
written as a GBNF expression. The grammar generates only strings the pattern fully matches. Character classes
(``\\d``, ``\\w``, ``\\s``) are ASCII, as with ``re.ASCII``. Lookarounds, backreferences, word boundaries,
inline flags and anchors anywhere but the ends have no GBNF equivalent and are rejected by name.
"""

from __future__ import annotations

import importlib
import re
from typing import Any

# The stdlib parser's module moved in 3.11 (``sre_parse`` is its deprecated alias).
_parser: Any = importlib.import_module("re._parser")
_c: Any = importlib.import_module("re._constants")

MAX_REPEAT_BOUND = 1000
_UNICODE_MAX = 0x10FFFF
_CATEGORIES: dict[Any, tuple[list[tuple[int, int]], bool]] = {
    _c.CATEGORY_DIGIT: ([(0x30, 0x39)], False),
    _c.CATEGORY_NOT_DIGIT: ([(0x30, 0x39)], True),
    _c.CATEGORY_WORD: ([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)], False),
    _c.CATEGORY_NOT_WORD: ([(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)], True),
    _c.CATEGORY_SPACE: ([(0x09, 0x0D), (0x20, 0x20)], False),
    _c.CATEGORY_NOT_SPACE: ([(0x09, 0x0D), (0x20, 0x20)], True),
}
# Inside a JSON string these code points must be escaped; constrained JSON strings simply never contain them.
_JSON_FORBIDDEN = [(0x00, 0x1F), (0x22, 0x22), (0x5C, 0x5C)]


class RegexError(ValueError):
    """The pattern cannot be compiled to a grammar; the message names the construct."""


def _char(cp: int) -> str:
    """A code point as it may appear inside a GBNF literal or character class."""
    if cp in (0x22, 0x5C, 0x5B, 0x5D, 0x5E, 0x2D) or cp < 0x20 or cp == 0x7F:
        return f"\\x{cp:02X}" if cp < 0x100 else f"\\u{cp:04X}"
    if cp > 0xFFFF:
        return f"\\U{cp:08X}"
    if cp > 0x7E:
        return f"\\u{cp:04X}"
    return chr(cp)


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    return '"' + "".join(_char(ord(c)) for c in text) + '"'


def _normalize(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return merged


def _complement(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out, start = [], 0
    for lo, hi in _normalize(ranges):
        if lo > start:
            out.append((start, lo - 1))
        start = hi + 1
    if start <= _UNICODE_MAX:
        out.append((start, _UNICODE_MAX))
    return out


def _char_class(ranges: list[tuple[int, int]], negate: bool, json_string: bool) -> str:
    allowed = _complement(ranges) if negate else _normalize(ranges)
    if json_string:
        allowed = _normalize(allowed)
        forbidden = _normalize(_JSON_FORBIDDEN)
        allowed = [r for r in _complement(_complement(allowed) + forbidden)]
    if not allowed:
        raise RegexError("the pattern has a character class that matches nothing")
    body = "".join(_char(lo) if lo == hi else f"{_char(lo)}-{_char(hi)}" for lo, hi in allowed)
    return f"[{body}]"


class _Compiler:
    def __init__(self, pattern: str, json_string: bool) -> None:
        self.pattern = pattern
        self.json_string = json_string

    def literal(self, cp: int) -> str:
        if self.json_string and any(lo <= cp <= hi for lo, hi in _JSON_FORBIDDEN):
            # The character itself appears escaped in JSON text.
            escaped = {0x22: '\\"', 0x5C: "\\\\", 0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}.get(cp, f"\\u{cp:04x}")
            return gbnf_literal(escaped)
        return gbnf_literal(chr(cp))

    def sequence(self, items: Any, *, top: bool) -> str:
        nodes = list(items)
        if top:
            while nodes and nodes[0][0] == _c.AT and nodes[0][1] in (_c.AT_BEGINNING, _c.AT_BEGINNING_STRING):
                nodes = nodes[1:]
            while nodes and nodes[-1][0] == _c.AT and nodes[-1][1] in (_c.AT_END, _c.AT_END_STRING):
                nodes = nodes[:-1]
        parts = [self.node(op, av) for op, av in nodes]
        parts = [p for p in parts if p]
        return " ".join(parts) if parts else '""'

    def node(self, op: Any, av: Any) -> str:
        if op == _c.LITERAL:
            return self.literal(av)
        if op == _c.NOT_LITERAL:
            return _char_class([(av, av)], True, self.json_string)
        if op == _c.ANY:
            return _char_class([(0x0A, 0x0A)], True, self.json_string)
        if op == _c.IN:
            return self.charset(av)
        if op == _c.BRANCH:
            return "(" + " | ".join(self.sequence(b, top=False) for b in av[1]) + ")"
        if op == _c.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise RegexError("inline flags such as (?i) are not supported in guided patterns")
            return "(" + self.sequence(sub, top=False) + ")"
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)):
            low, high, sub = av
            if low > MAX_REPEAT_BOUND or (high != _c.MAXREPEAT and high > MAX_REPEAT_BOUND):
                raise RegexError(f"repetition counts above {MAX_REPEAT_BOUND} are not supported")
            inner = "(" + self.sequence(sub, top=False) + ")"
            if high == _c.MAXREPEAT:
                return {0: f"{inner}*", 1: f"{inner}+"}.get(low, f"{inner}{{{low},}}")
            if (low, high) == (0, 1):
                return f"{inner}?"
            return f"{inner}{{{low}}}" if low == high else f"{inner}{{{low},{high}}}"
        if op == getattr(_c, "ATOMIC_GROUP", None):
            return "(" + self.sequence(av, top=False) + ")"
        if op in (_c.ASSERT, _c.ASSERT_NOT):
            raise RegexError("lookahead and lookbehind assertions are not supported in guided patterns")
        if op in (_c.GROUPREF, _c.GROUPREF_EXISTS):
            raise RegexError("backreferences are not supported in guided patterns")
        if op == _c.AT:
            if av in (_c.AT_BOUNDARY, _c.AT_NON_BOUNDARY):
                raise RegexError("word boundaries (\\b, \\B) are not supported in guided patterns")
            raise RegexError("anchors (^, $) are only supported at the start and end of a guided pattern")
        raise RegexError(f"the regex construct {op} is not supported in guided patterns")

    def charset(self, items: Any) -> str:
        ranges: list[tuple[int, int]] = []
        negate = False
        for op, av in items:
            if op == _c.NEGATE:
                negate = True
            elif op == _c.LITERAL:
                ranges.append((av, av))
            elif op == _c.RANGE:
                ranges.append((av[0], av[1]))
            elif op == _c.CATEGORY:
                cat_ranges, cat_negated = _CATEGORIES[av]
                ranges.extend(_complement(cat_ranges) if cat_negated else cat_ranges)
            else:
                raise RegexError(f"the character-class item {op} is not supported in guided patterns")
        return _char_class(ranges, negate, self.json_string)


def regex_to_gbnf(pattern: str, *, json_string: bool = False) -> str:
    """A GBNF expression generating exactly the strings that fully match ``pattern``.

    With ``json_string`` the expression generates the JSON-escaped text of such strings, minus those that would
    need escapes (quotes, backslashes, control characters), for use between the quotes of a JSON string.
    """
    try:
        parsed = _parser.parse(pattern, 0)
    except (re.error, OverflowError, RecursionError) as exc:
        raise RegexError(f"invalid regular expression: {exc}") from exc
    if parsed.state.flags & (re.IGNORECASE | re.MULTILINE | re.VERBOSE):
        raise RegexError("inline flags such as (?i) are not supported in guided patterns")
    top = list(parsed)
    if len(top) == 1 and top[0][0] == _c.BRANCH:
        return "(" + " | ".join(_Compiler(pattern, json_string).sequence(b, top=True) for b in top[0][1][1]) + ")"
    return _Compiler(pattern, json_string).sequence(top, top=True)
