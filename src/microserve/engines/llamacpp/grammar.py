"""Compiled GBNF grammars, cached by hash, cloned into each constrained sequence's sampler chain.

A grammar is parsed once (``llama_sampler_init_grammar``) into a prototype sampler that is never used to sample;
each sequence gets a ``llama_sampler_clone`` of it, which is cheap. Checking a grammar is parsing it, so the
services check it in a worker thread while preparing the request, and a grammar llama.cpp rejects becomes a 400
carrying llama.cpp's own parse message.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import threading
from collections import OrderedDict

import llama_cpp as L

from microserve.engines.llamacpp.log import captured
from microserve.errors import InvalidRequest

log = logging.getLogger(__name__)


def _grammar_key(grammar: str, triggers: tuple[str, ...]) -> str:
    return hashlib.sha256("\0".join((grammar, *triggers)).encode()).hexdigest()


class GrammarCache:
    """Prototype grammar samplers by hash of their text; thread-safe, least recently used evicted."""

    def __init__(self, vocab: L.llama_vocab_p, capacity: int = 64) -> None:
        self._vocab = vocab
        self._capacity = capacity
        self._prototypes: OrderedDict[str, L.llama_sampler_p] = OrderedDict()
        self._lock = threading.Lock()

    def _parse(self, grammar: str, triggers: tuple[str, ...]) -> L.llama_sampler_p:
        with captured() as messages:
            if triggers:
                patterns = (ctypes.c_char_p * len(triggers))(*(t.encode("utf-8") for t in triggers))
                sampler = L.llama_sampler_init_grammar_lazy_patterns(
                    self._vocab, grammar.encode("utf-8"), b"root", patterns, len(triggers), None, 0
                )
            else:
                sampler = L.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            detail = "; ".join(messages) or "llama.cpp could not parse it"
            if detail == "failed to parse grammar":
                detail += " (a syntax error or an undefined rule)"
            raise InvalidRequest(f"invalid grammar: {detail}", param="guided_grammar", code="invalid_grammar")
        return sampler

    def _prototype(self, grammar: str, triggers: tuple[str, ...]) -> L.llama_sampler_p:
        key = _grammar_key(grammar, triggers)
        with self._lock:
            sampler = self._prototypes.get(key)
            if sampler is not None:
                self._prototypes.move_to_end(key)
                return sampler
        # Parsing can take a while for big grammars: outside the lock, so the engine thread never waits on it.
        parsed = self._parse(grammar, triggers)
        with self._lock:
            sampler = self._prototypes.get(key)
            if sampler is not None:  # parsed concurrently by another request
                L.llama_sampler_free(parsed)
                return sampler
            self._prototypes[key] = parsed
            while len(self._prototypes) > self._capacity:
                _, old = self._prototypes.popitem(last=False)
                L.llama_sampler_free(old)
            return parsed

    def check(self, grammar: str, triggers: tuple[str, ...] = ()) -> None:
        """Parse and cache ``grammar``; raises InvalidRequest if llama.cpp rejects it. Blocking: use a thread."""
        if not grammar.strip():
            raise InvalidRequest("the grammar is empty", param="guided_grammar")
        self._prototype(grammar, triggers)

    def instance(self, grammar: str, triggers: tuple[str, ...] = ()) -> L.llama_sampler_p:
        """A fresh grammar sampler for one sequence (a clone of the cached prototype)."""
        key = _grammar_key(grammar, triggers)
        while True:
            self._prototype(grammar, triggers)
            with self._lock:
                # Clone under the lock so that eviction cannot free the prototype mid-clone.
                current = self._prototypes.get(key)
                if current is not None:
                    return L.llama_sampler_clone(current)

    def close(self) -> None:
        """Free every cached prototype."""
        with self._lock:
            for sampler in self._prototypes.values():
                L.llama_sampler_free(sampler)
            self._prototypes.clear()
