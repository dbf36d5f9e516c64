"""What a GBNF grammar can produce, read from its text before llama.cpp ever runs it.

A grammar whose ``root`` has no finite sentence (``root ::= "a" root``, or a JSON schema whose required property
refers back to the schema itself) can never be completed: every sequence constrained by it runs to ``max_tokens``,
and every token has to be checked against the whole vocabulary, holding a slot and slowing the streams beside it.
Such a grammar is refused up front with a 400 that names the rules that cannot end.

The reader covers llama.cpp's GBNF syntax: rules ``name ::= alternatives``, string literals, character classes,
``.``, token references ``<...>``, groups and the repetitions ``* + ? {m} {m,} {m,n}``; anything it cannot read
is left for llama.cpp's own parser to report.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_NAME = re.compile(r"[a-zA-Z0-9_-]+")


class GrammarSyntax(ValueError):
    """The text is not GBNF this reader understands (llama.cpp's parser has the last word on it)."""


@dataclass(frozen=True, slots=True)
class _Ref:
    name: str


@dataclass(frozen=True, slots=True)
class _Group:
    alternatives: tuple[tuple[_Item, ...], ...]


@dataclass(frozen=True, slots=True)
class _Item:
    atom: _Ref | _Group | None  # None: a terminal (literal, class, any character, token)
    optional: bool  # may occur zero times (*, ?, {0,...})


class _Reader:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def space(self, newlines: bool) -> None:
        text = self.text
        while self.pos < len(text):
            ch = text[self.pos]
            if ch == "#":
                while self.pos < len(text) and text[self.pos] not in "\r\n":
                    self.pos += 1
            elif ch in " \t" or (newlines and ch in "\r\n"):
                self.pos += 1
            else:
                return

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def rules(self) -> dict[str, tuple[tuple[_Item, ...], ...]]:
        rules: dict[str, tuple[tuple[_Item, ...], ...]] = {}
        self.space(True)
        while self.pos < len(self.text):
            match = _NAME.match(self.text, self.pos)
            if match is None:
                raise GrammarSyntax(f"expected a rule name at offset {self.pos}")
            self.pos = match.end()
            self.space(False)
            if not self.text.startswith("::=", self.pos):
                raise GrammarSyntax(f"expected ::= after {match.group()}")
            self.pos += 3
            self.space(False)
            alternatives = self.alternatives(nested=False)
            rules[match.group()] = rules.get(match.group(), ()) + alternatives
            self.space(True)
        return rules

    def alternatives(self, nested: bool) -> tuple[tuple[_Item, ...], ...]:
        out = [self.sequence(nested)]
        while self.peek() == "|":
            self.pos += 1
            self.space(True)
            out.append(self.sequence(nested))
        return tuple(out)

    def sequence(self, nested: bool) -> tuple[_Item, ...]:
        items: list[_Item] = []
        while True:
            ch = self.peek()
            if ch in ("", "|", ")") or (not nested and ch in ("\r", "\n")):
                return tuple(items)
            atom = self.atom()
            optional = self.repetition()
            items.append(_Item(atom, optional))
            self.space(nested)

    def atom(self) -> _Ref | _Group | None:
        text = self.text
        ch = self.peek()
        if ch == '"':
            self.pos = self._skip_quoted('"')
            return None
        if ch == "[":
            self.pos = self._skip_quoted("]", start=self.pos + 1)
            return None
        if ch == ".":
            self.pos += 1
            return None
        if ch == "!" or ch == "<":
            end = text.find(">", self.pos)
            if end < 0:
                raise GrammarSyntax("unterminated token reference")
            self.pos = end + 1
            return None
        if ch == "(":
            self.pos += 1
            self.space(True)
            group = _Group(self.alternatives(nested=True))
            if self.peek() != ")":
                raise GrammarSyntax("unclosed parenthesis")
            self.pos += 1
            return group
        match = _NAME.match(text, self.pos)
        if match is None:
            raise GrammarSyntax(f"unexpected {ch!r} at offset {self.pos}")
        self.pos = match.end()
        return _Ref(match.group())

    def _skip_quoted(self, close: str, start: int | None = None) -> int:
        pos = self.pos + 1 if start is None else start
        text = self.text
        while pos < len(text):
            if text[pos] == "\\":
                pos += 2
            elif text[pos] == close:
                return pos + 1
            else:
                pos += 1
        raise GrammarSyntax("unterminated literal or character class")

    def repetition(self) -> bool:
        ch = self.peek()
        if ch and ch in "*?":
            self.pos += 1
            return True
        if ch == "+":
            self.pos += 1
            return False
        if ch == "{":
            end = self.text.find("}", self.pos)
            if end < 0:
                raise GrammarSyntax("unclosed repetition")
            low = self.text[self.pos + 1 : end].split(",")[0].strip()
            self.pos = end + 1
            return low in ("", "0")
        return False


def parse_rules(text: str) -> dict[str, tuple[tuple[_Item, ...], ...]]:
    """The rules of a GBNF grammar: name -> alternatives, each a sequence of items."""
    return _Reader(text).rules()


def unending_rules(text: str) -> list[str]:
    """The rules that cannot derive any finite text, ``root`` first if it is one of them (empty: all can).

    A rule can end if one of its alternatives can: every item of it is a terminal, optional, or (a group or a
    rule) that can end. Undefined rules are left to llama.cpp, which refuses them.
    """
    rules = parse_rules(text)
    finite: set[str] = set()

    def ends(alternatives: tuple[tuple[_Item, ...], ...]) -> bool:
        return any(all(_item_ends(item) for item in sequence) for sequence in alternatives)

    def _item_ends(item: _Item) -> bool:
        if item.optional or item.atom is None:
            return True
        if isinstance(item.atom, _Group):
            return ends(item.atom.alternatives)
        return item.atom.name in finite or item.atom.name not in rules

    changed = True
    while changed:
        changed = False
        for name, alternatives in rules.items():
            if name not in finite and ends(alternatives):
                finite.add(name)
                changed = True
    stuck = [name for name in rules if name not in finite]
    return sorted(stuck, key=lambda name: (name != "root", name))
