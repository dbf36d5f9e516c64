"""The llama.cpp engine: owns the model and context, and serves sequences through the scheduler."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial

import llama_cpp as L

from microserve.engines.base import EngineStats, FinishReason, GenerationDelta, GenerationRequest, ModelInfo
from microserve.engines.llamacpp.sampling import build_sampler
from microserve.engines.llamacpp.scheduler import Admitted, Failure, Scheduler, Sequence, Token
from microserve.engines.llamacpp.sequence import TextAssembler
from microserve.errors import EngineFailure, InvalidRequest, NotReady

log = logging.getLogger(__name__)

# llama-cpp-python prints every llama.cpp log line to stderr unless its logger says otherwise.
logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True, slots=True)
class LlamaCppConfig:
    """How to open the model."""

    path: str
    model_id: str
    parallel: int = 8
    context_length: int | None = None
    threads: int | None = None
    batch_size: int = 256
    prefill_chunk: int | None = None
    prefix_cache: bool = True


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


class LlamaCppEngine:
    """A :class:`~microserve.engines.base.TextEngine` on llama.cpp's C API with continuous batching."""

    def __init__(self, config: LlamaCppConfig) -> None:
        self.config = config
        self._model: L.llama_model_p | None = None
        self._ctx: L.llama_context_p | None = None
        self._vocab: L.llama_vocab_p | None = None
        self._scheduler: Scheduler | None = None
        self._info: ModelInfo | None = None
        self._pieces: dict[int, bytes] = {}
        self._eog: frozenset[int] = frozenset()
        self._ready = False

    # -- lifecycle --------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once the model is loaded and a warm-up decode succeeded."""
        return self._ready

    @property
    def info(self) -> ModelInfo:
        """The loaded model's facts; only valid after :meth:`start`."""
        if self._info is None:
            raise NotReady("the model is still loading")
        return self._info

    async def start(self) -> None:
        """Load the model and warm up off the event loop, then start the engine thread."""
        await asyncio.to_thread(self._load)
        assert self._scheduler is not None
        self._scheduler.start()
        self._ready = True
        log.info("model %s ready", self.config.model_id)

    async def shutdown(self) -> None:
        """Stop the engine thread and free llama.cpp's memory."""
        self._ready = False
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.stop)
            self._scheduler = None
        if self._ctx is not None:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            L.llama_model_free(self._model)
            self._model = None

    def _load(self) -> None:
        cfg = self.config
        L.llama_backend_init()
        mparams = L.llama_model_default_params()
        model = L.llama_model_load_from_file(cfg.path.encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {cfg.path}")
        self._model = model
        vocab = L.llama_model_get_vocab(model)
        self._vocab = vocab
        n_vocab = L.llama_vocab_n_tokens(vocab)
        trained = L.llama_model_n_ctx_train(model)
        n_ctx_seq = cfg.context_length or min(trained, DEFAULT_CONTEXT)
        threads = cfg.threads or usable_cores()

        cparams = L.llama_context_default_params()
        cparams.n_ctx = n_ctx_seq * cfg.parallel
        cparams.n_seq_max = cfg.parallel
        cparams.n_batch = cfg.batch_size
        cparams.n_ubatch = cfg.batch_size
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        # One KV stream per slot: each sequence attends over its own cells only, as llama-server does.
        cparams.kv_unified = False
        cparams.no_perf = True
        ctx = L.llama_init_from_model(model, cparams)
        if not ctx:
            raise RuntimeError(f"llama.cpp could not create a context for {cfg.path}")
        self._ctx = ctx

        self._eog = frozenset(t for t in range(n_vocab) if L.llama_vocab_is_eog(vocab, t))
        template = L.llama_model_chat_template(model, None)
        self._info = ModelInfo(
            id=cfg.model_id,
            context_length=n_ctx_seq,
            vocab_size=n_vocab,
            chat_template=template.decode("utf-8", errors="replace") if template else None,
            bos_token=self._special_text(L.llama_vocab_bos(vocab)),
            eos_token=self._special_text(L.llama_vocab_eos(vocab)),
            add_bos=bool(L.llama_vocab_get_add_bos(vocab)),
            architecture=self._meta("general.architecture"),
            path=cfg.path,
        )
        self._warm_up(ctx)
        self._scheduler = Scheduler(
            ctx,
            n_slots=cfg.parallel,
            n_ctx_seq=n_ctx_seq,
            batch_size=cfg.batch_size,
            prefill_chunk=cfg.prefill_chunk,
            prefix_cache=cfg.prefix_cache,
            sampler_factory=partial(build_sampler, n_vocab=n_vocab, eog_ids=self._eog, penalty_window=n_ctx_seq),
            eog_ids=self._eog,
        )
        log.info(
            "loaded %s (%s): %d slots x %d tokens, %d threads, batch %d",
            cfg.model_id,
            self._info.architecture,
            cfg.parallel,
            n_ctx_seq,
            threads,
            cfg.batch_size,
        )

    def _warm_up(self, ctx: L.llama_context_p) -> None:
        # A real decode proves the model runs before readiness turns green, and pays one-time allocation costs.
        tokens = self.tokenize("Hello", add_special=True)
        # The batch only points at the ids: keep the array alive until the decode has read it.
        ids = (L.llama_token * len(tokens))(*tokens)
        batch = L.llama_batch_get_one(ids, len(tokens))
        rc = L.llama_decode(ctx, batch)
        L.llama_memory_seq_rm(L.llama_get_memory(ctx), -1, -1, -1)
        if rc != 0:
            raise RuntimeError(f"warm-up decode failed with status {rc}")

    def _meta(self, key: str) -> str:
        buf = ctypes.create_string_buffer(256)
        n = L.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", errors="replace") if n >= 0 else ""

    def _special_text(self, token: int) -> str:
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(128)
        n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    # -- tokenizer --------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS where the model wants it."""
        if self._vocab is None:
            raise NotReady("the model is still loading")
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (L.llama_token * capacity)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
        if n < 0:
            capacity = -n
            buf = (L.llama_token * capacity)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, parse_special)
        return list(buf[:n])

    def token_ids(self, text: str) -> list[int]:
        """The id of a special token given as text, or [] if it is not a single token of this vocabulary."""
        ids = self.tokenize(text, add_special=False, parse_special=True)
        return ids if len(ids) == 1 else []

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for in generated text (special tokens render as nothing)."""
        cached = self._pieces.get(token)
        if cached is None:
            buf = ctypes.create_string_buffer(64)
            n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            if n < 0:
                buf = ctypes.create_string_buffer(-n)
                n = L.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, False)
            cached = buf.raw[:n]
            self._pieces[token] = cached
        return cached

    def detokenize(self, tokens: list[int]) -> str:
        """Text of a token list, as generated text would show it."""
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    # -- generation -------------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Running and waiting sequences, KV use and prefix-cache hits."""
        if self._scheduler is None:
            return EngineStats(0, 0, self.config.parallel, 0, 0, 0, 0)
        return self._scheduler.stats()

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream a sequence's deltas; leaving the iterator early cancels the sequence at the next step."""
        scheduler = self._scheduler
        if not self._ready or scheduler is None:
            raise NotReady("the model is still loading")
        prompt = request.prompt_tokens
        limit = self.info.context_length
        if not prompt:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if len(prompt) + request.params.max_tokens > limit:
            raise InvalidRequest(
                f"This model's maximum context length is {limit} tokens, but {len(prompt)} prompt tokens "
                f"plus {request.params.max_tokens} completion tokens were requested.",
                param="max_tokens",
                code="context_length_exceeded",
            )
        queue: asyncio.Queue[Token | Failure | Admitted] = asyncio.Queue()
        seq = Sequence(
            prompt=prompt,
            params=request.params,
            stop_ids=frozenset(request.stop_token_ids),
            loop=asyncio.get_running_loop(),
            out=queue,
        )
        text = TextAssembler(self.piece, request.stop)
        completion = 0
        cached = 0
        done = False
        engine_done = False  # the engine has released the sequence itself
        scheduler.submit(seq)
        try:
            while not done:
                event = await queue.get()
                parts: list[str] = []
                ids: list[int] = []
                finish: FinishReason | None = None
                # Coalesce whatever else already arrived, so a slow reader gets fewer, larger deltas.
                while True:
                    if isinstance(event, Failure):
                        engine_done = True
                        raise EngineFailure(f"generation failed: {event.message}")
                    if isinstance(event, Admitted):
                        cached = event.cached_tokens
                    else:
                        completion += 1
                        ids.append(event.id)
                        emitted, stopped = text.push(event.id)
                        parts.append(emitted)
                        engine_done = event.finish is not None
                        if stopped:
                            finish = "stop"
                        elif event.finish is not None:
                            finish = "stop" if event.finish == "stop" else "length"
                            parts.append(text.finish())
                        if finish is not None:
                            break
                    if queue.empty():
                        break
                    event = queue.get_nowait()
                done = finish is not None
                if ids:
                    yield GenerationDelta(
                        text="".join(parts),
                        token_ids=ids,
                        finish_reason=finish,
                        prompt_tokens=len(prompt),
                        completion_tokens=completion,
                        cached_tokens=cached,
                    )
        finally:
            # Covers a client that went away and a stop string that ended the text before the engine did.
            if not engine_done:
                scheduler.cancel(seq)
