"""The llama.cpp engine: owns the model and context, and serves sequences through the scheduler."""

from __future__ import annotations

import asyncio
import collections.abc
import ctypes
import logging
import re
from collections.abc import AsyncIterator
from collections.abc import Sequence as Ids
from dataclasses import dataclass, field
from functools import partial

import llama_cpp as L

from microserve.engines.base import (
    EngineStats,
    FinishReason,
    GenerationDelta,
    GenerationRequest,
    Guide,
    ModelInfo,
    PromptSegment,
    TokenLogprob,
    check_prompt,
)
from microserve.engines.llamacpp.batch_sampling import RowSampler
from microserve.engines.llamacpp.grammar import GrammarCache
from microserve.engines.llamacpp.log import install_log_capture
from microserve.engines.llamacpp.lora import AdapterUnavailable, LoraSet
from microserve.engines.llamacpp.prompt_tokens import ControlTexts, encode_segments
from microserve.engines.llamacpp.sampling import SequenceSampler, build_sampler
from microserve.engines.llamacpp.scheduler import (
    Admitted,
    Event,
    Failure,
    PromptScores,
    Scheduler,
    Sequence,
    Token,
)
from microserve.engines.llamacpp.sequence import TextAssembler
from microserve.engines.llamacpp.structured import GrammarBuilder
from microserve.engines.llamacpp.threads import ThreadPolicy
from microserve.errors import EngineFailure, InvalidRequest, NotReady
from microserve.hardware import usable_cores

