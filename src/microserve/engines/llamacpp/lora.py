"""LoRA adapters on one llama.cpp model: loaded on the engine thread, shared by every sequence that names them.

Adapters are registered by name and path from the event loop; the engine thread loads an adapter
(``llama_adapter_lora_init``, which shares the base model's weights) the first time a sequence needs it, keeps at
most ``max_loaded`` in memory (the least recently used one that no sequence uses is freed first), and frees a
forgotten adapter once the last sequence on it has finished. Every llama.cpp call here runs on the engine thread,
so an adapter is never freed while a decode could read it.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import llama_cpp as L

from microserve.engines.llamacpp.log import captured

log = logging.getLogger(__name__)


class AdapterUnavailable(Exception):
    """An adapter cannot be loaded: unknown, unreadable, not for this model, or (``busy``) every place is in use."""

    def __init__(self, message: str, *, busy: bool = False) -> None:
        super().__init__(message)
        self.busy = busy


@dataclass(slots=True)
class _Loaded:
    handle: L.llama_adapter_lora_p
    path: str
    last_used: int


class LoraSet:
    """The adapters of one model: registered on any thread, loaded and freed on the engine thread."""

    def __init__(self, model: L.llama_model_p, max_loaded: int) -> None:
        self._model = model
        self._max = max(1, max_loaded)
        # Called on the engine thread before an adapter is freed, so that the context stops pointing at it.
        self.before_free: Callable[[], None] = lambda: None
        self._lock = threading.Lock()
        self._paths: dict[str, str] = {}  # registered: what new sequences may use
        self._loaded: dict[str, _Loaded] = {}  # engine thread only
        self._clock = itertools.count(1)

    # -- any thread ---------------------------------------------------------------------------------------------

    def register(self, name: str, path: str) -> None:
        """Let sequences use ``name`` (loaded from ``path`` when first needed)."""
        with self._lock:
            self._paths[name] = path

    def forget(self, name: str) -> None:
        """Refuse new sequences on ``name``; it is freed once no sequence uses it."""
        with self._lock:
            self._paths.pop(name, None)

    def path_of(self, name: str) -> str | None:
        """The file ``name`` is registered with, if it is."""
        with self._lock:
            return self._paths.get(name)

    def registered(self, name: str) -> bool:
        """Whether new sequences may use ``name``."""
        with self._lock:
            return name in self._paths

    @property
    def loaded_count(self) -> int:
        """Adapters in memory (read without locking, for monitoring)."""
        return len(self._loaded)

    # -- the engine thread --------------------------------------------------------------------------------------

    def load(self, name: str, in_use: Iterable[str] = ()) -> L.llama_adapter_lora_p:
        """The adapter's handle, loading it now if needed (freeing the least recently used unused one first when
        ``max_loaded`` are in memory). Raises AdapterUnavailable with llama.cpp's reason."""
        with self._lock:
            path = self._paths.get(name)
        loaded = self._loaded.get(name)
        if loaded is not None and (path is None or path == loaded.path):
            loaded.last_used = next(self._clock)
            return loaded.handle
        if path is None:
            raise AdapterUnavailable(f"the adapter `{name}` is not loaded")
        busy = set(in_use)
        if loaded is not None:  # registered again with another file: reload unless sequences still use it
            if name in busy:
                raise AdapterUnavailable(f"the adapter `{name}` is being replaced; retry shortly", busy=True)
            self._free(name)
        while len(self._loaded) >= self._max:
            idle = [(entry.last_used, n) for n, entry in self._loaded.items() if n not in busy]
            if not idle:
                raise AdapterUnavailable(
                    f"all {self._max} adapter places are in use by running requests (max_loras); retry shortly",
                    busy=True,
                )
            self._free(min(idle)[1])
        with captured() as messages:
            handle = L.llama_adapter_lora_init(self._model, path.encode())
        if not handle:
            detail = "; ".join(messages) or "llama.cpp could not load it"
            raise AdapterUnavailable(f"the adapter `{name}` cannot be applied to this model: {detail}")
        self._loaded[name] = _Loaded(handle, path, next(self._clock))
        log.info("adapter %s loaded from %s", name, path)
        return handle

    def release_forgotten(self, in_use: Iterable[str]) -> list[str]:
        """Free the loaded adapters that were forgotten and that no sequence uses any more; their names."""
        busy = set(in_use)
        with self._lock:
            stale = [n for n, entry in self._loaded.items() if self._paths.get(n) != entry.path and n not in busy]
        for name in stale:
            self._free(name)
        return stale

    def free_all(self) -> None:
        """Free every loaded adapter (the context must no longer use them)."""
        for name in list(self._loaded):
            self._free(name)

    def _free(self, name: str) -> None:
        self.before_free()
        entry = self._loaded.pop(name)
        L.llama_adapter_lora_free(entry.handle)
        log.info("adapter %s unloaded", name)
