"""The llama.cpp engine: owns the model and context, and serves sequences through the scheduler."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial

import llama_cpp as L

from microserve.engines.base import (
    EngineStats,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    ModelInfo,
    TokenLogprob,
)
from microserve.engines.llamacpp.batch_sampling import RowSampler
from microserve.engines.llamacpp.grammar import GrammarCache, install_log_capture
from microserve.engines.llamacpp.sampling import SequenceSampler, build_sampler
from microserve.engines.llamacpp.scheduler import Admitted, Event, Failure, Scheduler, Sequence, Token
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
        self._grammars: GrammarCache | None = None
        self._n_vocab = 0
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
        """Load the model off the event loop, then start the engine thread, which warms up before serving."""
        await asyncio.to_thread(self._load)
        assert self._scheduler is not None and self._ctx is not None
        await asyncio.wrap_future(self._scheduler.start(partial(self._warm_up, self._ctx)))
        self._ready = True
        log.info("model %s ready", self.config.model_id)

    async def shutdown(self) -> None:
        """Stop the engine thread and free llama.cpp's memory."""
        self._ready = False
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.stop)
            self._scheduler = None
        if self._grammars is not None:
            self._grammars.close()
            self._grammars = None
        if self._ctx is not None:
            L.llama_free(self._ctx)
            self._ctx = None
        if self._model is not None:
            L.llama_model_free(self._model)
            self._model = None

    def _load(self) -> None:
        cfg = self.config
        L.llama_backend_init()
        install_log_capture()
        mparams = L.llama_model_default_params()
        model = L.llama_model_load_from_file(cfg.path.encode(), mparams)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {cfg.path}")
        self._model = model
        vocab = L.llama_model_get_vocab(model)
        self._vocab = vocab
        n_vocab = L.llama_vocab_n_tokens(vocab)
        self._n_vocab = n_vocab
        self._grammars = GrammarCache(vocab)
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
        self._scheduler = Scheduler(
            ctx,
            n_slots=cfg.parallel,
            n_ctx_seq=n_ctx_seq,
            batch_size=cfg.batch_size,
            prefill_chunk=cfg.prefill_chunk,
            prefix_cache=cfg.prefix_cache,
            sampler_factory=partial(self._sampler_for, penalty_window=n_ctx_seq),
            eog_ids=self._eog,
            n_vocab=n_vocab,
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

    def _sampler_for(self, seq: Sequence, *, penalty_window: int) -> RowSampler | SequenceSampler:
        # Runs on the engine thread at admission; the grammar was parsed and cached when the request was checked.
        assert self._grammars is not None
        grammar = self._grammars.instance(seq.grammar, seq.grammar_triggers) if seq.grammar else None
        return build_sampler(
            seq.params,
            n_vocab=self._n_vocab,
            eog_ids=self._eog,
            penalty_window=penalty_window,
            grammar=grammar,
            top_logprobs=seq.top_logprobs,
            choice=seq.choice,
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

    async def check_grammar(self, grammar: str, triggers: tuple[str, ...] = ()) -> None:
        """Parse ``grammar`` in a worker thread and cache it; a grammar llama.cpp rejects is a 400."""
        if self._grammars is None:
            raise NotReady("the model is still loading")
        await asyncio.to_thread(self._grammars.check, grammar, triggers)

    def _token_logprob(self, token: Token) -> TokenLogprob:
        return TokenLogprob(
            token_id=token.id,
            token=self.piece(token.id),
            logprob=token.logprob if token.logprob is not None else 0.0,
            top=tuple((self.piece(t), lp) for t, lp in token.top),
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream the deltas of all ``n`` choices; leaving the iterator early cancels the sequences at the next step.

        Choice 0 prefills the prompt; the others wait for it and copy its KV cells (see the scheduler's fork).
        """
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
        n = max(1, request.n)
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        seqs: list[Sequence] = []
        for index in range(n):
            seqs.append(
                Sequence(
                    prompt=prompt,
                    params=request.params,
                    stop_ids=frozenset(request.stop_token_ids),
                    loop=loop,
                    out=_Tagged(queue, index),
                    grammar=request.grammar,
                    grammar_triggers=request.grammar_triggers,
                    top_logprobs=request.logprobs,
                    fork_from=seqs[0] if index else None,
                    choice=index,
                )
            )
        texts = [TextAssembler(self.piece, request.stop) for _ in range(n)]
        completion = [0] * n
        cached = [0] * n
        done = [False] * n
        engine_done = [False] * n  # the engine has released the sequence itself
        # Logprobs of tokens whose text is held back as a possible stop string: listed once the text is emitted,
        # dropped if it was a stop string, so that the listed tokens always spell the content.
        held: list[list[TokenLogprob]] = [[] for _ in range(n)]
        for seq in seqs:
            scheduler.submit(seq)
        try:
            while not all(done):
                index, event = await queue.get()
                # Coalesce whatever else already arrived, so a slow reader gets fewer, larger deltas.
                pending: dict[int, _Pending] = {}
                while True:
                    if isinstance(event, Failure):
                        engine_done[index] = True
                        raise EngineFailure(f"generation failed: {event.message}")
                    if isinstance(event, Admitted):
                        cached[index] = event.cached_tokens
                    elif not done[index]:
                        part = pending.setdefault(index, _Pending())
                        engine_done[index] = event.finish is not None
                        emitted = ""
                        stopped = False
                        if event.id >= 0:
                            completion[index] += 1
                            part.ids.append(event.id)
                            emitted, stopped = texts[index].push(event.id)
                            if request.logprobs is not None and not (
                                event.finish == "stop" and not self.piece(event.id)
                            ):
                                held[index].append(self._token_logprob(event))
                                if stopped:
                                    # Keep the tokens whose text, at least in part, precedes the stop string.
                                    start = 0
                                    for item in held[index]:
                                        if start < len(emitted):
                                            part.logprobs.append(item)
                                        start += len(item.token.decode("utf-8", errors="replace"))
                                    held[index].clear()
                                elif not texts[index].holding or event.finish is not None:
                                    part.logprobs.extend(held[index])
                                    held[index].clear()
                        part.parts.append(emitted)
                        if stopped:
                            part.finish = "stop"
                        elif event.finish is not None:
                            part.finish = "stop" if event.finish == "stop" else "length"
                            part.parts.append(texts[index].finish())
                        if part.finish is not None:
                            done[index] = True
                            if not engine_done[index]:
                                scheduler.cancel(seqs[index])
                                engine_done[index] = True
                    if queue.empty():
                        break
                    index, event = queue.get_nowait()
                for i, part in sorted(pending.items()):
                    if not part.ids and part.finish is None:
                        continue
                    yield GenerationDelta(
                        text="".join(part.parts),
                        token_ids=part.ids,
                        finish_reason=part.finish,
                        prompt_tokens=len(prompt),
                        completion_tokens=completion[i],
                        cached_tokens=cached[i],
                        index=i,
                        logprobs=part.logprobs if request.logprobs is not None else None,
                    )
        finally:
            # Covers a client that went away and a stop string that ended the text before the engine did.
            for seq, released in zip(seqs, engine_done, strict=True):
                if not released:
                    scheduler.cancel(seq)


class _Tagged:
    """The event sink of one of a request's choices: tags each event with the choice's index."""

    __slots__ = ("_index", "_queue")

    def __init__(self, queue: asyncio.Queue[tuple[int, Event]], index: int) -> None:
        self._queue = queue
        self._index = index

    def put_nowait(self, item: Event, /) -> None:
        self._queue.put_nowait((self._index, item))


@dataclass(slots=True)
class _Pending:
    """What one choice produced in the events coalesced into one delta."""

    parts: list[str] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish: FinishReason | None = None