log = logging.getLogger(__name__)

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True, slots=True)
class LlamaCppConfig:
    """How to open the model."""

    path: str
    model_id: str
    parallel: int = 8
    context_length: int | None = None
    threads: int | None = None
    # Follow the CPUs other processes leave free, up to ``threads`` (threads.py); else always ``threads``.
    adaptive_threads: bool = False
    batch_size: int = 256
    prefill_chunk: int | None = None
    # A step carrying a lone new prompt's tokens takes at most this many decode-only steps (prefill_chunk unset).
    prefill_step_factor: float = 2.0
    prefix_cache: bool = True
    # LoRA adapters kept loaded at once; more may be registered, loaded on demand.
    max_loras: int = 16


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
        self._loras: LoraSet | None = None
        self._builder = GrammarBuilder()
        self._n_vocab = 0
        self._add_bos = False
        self._controls = ControlTexts({})
        self._threads: ThreadPolicy | None = None
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
        threads = self.config.threads or usable_cores()
        if self.config.adaptive_threads and threads > 1:
            self._threads = ThreadPolicy(threads, self._set_threads)
            self._threads.start()
        self._ready = True
        log.info("model %s ready", self.config.model_id)

    def _set_threads(self, threads: int) -> None:
        # Called from the policy's thread while the engine thread decodes. llama.cpp reads the count from the
        # context's parameters when each decode starts; the call only stores two aligned 32-bit ints, so a decode
        # under way keeps the count it started with and the next one takes the new count.
        if self._ctx is not None:
            L.llama_set_n_threads(self._ctx, threads, threads)

    async def shutdown(self) -> None:
        """Stop the engine thread and free llama.cpp's memory."""
        self._ready = False
        if self._threads is not None:
            await asyncio.to_thread(self._threads.stop)
            self._threads = None
        if self._scheduler is not None:
            await asyncio.to_thread(self._scheduler.stop)
            self._scheduler = None
        if self._loras is not None:
            self._loras.free_all()  # the engine thread has stopped: nothing decodes with them any more
            self._loras = None
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
        self._add_bos = bool(L.llama_vocab_get_add_bos(vocab))
        self._controls = self._control_texts(vocab, n_vocab)
        template = L.llama_model_chat_template(model, None)
        self._info = ModelInfo(
            id=cfg.model_id,
            context_length=n_ctx_seq,
            vocab_size=n_vocab,
            chat_template=template.decode("utf-8", errors="replace") if template else None,
            bos_token=self._special_text(L.llama_vocab_bos(vocab)),
            eos_token=self._special_text(L.llama_vocab_eos(vocab)),
            architecture=self._meta("general.architecture"),
            path=cfg.path,
        )
        self._loras = LoraSet(model, cfg.max_loras)
        self._scheduler = Scheduler(
            ctx,
            n_vocab=n_vocab,
            n_slots=cfg.parallel,
            n_ctx_seq=n_ctx_seq,
            batch_size=cfg.batch_size,
            prefill_chunk=cfg.prefill_chunk,
            prefill_step_factor=cfg.prefill_step_factor,
            prefix_cache=cfg.prefix_cache,
            sampler_factory=partial(self._sampler_for, penalty_window=n_ctx_seq),
            eog_ids=self._eog,
            loras=self._loras,
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

    @staticmethod
    def _control_texts(vocab: L.llama_vocab_p, n_vocab: int) -> ControlTexts:
        # The tokens llama.cpp matches in text only when special-token parsing is on: control and unknown ones.
        # User-defined tokens (Gemma's runs of newlines) are matched either way, as ordinary text.
        flags = L.LLAMA_TOKEN_ATTR_CONTROL | L.LLAMA_TOKEN_ATTR_UNKNOWN
        texts: dict[str, int] = {}
        for token in range(n_vocab):
            if L.llama_vocab_get_attr(vocab, token) & flags:
                text = L.llama_vocab_get_text(vocab, token)
                if text:
                    texts.setdefault(text.decode("utf-8", errors="replace"), token)
        return ControlTexts(texts)

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

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt with its special-token markup parsed; BOS is added where the model wants one,
        unless the text (a chat template's output) already starts with it."""
        bos = self._info.bos_token if self._info is not None else ""
        add_bos = self._add_bos and not (bos and text.startswith(bos))
        return self.tokenize(text, add_special=add_bos, parse_special=True)

    def encode_segments(self, segments: collections.abc.Sequence[PromptSegment]) -> list[int]:
        """Token ids of a chat prompt: control tokens come from markup segments only (prompt_tokens.py); BOS is
        added as :meth:`encode_prompt` adds it."""
        if self._vocab is None:
            raise NotReady("the model is still loading")
        bos = L.llama_vocab_bos(self._vocab) if self._add_bos else -1
        return encode_segments(
            segments,
            self._controls,
            lambda text, special: self.tokenize(text, add_special=False, parse_special=special),
            bos=bos if bos >= 0 else None,
            bos_text=self._info.bos_token if self._info is not None else "",
        )

    def token_ids(self, text: str) -> list[int]:
        """The id of a special token given as text, or [] if it is not a single token of this vocabulary."""
        ids = self.tokenize(text, add_special=False, parse_special=True)
        return ids if len(ids) == 1 else []

    def detokenize(self, ids: Ids[int]) -> str:
        """The text of ``ids`` as generated text spells it: special tokens render as nothing."""
        if self._vocab is None:
            raise NotReady("the model is still loading")
        return b"".join(self.piece(t) for t in ids).decode("utf-8", errors="replace")

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

    # -- generation -------------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Running and waiting sequences, KV use and prefix-cache hits."""
        if self._scheduler is None:
            return EngineStats(0, 0, self.config.parallel, 0, 0, 0, 0)
        return self._scheduler.stats()

    async def load_adapter(self, name: str, path: str) -> None:
        """Register the GGUF LoRA at ``path`` as ``name`` and load it now on the engine thread, so that a file
        llama.cpp cannot apply to this model is a 400 carrying llama.cpp's reason."""
        scheduler, loras = self._scheduler, self._loras
        if scheduler is None or loras is None:
            raise NotReady("the model is still loading")
        previous = loras.path_of(name)
        loras.register(name, path)
        try:
            await asyncio.wrap_future(scheduler.call(lambda: loras.load(name, scheduler.adapters_in_use())))
        except AdapterUnavailable as exc:
            if previous is not None:
                loras.register(name, previous)  # a failed reload keeps the adapter that was serving
            else:
                loras.forget(name)
            if exc.busy:
                raise NotReady(str(exc)) from None
            raise InvalidRequest(str(exc), param="lora_path", code="invalid_adapter") from None

    async def unload_adapter(self, name: str) -> None:
        """Refuse new sequences on ``name`` and free it once the running ones have finished."""
        scheduler, loras = self._scheduler, self._loras
        if scheduler is None or loras is None:
            return
        loras.forget(name)
        await asyncio.wrap_future(scheduler.call(lambda: loras.release_forgotten(scheduler.adapters_in_use())))

    async def check_guide(self, guide: Guide) -> None:
        """Compile ``guide`` into a GBNF grammar and parse it with llama.cpp, in worker threads, caching both; a
        guide that cannot be enforced is a 400 naming the field that carried it."""
        await self._grammar(guide)

    async def _grammar(self, guide: Guide) -> tuple[str, tuple[str, ...]]:
        if self._grammars is None:
            raise NotReady("the model is still loading")
        triggers = (re.escape(guide.trigger),) if guide.trigger else ()
        try:
            grammar = self._builder.cached(guide)
            if grammar is None:
                grammar = await asyncio.to_thread(self._builder.build, guide)
            await asyncio.to_thread(self._grammars.check, grammar, triggers)
        except InvalidRequest as exc:
            exc.param = guide.param
            raise
        return grammar, triggers

    def _token_logprob(self, token: Token) -> TokenLogprob:
        return TokenLogprob(
            token_id=token.id,
            token=self.piece(token.id),
            logprob=token.logprob if token.logprob is not None else 0.0,
            top=tuple((self.piece(t), lp) for t, lp in token.top),
        )

    def _prompt_logprobs(self, event: PromptScores) -> list[TokenLogprob | None]:
        entries: list[TokenLogprob | None] = [None]
        for token, logprob, top in event.scores:
            entries.append(TokenLogprob(token, self.piece(token), logprob, tuple((self.piece(t), lp) for t, lp in top)))
        return entries

    def check_request(self, request: GenerationRequest) -> None:
        """400s for what this engine cannot serve, raised while the request is prepared (before any stream)."""
        check_prompt(
            request.prompt_tokens,
            vocab_size=self._n_vocab,
            context_length=self.info.context_length,
            max_tokens=request.params.max_tokens,
        )
        if request.adapter is not None and (self._loras is None or not self._loras.registered(request.adapter)):
            raise InvalidRequest(
                f"the adapter `{request.adapter}` is not loaded", param="model", code="model_not_found"
            )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream the deltas of all ``n`` choices; leaving the iterator early cancels the sequences at the next step.

        Choice 0 prefills the prompt; the others wait for it and copy its KV cells (see the scheduler's fork).
        """
        scheduler = self._scheduler
        if not self._ready or scheduler is None:
            raise NotReady("the model is still loading")
        prompt = request.prompt_tokens
        # Checked again: a caller that skipped check_request must not reach the scheduler with it.
        self.check_request(request)
        grammar, triggers = await self._grammar(request.guide) if request.guide is not None else (None, ())
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
                    grammar=grammar,
                    grammar_triggers=triggers,
                    top_logprobs=request.logprobs,
                    adapter=request.adapter,
                    prompt_logprobs=request.prompt_logprobs if index == 0 else None,
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
        scored = False
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
                        if event.busy:
                            raise NotReady(event.message)
                        raise EngineFailure(f"generation failed: {event.message}")
                    if isinstance(event, Admitted):
                        cached[index] = event.cached_tokens
                    elif isinstance(event, PromptScores):
                        pending.setdefault(index, _Pending()).prompt = self._prompt_logprobs(event)
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
                            part.stop_string = texts[index].matched_stop
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
                    if not part.ids and part.finish is None and part.prompt is None:
                        continue
                    if i == 0 and request.prompt_logprobs is not None and not scored:
                        # A one-token prompt has nothing to score: its entry is the first token's null.
                        part.prompt = part.prompt or [None]
                        scored = True
                    yield GenerationDelta(
                        text="".join(part.parts),
                        token_ids=part.ids,
                        finish_reason=part.finish,
                        prompt_tokens=len(prompt),
                        completion_tokens=completion[i],
                        cached_tokens=cached[i],
                        index=i,
                        logprobs=part.logprobs if request.logprobs is not None else None,
                        prompt_logprobs=part.prompt,
                        stop_string=part.stop_string,
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
    prompt: list[TokenLogprob | None] | None = None
    stop_string: str | None = None
