"""The vLLM engine: vLLM's v1 ``AsyncLLM`` behind microserve's :class:`~microserve.engines.base.TextEngine`.

vLLM runs its scheduler and model in an engine-core process of its own and streams outputs back over ZeroMQ; this
adapter turns a :class:`GenerationRequest` into vLLM's ``SamplingParams`` (token ids in, no re-tokenizing) and vLLM's
delta outputs into :class:`GenerationDelta` with the llama.cpp engine's semantics: stop strings never reach the
client, logprobs list exactly the tokens whose text was emitted, end-of-turn tokens carry no logprob, ``n`` choices
stream side by side, and closing the iterator aborts the request in vLLM.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

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
from microserve.engines.vllm import guide as guides
from microserve.engines.vllm.stats import SchedulerSnapshot, snapshot_logger
from microserve.engines.vllm.tokens import TokenBytes
from microserve.errors import EngineFailure, InvalidRequest, NotReady

log = logging.getLogger(__name__)

GIB = 1 << 30


@dataclass(frozen=True, slots=True)
class VllmConfig:
    """How to start vLLM on a Hugging Face model directory."""

    path: str
    model_id: str
    # Most sequences decoded together (vLLM's max_num_seqs).
    parallel: int = 64
    # Longest sequence, prompt plus completion (max_model_len); None: the model's trained context.
    context_length: int | None = None
    # Bytes of KV cache. On the CPU build this is the whole KV budget (VLLM_CPU_KVCACHE_SPACE in bytes); on a GPU,
    # None sizes it from gpu_memory_utilization after profiling the model.
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    dtype: str = "auto"
    # Skip torch.compile (start-up in seconds instead of minutes, slower decoding).
    enforce_eager: bool = False
    prefix_cache: bool = True
    max_num_batched_tokens: int | None = None
    max_logprobs: int = 20
    seed: int = 0
    # LoRA adapters in one batch (vLLM's max_loras); 0: LoRA off, as vLLM's server without --enable-lora.
    max_loras: int = 0
    # Adapters kept loaded in memory (vLLM's max_cpu_loras); others are read again from their path when asked for.
    max_cpu_loras: int = 0
    max_lora_rank: int = 16


class VllmEngine:
    """A :class:`~microserve.engines.base.TextEngine` on vLLM's ``AsyncLLM``."""

    def __init__(self, config: VllmConfig) -> None:
        self.config = config
        self._llm: Any = None
        self._tokenizer: Any = None
        self._bytes: TokenBytes | None = None
        self._info: ModelInfo | None = None
        self._snapshot = SchedulerSnapshot()
        self._kv_tokens = 0
        self._vocab_size = 0
        self._special_texts: tuple[str, ...] = ()
        self._ready = False
        self._add_bos = False
        self._checked: set[str] = set()
        # LoRA adapters by served name; requests in flight per adapter id; ids to drop once their last one ends.
        self._loras: dict[str, Any] = {}
        self._lora_ids = 0
        self._lora_running: dict[int, int] = {}
        self._lora_retired: set[int] = set()

    # -- lifecycle --------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True once vLLM has loaded the model, sized its KV cache, compiled, and decoded a warm-up token."""
        return self._ready

    @property
    def info(self) -> ModelInfo:
        """The loaded model's facts; only valid after :meth:`start`."""
        if self._info is None:
            raise NotReady("the model is still loading")
        return self._info

    def engine_args(self) -> Any:
        """vLLM's ``AsyncEngineArgs`` for this configuration."""
        from vllm.config import StructuredOutputsConfig
        from vllm.engine.arg_utils import AsyncEngineArgs

        cfg = self.config
        # Keyword arguments, so that a field vLLM types more narrowly than microserve (dtype, LoRA rank) is checked
        # by vLLM at start-up, with its own message.
        kwargs: dict[str, Any] = dict(
            model=cfg.path,
            served_model_name=cfg.model_id,
            dtype=cfg.dtype,
            max_model_len=cfg.context_length,
            max_num_seqs=cfg.parallel,
            max_num_batched_tokens=cfg.max_num_batched_tokens,
            kv_cache_memory_bytes=cfg.kv_cache_bytes,
            gpu_memory_utilization=cfg.gpu_memory_utilization,
            enforce_eager=cfg.enforce_eager,
            enable_prefix_caching=cfg.prefix_cache,
            # JSON without optional whitespace (as the llama.cpp engine's grammars write it): a small model given
            # free whitespace inside a schema can spend its whole budget on it.
            structured_outputs_config=StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True),
            max_logprobs=cfg.max_logprobs,
            seed=cfg.seed,
            # Stats reach the snapshot logger only; vLLM's periodic log lines and its Prometheus registry stay off.
            disable_log_stats=True,
            enable_log_requests=False,
        )
        if cfg.max_loras > 0:
            kwargs.update(
                enable_lora=True,
                max_loras=cfg.max_loras,
                max_cpu_loras=max(cfg.max_cpu_loras, cfg.max_loras),
                max_lora_rank=lora_rank_slot(cfg.max_lora_rank),
            )
        return AsyncEngineArgs(**kwargs)

    def _build(self) -> Any:
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        if self.config.kv_cache_bytes is not None:
            # The CPU build reads its KV budget from the environment (in GiB) and would override the argument.
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
        return AsyncLLM.from_engine_args(
            self.engine_args(),
            usage_context=UsageContext.ENGINE_CONTEXT,
            stat_loggers=[snapshot_logger(self._snapshot)],
        )

    async def start(self) -> None:
        """Start vLLM's engine core (weights, KV sizing, compilation) off the event loop, then decode once."""
        started = time.monotonic()
        try:
            self._llm = await asyncio.to_thread(self._build)
        except Exception as exc:
            raise RuntimeError(f"vLLM could not start {self.config.path}: {type(exc).__name__}: {exc}") from exc
        llm = self._llm
        self._tokenizer = llm.tokenizer
        self._bytes = TokenBytes(self._tokenizer)
        cache = llm.vllm_config.cache_config
        self._kv_tokens = int(cache.num_gpu_blocks or 0) * int(cache.block_size or 0)
        model_config = llm.model_config
        tok = self._tokenizer
        probe = tok.encode("a", add_special_tokens=True)
        self._add_bos = bool(tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id])
        self._vocab_size = int(model_config.get_vocab_size())
        self._special_texts = tuple(sorted({str(t) for t in _added_tokens(tok)}, key=len, reverse=True))
        self._info = ModelInfo(
            id=self.config.model_id,
            context_length=int(model_config.max_model_len),
            vocab_size=self._vocab_size,
            chat_template=getattr(tok, "chat_template", None),
            bos_token=tok.bos_token or "",
            eos_token=tok.eos_token or "",
            architecture=str(getattr(model_config.hf_config, "model_type", "")),
            path=self.config.path,
        )
        await self._warm_up()
        self._ready = True
        log.info(
            "vLLM ready for %s in %.1fs: %d KV tokens, %d sequences",
            self.config.model_id,
            time.monotonic() - started,
            self._kv_tokens,
            self.config.parallel,
        )

    async def _warm_up(self) -> None:
        from vllm.inputs.engine import tokens_input
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        params = SamplingParams(max_tokens=2, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)
        prompt = self.tokenize("Hello", add_special=True)
        async for _ in self._llm.generate(tokens_input(prompt), params, f"warmup-{uuid.uuid4().hex}"):
            pass

    async def shutdown(self) -> None:
        """Stop vLLM's engine-core process, which frees the model and its KV cache (GPU memory included)."""
        self._ready = False
        llm, self._llm = self._llm, None
        if llm is not None:
            await asyncio.to_thread(llm.shutdown)

    # -- tokenizer --------------------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; ``add_special`` adds BOS where the model wants it; ``parse_special=False`` reads
        special-token text (``<|im_end|>``) as plain characters."""
        if self._tokenizer is None:
            raise NotReady("the model is still loading")
        return list(
            self._tokenizer.encode(text, add_special_tokens=add_special, split_special_tokens=not parse_special)
        )

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt with its special-token markup parsed; BOS is added where the model wants one,
        unless the text (a chat template's output) already starts with it."""
        bos = self._info.bos_token if self._info is not None else ""
        return self.tokenize(text, add_special=self._add_bos and not (bos and text.startswith(bos)))

    def encode_segments(self, segments: Sequence[PromptSegment]) -> list[int]:
        """Token ids of a chat prompt: special-token text becomes special tokens in markup segments only.

        When no content segment holds special-token text (the usual case) the whole prompt is tokenized at once,
        exactly as :meth:`encode_prompt` would; otherwise markup and content are tokenized piece by piece, the
        content with special-token text read as plain characters."""
        text = "".join(s.text for s in segments)
        if not any(not s.markup and any(t in s.text for t in self._special_texts) for s in segments):
            return self.encode_prompt(text)
        bos = self._info.bos_token if self._info is not None else ""
        ids: list[int] = []
        if self._add_bos and not (bos and text.startswith(bos)) and self._tokenizer.bos_token_id is not None:
            ids.append(int(self._tokenizer.bos_token_id))
        for segment in segments:
            if segment.text:
                ids.extend(self.tokenize(segment.text, add_special=False, parse_special=segment.markup))
        return ids

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` as generated text spells it: special tokens render as nothing."""
        if self._bytes is None:
            raise NotReady("the model is still loading")
        return b"".join(self._bytes(t) for t in ids).decode("utf-8", errors="replace")

    def token_ids(self, text: str) -> list[int]:
        """The id of a special token given as text, or [] if it is not a single token of this vocabulary."""
        ids = self.tokenize(text, add_special=False, parse_special=True)
        return ids if len(ids) == 1 else []

    def piece(self, token: int) -> bytes:
        """The bytes a token stands for in generated text (special tokens render as nothing)."""
        if self._bytes is None:
            raise NotReady("the model is still loading")
        return self._bytes(token)

    # -- generation -------------------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        """Running and waiting sequences, KV use and prefix-cache hits, from vLLM's scheduler stats."""
        snap = self._snapshot
        busy = self._llm is not None and self._llm.get_num_unfinished_requests() > 0
        # vLLM reports after each step it runs; an idle engine sends no last report, so idle reads as empty.
        return EngineStats(
            running=snap.running if busy else 0,
            waiting=snap.waiting if busy else 0,
            slots=self.config.parallel,
            kv_used=round(snap.kv_usage * self._kv_tokens) if busy else 0,
            kv_total=self._kv_tokens,
            prefix_hit_tokens=snap.prefix_hits,
            steps=snap.steps,
        )

    async def check_guide(self, guide: Guide) -> None:
        """Compile ``guide`` with xgrammar (vLLM's structured-output backend) in a worker thread, once per guide;
        one that cannot be enforced is a 400 naming the field that carried it."""
        key = guide.key()
        if key in self._checked:
            return
        await asyncio.to_thread(guides.check, guide)
        if len(self._checked) >= 1024:
            self._checked.clear()
        self._checked.add(key)

    async def load_adapter(self, name: str, path: str) -> None:
        """Load the PEFT adapter directory ``path`` into vLLM as ``name`` (vLLM checks its modules and shapes
        against the model); a 400 naming vLLM's reason when it cannot be applied. A name loaded again takes the new
        files under a new id, so that vLLM does not keep serving the old weights it cached."""
        from vllm.lora.request import LoRARequest

        llm = self._llm
        if llm is None or self.config.max_loras <= 0:
            raise InvalidRequest(
                f"the vllm engine of {self.config.model_id} was started without LoRA adapters "
                "(set --lora-dir to serve them)",
                param="lora_path",
                code="invalid_adapter",
            )
        self._lora_ids += 1
        lora = LoRARequest(lora_name=name, lora_int_id=self._lora_ids, lora_path=path)
        try:
            await llm.add_lora(lora)
        except Exception as exc:  # vLLM raises plain ValueErrors and its own errors for a bad adapter
            raise InvalidRequest(
                f"vLLM cannot apply the adapter `{name}`: {type(exc).__name__}: {exc}",
                param="lora_path",
                code="invalid_adapter",
            ) from exc
        old = self._loras.get(name)
        self._loras[name] = lora
        if old is not None:
            await self._retire_lora(old.lora_int_id)

    async def unload_adapter(self, name: str) -> None:
        """Forget the adapter ``name``: new requests no longer find it; vLLM drops its weights once the requests
        running on it finish."""
        lora = self._loras.pop(name, None)
        if lora is not None:
            await self._retire_lora(lora.lora_int_id)

    async def _retire_lora(self, lora_id: int) -> None:
        if self._lora_running.get(lora_id):
            self._lora_retired.add(lora_id)
        elif self._llm is not None:
            await self._llm.remove_lora(lora_id)

    def check_request(self, request: GenerationRequest) -> None:
        """400s for what this engine cannot serve, raised while the request is prepared (before any stream)."""
        check_prompt(
            request.prompt_tokens,
            vocab_size=self._vocab_size,
            context_length=self.info.context_length,
            max_tokens=request.params.max_tokens,
        )
        if request.adapter is not None and request.adapter not in self._loras:
            raise InvalidRequest(
                f"the adapter `{request.adapter}` is not loaded", param="model", code="model_not_found"
            )
        top = max(request.logprobs or 0, request.prompt_logprobs or 0)
        if top > self.config.max_logprobs:
            raise InvalidRequest(
                f"at most {self.config.max_logprobs} alternatives per token are reported, {top} were asked for",
                param="top_logprobs",
            )

    def sampling_params(self, request: GenerationRequest) -> Any:
        """vLLM's ``SamplingParams`` for ``request``: deltas out, stop strings matched by vLLM per choice."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        p = request.params
        n = max(1, request.n)
        temperature, top_k = p.temperature, p.top_k
        if n > 1 and temperature == 0:
            # vLLM refuses n > 1 when greedy; the API allows it (n equal choices), and sampling from the top token
            # only is the same choice (logprobs are read from the raw logits either way).
            temperature, top_k = 1.0, 1
        return SamplingParams(
            n=n,
            max_tokens=p.max_tokens,
            temperature=temperature,
            top_p=p.top_p,
            top_k=top_k,
            min_p=p.min_p,
            seed=p.seed,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            ignore_eos=p.ignore_eos,
            logit_bias=dict(p.logit_bias) or None,
            stop=list(request.stop) or None,
            stop_token_ids=list(request.stop_token_ids) or None,
            logprobs=request.logprobs,
            prompt_logprobs=request.prompt_logprobs,
            structured_outputs=guides.structured_outputs(request.guide),
            output_kind=RequestOutputKind.DELTA,
            skip_special_tokens=True,
        )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream the deltas of all ``n`` choices; leaving the iterator early aborts the request in vLLM."""
        from vllm.exceptions import VLLMClientError
        from vllm.inputs.engine import tokens_input
        from vllm.v1.engine.exceptions import EngineDeadError, EngineGenerateError

        llm = self._llm
        if not self._ready or llm is None or self._bytes is None:
            raise NotReady("the model is still loading")
        prompt = request.prompt_tokens
        # Checked again: a caller that skipped check_request must not reach vLLM with it.
        self.check_request(request)
        try:
            params = self.sampling_params(request)
        except (VLLMClientError, ValueError) as exc:
            raise InvalidRequest(str(exc)) from exc
        n = params.n
        choices = [_Choice(self._bytes, request.logprobs or 0) for _ in range(n)]
        # vLLM wants request ids unique among running requests; a client's id may repeat, so it is suffixed.
        lora = self._loras.get(request.adapter) if request.adapter is not None else None
        lora_id = lora.lora_int_id if lora is not None else None
        if lora_id is not None:
            self._lora_running[lora_id] = self._lora_running.get(lora_id, 0) + 1
        stream = llm.generate(
            tokens_input(prompt), params, f"{request.request_id or 'req'}-{uuid.uuid4().hex}", lora_request=lora
        )
        scored = request.prompt_logprobs is not None
        try:
            async for out in stream:
                cached = int(out.num_cached_tokens or 0)
                for completion in out.outputs:
                    choice = choices[completion.index]
                    delta = choice.advance(completion, logprobs=request.logprobs is not None)
                    if delta is None and not (scored and completion.index == 0):
                        continue
                    text, ids, finish, logprobs = delta or ("", [], None, [])
                    prompt_scores = None
                    if scored and completion.index == 0:
                        scored = False
                        prompt_scores = self._prompt_logprobs(prompt, out.prompt_logprobs, request.prompt_logprobs)
                    yield GenerationDelta(
                        text=text,
                        token_ids=ids,
                        finish_reason=finish,
                        prompt_tokens=len(prompt),
                        completion_tokens=choice.completion_tokens,
                        cached_tokens=cached,
                        index=completion.index,
                        logprobs=logprobs if request.logprobs is not None else None,
                        prompt_logprobs=prompt_scores,
                        stop_string=completion.stop_reason if isinstance(completion.stop_reason, str) else None,
                    )
        except (VLLMClientError, ValueError) as exc:
            raise InvalidRequest(str(exc)) from exc
        except (EngineDeadError, EngineGenerateError) as exc:
            raise EngineFailure(f"generation failed: {type(exc).__name__}: {exc}") from exc
        finally:
            # Closing vLLM's generator aborts whatever is still running (a client that went away).
            await stream.aclose()
            if lora_id is not None:
                await self._lora_done(lora_id)

    async def _lora_done(self, lora_id: int) -> None:
        left = self._lora_running.get(lora_id, 1) - 1
        if left > 0:
            self._lora_running[lora_id] = left
            return
        self._lora_running.pop(lora_id, None)
        if lora_id in self._lora_retired and self._llm is not None:
            self._lora_retired.discard(lora_id)
            await self._llm.remove_lora(lora_id)

    def _prompt_logprobs(
        self, prompt: list[int], rows: Sequence[Mapping[int, Any] | None] | None, top: int | None
    ) -> list[TokenLogprob | None]:
        """One entry per prompt token (None for the first), from vLLM's prompt logprobs."""
        assert self._bytes is not None
        token_bytes = self._bytes
        entries: list[TokenLogprob | None] = [None]
        rows = list(rows or [])
        for i, token in enumerate(prompt[1:], start=1):
            row = rows[i] if i < len(rows) else None
            entries.append(_token_logprob(token_bytes, token, row, top or 0))
        return entries


# vLLM sizes its LoRA slots by one of these ranks.
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank_slot(rank: int) -> int:
    """The smallest LoRA slot rank vLLM accepts that holds adapters of ``rank``."""
    return next((r for r in _LORA_RANKS if r >= rank), rank)


def _added_tokens(tokenizer: Any) -> list[str]:
    """The texts of the tokenizer's added (special and control) tokens."""
    decoder = getattr(tokenizer, "added_tokens_decoder", None)
    if isinstance(decoder, Mapping):
        return [str(getattr(t, "content", t)) for t in decoder.values()]
    return [str(t) for t in getattr(tokenizer, "all_special_tokens", [])]


def _token_logprob(token_bytes: TokenBytes, token_id: int, row: Mapping[int, Any] | None, top: int) -> TokenLogprob:
    """A token's logprob and its ``top`` alternatives from one vLLM logprobs row (token id -> Logprob)."""
    if not row:
        return TokenLogprob(token_id, token_bytes(token_id), 0.0)
    chosen = row.get(token_id)
    # vLLM adds the sampled token with its own rank when it is not among the top ones.
    ranked = sorted(
        ((t, lp) for t, lp in row.items() if lp.rank is not None and lp.rank <= top),
        key=lambda item: item[1].rank,
    )
    return TokenLogprob(
        token_id=token_id,
        token=token_bytes(token_id),
        logprob=float(chosen.logprob) if chosen is not None else 0.0,
        top=tuple((token_bytes(t), float(lp.logprob)) for t, lp in ranked),
    )


class _Choice:
    """One choice's running state: usage, and the logprobs of tokens whose text vLLM still holds back."""

    __slots__ = ("_bytes", "_held", "_next_start", "_sent", "_top", "completion_tokens", "finished")

    def __init__(self, token_bytes: TokenBytes, top: int) -> None:
        self._bytes = token_bytes
        self._top = top
        self._held: list[tuple[int, TokenLogprob]] = []  # (text offset where the token starts, its logprob)
        self._next_start = 0  # text offset where the next token starts
        self._sent = 0  # characters of text emitted so far
        self.completion_tokens = 0
        self.finished = False

    def _logprob(self, token_id: int, position: Mapping[int, Any] | None) -> TokenLogprob:
        return _token_logprob(self._bytes, token_id, position, self._top)

    def advance(
        self, completion: Any, *, logprobs: bool
    ) -> tuple[str, list[int], FinishReason | None, list[TokenLogprob]] | None:
        """This choice's part of one vLLM delta: text, token ids, finish reason and the logprobs now listable."""
        if self.finished:
            return None
        ids = list(completion.token_ids)
        text = completion.text
        reason = completion.finish_reason
        finish: FinishReason | None = None
        if reason is not None:
            if reason not in ("stop", "length"):
                raise EngineFailure(f"generation ended by the engine: {reason}")
            finish = "length" if reason == "length" else "stop"
            self.finished = True
        self.completion_tokens += len(ids)
        self._sent += len(text)
        listed: list[TokenLogprob] = []
        if logprobs:
            positions = completion.logprobs or []
            for i, token_id in enumerate(ids):
                if finish == "stop" and i == len(ids) - 1 and not self._bytes(token_id):
                    continue  # the end-of-turn token: no text, no logprob
                item = self._logprob(token_id, positions[i] if i < len(positions) else None)
                self._held.append((self._next_start, item))
                self._next_start += len(item.token.decode("utf-8", errors="replace"))
            if finish is not None and not isinstance(completion.stop_reason, str):
                cut = len(self._held)
            else:
                # A token is listed once some of its text was emitted; a stop string's tokens never are.
                cut = next((k for k, (start, _) in enumerate(self._held) if start >= self._sent), len(self._held))
            listed = [item for _, item in self._held[:cut]]
            self._held = [] if finish is not None else self._held[cut:]
        if not ids and not text and finish is None:
            return None
        return text, ids, finish, listed
