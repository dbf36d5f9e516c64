"""Continuous batching over one llama.cpp context.

One thread owns the context. Each step it admits waiting sequences into free slots (reusing the slot whose cached
tokens share the longest prefix with the prompt), packs the next token of every running sequence plus bounded
chunks of pending prompts into a single ``llama_decode``, samples every sequence from the step's logits, and
posts the sampled tokens to the requests' asyncio queues in one ``call_soon_threadsafe`` per step. It never waits
on the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, cast

import llama_cpp as L

from microserve.engines.base import EngineStats, SamplingParams
from microserve.engines.llamacpp.batch_sampling import RowSampler
from microserve.engines.llamacpp.lora import AdapterUnavailable, LoraSet
from microserve.engines.llamacpp.prompt_scoring import Score, score_rows
from microserve.engines.llamacpp.sampling import SequenceSampler, StepSampler

log = logging.getLogger(__name__)

# Buckets of the turn-wait counts: waits of 0 to 14 decode steps, and 15 or more.
TURN_WAIT_BUCKETS = 16


@dataclass(slots=True)
class Token:
    """One sampled token, posted to the request's queue."""

    id: int  # -1: no token was allowed (a grammar with no way forward); the sequence ends without one
    finish: str | None
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(slots=True)
class Failure:
    """The engine could not serve the sequence; posted instead of a token. ``busy``: it may succeed if retried
    (all adapter places in use), rather than an engine fault."""

    message: str
    busy: bool = False


@dataclass(slots=True)
class Admitted:
    """Posted once a sequence has a slot: how much of its prompt came from the prefix cache."""

    cached_tokens: int


@dataclass(slots=True)
class PromptScores:
    """Posted once a scored prompt is prefilled: one score per prompt token after the first."""

    scores: list[Score]


Event = Token | Failure | Admitted | PromptScores


class EventSink(Protocol):
    """Where a sequence's events go: its request's asyncio queue, or a tagging wrapper shared by siblings."""

    def put_nowait(self, item: Event, /) -> None: ...


@dataclass(eq=False, slots=True)
class Sequence:
    """A request as the engine thread sees it."""

    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    loop: asyncio.AbstractEventLoop
    out: EventSink
    grammar: str | None = None
    grammar_triggers: tuple[str, ...] = ()
    top_logprobs: int | None = None
    # The LoRA adapter the sequence decodes with (None: the base model); its handle once admitted.
    adapter: str | None = None
    lora: L.llama_adapter_lora_p | None = None
    # Score the prompt with this many alternatives per token: logits at every prompt position, no prefix reuse.
    prompt_logprobs: int | None = None
    prompt_scores: list[Score] = field(default_factory=list)
    # A sibling choice of the same prompt: this sequence waits for it to prefill, then copies its prompt's KV.
    fork_from: Sequence | None = None
    # Which of the request's choices this is: sets its random generator apart from its siblings'.
    choice: int = 0
    cancelled: bool = False
    slot: Slot | None = None
    sampler: RowSampler | SequenceSampler | None = None
    prefilled: int = 0
    generated: int = 0
    next_token: int = -1
    arrival: float = field(default_factory=time.monotonic)


@dataclass(eq=False, slots=True)
class Slot:
    """A sequence id in the context and the tokens its KV cells hold."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    last_used: int = 0
    seq: Sequence | None = None
    # The adapter the cached tokens were computed under: a prefix is reused only for the same adapter.
    adapter: str | None = None


@dataclass(slots=True)
class Call:
    """A function to run on the engine thread between steps (adapter loads), with the future of its result."""

    fn: Callable[[], object]
    done: concurrent.futures.Future[object] = field(default_factory=concurrent.futures.Future)


class PrefillBudget:
    """How many prompt tokens a step may carry while other sequences decode, learnt from measured step times.

    A step's time is about a decode-only step plus a cost per prompt token. Keeping a mixed step within
    ``factor`` times a decode-only step bounds the inter-token latency a long new prompt adds to running streams,
    whatever the hardware: on a slow CPU that is a few dozen tokens a step, on a GPU the whole batch.
    """

    ALPHA = 0.2  # weight of the newest measurement in the moving averages
    FLOOR = 8  # a long prompt always makes progress

    def __init__(self, batch_size: int, factor: float = 2.0, first_guess: int = 32) -> None:
        self.batch_size = batch_size
        self.factor = factor
        self.first_guess = first_guess
        self.decode_s: float | None = None  # a decode-only step
        self.token_s: float | None = None  # one prompt token added to a step

    def chunk(self, waiting: int = 1, decoding: int = 1) -> int:
        """Prompt tokens allowed in the next step that also carries decode tokens, while ``waiting`` prompts wait
        for their first token and ``decoding`` streams run.

        With one prompt waiting, the step is held to ``factor`` decode steps: a long new prompt then costs the
        running streams a little latency on many steps instead of one long stall. With two or more waiting (a
        burst), their wait costs more than the streams' slower steps, and the step takes prompt tokens up to the
        batch width, as llama-server's scheduler always does: the burst's last prompts are not trickled in behind
        the streams that got there first, and the burst ends sooner, its streams decoding together instead of the
        last prompts' streams decoding alone at the end."""
        if waiting >= 2:
            return self.batch_size
        if self.decode_s is None or not self.token_s:
            return min(self.first_guess, self.batch_size)
        allowed = int((self.factor - 1.0) * self.decode_s / self.token_s)
        return max(self.FLOOR, min(self.batch_size, allowed))

    def observe(self, decode_tokens: int, prompt_tokens: int, seconds: float) -> None:
        """Fold one step's time into the averages."""
        if prompt_tokens == 0:
            self.decode_s = self._mix(self.decode_s, seconds)
        elif decode_tokens == 0:
            # Prompt-only steps are the cheapest per token (widest matrices): a first estimate, soon corrected.
            if self.token_s is None:
                self.token_s = seconds / prompt_tokens
        elif self.decode_s is not None:
            self.token_s = self._mix(self.token_s, max(seconds - self.decode_s, 0.0) / prompt_tokens)

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.ALPHA) * old + self.ALPHA * new


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


class Scheduler:
    """The engine thread's loop; created with a loaded context, driven by ``submit`` and ``cancel``."""

    def __init__(
        self,
        ctx: L.llama_context_p,
        *,
        n_vocab: int = 0,
        n_slots: int,
        n_ctx_seq: int,
        batch_size: int,
        prefill_chunk: int | None = None,
        prefill_step_factor: float = 2.0,
        prefix_cache: bool = True,
        sampler_factory: Callable[[Sequence], RowSampler | SequenceSampler],
        eog_ids: frozenset[int],
        loras: LoraSet | None = None,
    ) -> None:
        self._ctx = ctx
        self._n_vocab = n_vocab
        self._mem = L.llama_get_memory(ctx)
        self._n_ctx_seq = n_ctx_seq
        self._batch_size = batch_size
        self._prefill_chunk = min(prefill_chunk, batch_size) if prefill_chunk else None
        self._budget = PrefillBudget(batch_size, factor=prefill_step_factor)
        self._prefix_cache = prefix_cache
        self._batch = L.llama_batch_init(batch_size, 0, 1)
        self._make_sampler = sampler_factory
        self._sampler = StepSampler(n_vocab)
        self._eog = eog_ids
        self._slots = [Slot(seq_id=i) for i in range(n_slots)]
        self._inbox: queue.SimpleQueue[Sequence | Call | None] = queue.SimpleQueue()
        self._loras = loras
        # The adapter set on the context now (False: unknown, e.g. after an adapter was freed), and the step each
        # adapter set last decoded in: sets with work take turns, the longest-waiting first.
        self._ctx_adapter: str | bool | None = None
        self._turns: dict[str | None, int] = {}
        # Decode steps each adapter set with work has waited since its last turn, and how many turns came after
        # a wait of 0, 1, 2, ... steps (the last bucket: that many or more), for the turn-wait metric.
        self._groups: tuple[str | None, ...] = ()
        self._skipped: dict[str | None, int] = {}
        self.turn_waits = [0] * TURN_WAIT_BUCKETS
        if loras is not None:
            loras.before_free = self._clear_adapters
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []
        self._clock = itertools.count(1)
        self._thread = threading.Thread(target=self._run, name="microserve-engine", daemon=True)
        self._warmed: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._warm_up: Callable[[], None] = lambda: None
        self._stopping = False
        self.steps = 0
        self.prefix_hit_tokens = 0
        # Steps that carried no prompt token, their time (decode and sampling) and the sampling's share of it.
        self.decode_steps = 0
        self.decode_seconds = 0.0
        self.sample_seconds = 0.0

    # -- called from the event loop ---------------------------------------------------------------------------

    def start(self, warm_up: Callable[[], None]) -> concurrent.futures.Future[None]:
        """Start the engine thread, which first runs ``warm_up``; the future resolves once that has succeeded.

        Every decode, the warm-up included, runs on this one thread: llama.cpp's OpenMP build keeps a worker team
        per calling thread, and a second team makes OpenMP count more threads than cores and switch its barriers
        from spinning to sleeping, which doubled the time of each decode step on a small machine.
        """
        self._warm_up = warm_up
        self._thread.start()
        return self._warmed

    def call(self, fn: Callable[[], object]) -> concurrent.futures.Future[object]:
        """Run ``fn`` on the engine thread before the next step; the future carries its result or error."""
        item = Call(fn)
        self._inbox.put(item)
        return item.done

    def submit(self, seq: Sequence) -> None:
        """Queue a sequence; it is admitted in arrival order as slots free up."""
        self._inbox.put(seq)

    def cancel(self, seq: Sequence) -> None:
        """Stop a sequence at the next step and free its slot; safe to call at any time, more than once."""
        seq.cancelled = True
        self._inbox.put(None)  # wakes an idle engine thread so the cancellation is seen promptly

    def stop(self) -> None:
        """Stop the engine thread after the current step and wait for it."""
        self._stopping = True
        self._inbox.put(None)
        self._thread.join(timeout=30)
        L.llama_batch_free(self._batch)

    def stats(self) -> EngineStats:
        """Counts read without locking: each is a single attribute read, good enough for monitoring."""
        used = sum(len(s.tokens) for s in self._slots)
        running = list(self._running)
        waiting = list(self._waiting)
        return EngineStats(
            running=len(running),
            waiting=len(waiting) + self._inbox.qsize(),
            slots=len(self._slots),
            kv_used=used,
            kv_total=self._n_ctx_seq * len(self._slots),
            prefix_hit_tokens=self.prefix_hit_tokens,
            steps=self.steps,
            adapters_loaded=self._loras.loaded_count if self._loras is not None else 0,
            running_adapters=tuple(sorted({s.adapter for s in running if s.adapter})),
            waiting_adapters=tuple(sorted({s.adapter for s in waiting if s.adapter})),
            turn_waits=tuple(self.turn_waits),
        )

    # -- the engine thread ------------------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self._warm_up()
        except BaseException as exc:
            self._warmed.set_exception(exc)
            return
        self._warmed.set_result(None)
        while not self._stopping:
            idle = not self._running and not self._waiting
            self._drain_inbox(block=idle)
            if self._stopping:
                break
            self._drop_cancelled()
            try:
                self._admit()
                self._fork_siblings()
                if self._running:
                    self._step()
            except Exception as exc:  # a bug must fail the requests in hand, never leave them waiting forever
                log.exception("engine step failed")
                self._fail_running(f"engine error: {type(exc).__name__}: {exc}")
        for seq in [*self._running, *self._waiting]:
            self._post([(seq, Failure("the engine is shutting down"))])
            self._release(seq)

    def _drain_inbox(self, *, block: bool) -> None:
        try:
            item = self._inbox.get(block=block)
            while True:
                if isinstance(item, Call):
                    self._run_call(item)
                elif item is not None:
                    self._waiting.append(item)
                item = self._inbox.get_nowait()
        except queue.Empty:
            return

    @staticmethod
    def _run_call(item: Call) -> None:
        try:
            item.done.set_result(item.fn())
        except BaseException as exc:  # handed to the caller
            item.done.set_exception(exc)

    def adapters_in_use(self) -> set[str]:
        """Adapters of the running and waiting sequences (engine thread)."""
        return {s.adapter for s in (*self._running, *self._waiting) if s.adapter}

    def _clear_adapters(self) -> None:
        L.llama_set_adapters_lora(self._ctx, None, 0, None)
        self._ctx_adapter = None

    def _use_adapter(self, adapter: str | None, handle: L.llama_adapter_lora_p | None) -> None:
        if self._ctx_adapter is not False and self._ctx_adapter == adapter:
            return
        if adapter is None or handle is None:
            self._clear_adapters()
        else:
            handles = (L.llama_adapter_lora_p_ctypes * 1)(cast(Any, handle))
            scales = (ctypes.c_float * 1)(1.0)
            L.llama_set_adapters_lora(self._ctx, handles, 1, scales)
            self._ctx_adapter = adapter

    def _drop_cancelled(self) -> None:
        if any(s.cancelled for s in self._waiting):
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
        for seq in [s for s in self._running if s.cancelled]:
            self._release(seq)

    def _admit(self) -> None:
        while self._waiting:
            free = [s for s in self._slots if s.seq is None]
            if not free:
                return
            seq = self._waiting.popleft()
            if seq.adapter is not None and not self._attach_adapter(seq):
                continue
            slot, reuse = self._pick_slot(free, seq.prompt, seq.adapter)
            if seq.prompt_logprobs is not None:
                reuse = 0  # every prompt position's logits are needed
            elif seq.params.seed is not None and seq.params.temperature > 0:
                # The same seed must give the same text. A model in F16 or BF16 is not batch-invariant: llama.cpp's
                # float kernels round the last prompt token's logits differently when it is computed alone after a
                # reused prefix than inside the whole prompt's batch, and a sampled token can flip. A seeded sample
                # computes its prompt afresh, as the first request did (integer-dot quantized models never differ).
                reuse = 0
            if reuse < len(slot.tokens) and not L.llama_memory_seq_rm(self._mem, slot.seq_id, reuse, -1):
                # Some caches (recurrent, sliding-window) cannot drop a tail: start the slot afresh.
                L.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                reuse = 0
            del slot.tokens[reuse:]
            slot.adapter = seq.adapter
            slot.seq = seq
            slot.last_used = next(self._clock)
            seq.slot = slot
            seq.prefilled = reuse
            try:
                seq.sampler = self._make_sampler(seq)
            except Exception as exc:  # a grammar that no longer compiles: fail this request, not the engine
                log.exception("could not build the sampler of a sequence")
                self._release(seq)
                self._post([(seq, Failure(f"could not build the sampler: {exc}"))])
                continue
            self.prefix_hit_tokens += reuse
            self._running.append(seq)
            self._post([(seq, Admitted(reuse))])

    def _attach_adapter(self, seq: Sequence) -> bool:
        """Give ``seq`` its adapter's handle (loading it if needed); fail the sequence if that is impossible."""
        assert seq.adapter is not None
        try:
            if self._loras is None:
                raise AdapterUnavailable("this model serves no adapters")
            seq.lora = self._loras.load(seq.adapter, self.adapters_in_use())
        except AdapterUnavailable as exc:
            self._post([(seq, Failure(str(exc), busy=exc.busy))])
            return False
        return True

    def _fork_siblings(self) -> None:
        """Give each waiting sibling choice the prompt KV of the sibling that prefilled it, minus the last token.

        The last prompt token is decoded again in the sibling's own slot so that it gets its own logits; the rest
        of the prompt is computed once for all ``n`` choices. Across KV streams llama.cpp copies the stream's
        buffer at the next decode; within one stream it only tags the cells.
        """
        for seq in self._running:
            parent = seq.fork_from
            if parent is None:
                continue
            if parent.slot is not None and not parent.cancelled and parent.prefilled < len(parent.prompt):
                continue  # still prefilling
            seq.fork_from = None
            share = len(seq.prompt) - 1
            slot = seq.slot
            if slot is None or seq.prefilled >= share:
                continue
            # The sibling's slot, or, if it already finished, whichever slot still holds the prompt.
            prefix = seq.prompt[:share]
            source = next(
                (s for s in self._slots if s is not slot and s.adapter == seq.adapter and s.tokens[:share] == prefix),
                None,
            )
            if source is None:
                continue  # the sibling is gone and so is its prompt: prefill alone
            L.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
            L.llama_memory_seq_cp(self._mem, source.seq_id, slot.seq_id, -1, -1)
            if not L.llama_memory_seq_rm(self._mem, slot.seq_id, share, -1):
                L.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                slot.tokens.clear()
                seq.prefilled = 0
                continue
            slot.tokens[:] = seq.prompt[:share]
            self.prefix_hit_tokens += share - seq.prefilled
            seq.prefilled = share
            self._post([(seq, Admitted(share))])

    def _pick_slot(self, free: list[Slot], prompt: list[int], adapter: str | None) -> tuple[Slot, int]:
        # The free slot sharing the longest prefix with the prompt under the same adapter, else the least recently
        # used one: its cached prefix is the one evicted. KV cells computed under one adapter are never reused for
        # another, nor for the base model.
        best, best_len = free[0], -1
        for slot in free:
            n = common_prefix(slot.tokens, prompt) if self._prefix_cache and slot.adapter == adapter else 0
            if n > best_len or (n == best_len and slot.last_used < best.last_used):
                best, best_len = slot, n
        # At least one prompt token must be decoded to get logits for the first sampled token.
        return best, min(best_len, len(prompt) - 1)

    def _step(self) -> None:
        batch = self._batch
        n = 0
        sample_at: list[tuple[Sequence, int]] = []
        # Scored prompts: (sequence, batch index, the prompt token those logits predict).
        score_at: list[tuple[Sequence, int, int]] = []
        prefill_only: list[Sequence] = []  # prompts scored with max_tokens 0: done once prefilled

        def add(seq: Sequence, token: int, want_logits: bool, score_next: int | None = None) -> None:
            nonlocal n
            slot = seq.slot
            assert slot is not None
            batch.token[n] = token
            batch.pos[n] = len(slot.tokens)
            batch.n_seq_id[n] = 1
            batch.seq_id[n][0] = slot.seq_id
            batch.logits[n] = want_logits or score_next is not None
            slot.tokens.append(token)
            if want_logits:
                sample_at.append((seq, n))
            if score_next is not None:
                score_at.append((seq, n, score_next))
            n += 1

        # One adapter set per decode (llama.cpp applies adapters to the whole context): the sets with work take
        # turns, the one that waited longest first, so none waits more steps than there are other sets.
        active = self._turn()
        # Decoding sequences first: one token each keeps every running stream moving every step.
        for seq in active:
            if seq.prefilled == len(seq.prompt):
                add(seq, seq.next_token, True)
        # Then prompt chunks, oldest first, within what is left of the step's token budget. While streams are
        # decoding, the prompt share of a step is capped: a long prompt then costs running streams a little
        # latency on many steps instead of one long stall; with two or more prompts waiting (a burst), and with
        # nothing decoding, prefill runs at full width (PrefillBudget.chunk).
        decoding = n
        if n == 0:
            limit = self._batch_size
        else:
            waiting = sum(1 for seq in active if seq.prefilled < len(seq.prompt) and seq.fork_from is None)
            chunk = self._prefill_chunk or self._budget.chunk(waiting, decoding)
            limit = min(self._batch_size, n + chunk)
        for seq in active:
            budget = limit - n
            if budget <= 0:
                break
            remaining = len(seq.prompt) - seq.prefilled
            if remaining <= 0 or seq.fork_from is not None:
                continue
            take = min(budget, remaining)
            start = seq.prefilled
            last = len(seq.prompt) - 1
            generates = seq.params.max_tokens > 0
            if seq.prompt_logprobs is None:
                for i in range(start, start + take):
                    add(seq, seq.prompt[i], i == last and generates)
            else:
                for i in range(start, start + take):
                    add(seq, seq.prompt[i], i == last and generates, seq.prompt[i + 1] if i < last else None)
            seq.prefilled += take
            if seq.prefilled == len(seq.prompt) and not generates:
                prefill_only.append(seq)
        if n == 0:
            return
        if active:
            self._use_adapter(active[0].adapter, active[0].lora)
            self._turns[active[0].adapter] = self.steps
            self._count_turn(active[0].adapter)
        batch.n_tokens = n
        started = time.perf_counter()
        rc = L.llama_decode(self._ctx, batch)
        self.steps += 1
        if rc != 0:
            self._fail_batch(sample_at, rc)
            return
        decoded = time.perf_counter()
        events: list[tuple[Sequence, Event]] = []
        finished: list[Sequence] = []
        rows: list[tuple[RowSampler | SequenceSampler, int]] = []
        if score_at:
            events += self._score(score_at)
        for seq in prefill_only:
            events.append((seq, Token(-1, "length")))
            finished.append(seq)
        for seq, idx in sample_at:
            assert seq.sampler is not None
            rows.append((seq.sampler, idx))
        for (seq, _), sampled in zip(sample_at, self._sampler.sample(self._ctx, rows), strict=True):
            if sampled is None:
                events.append((seq, Token(-1, "stop")))
                finished.append(seq)
                continue
            token = sampled.token
            seq.generated += 1
            finish: str | None = None
            if token in seq.stop_ids or (token in self._eog and not seq.params.ignore_eos):
                finish = "stop"
            elif seq.generated >= seq.params.max_tokens or len(seq.prompt) + seq.generated >= self._n_ctx_seq:
                finish = "length"
            events.append((seq, Token(token, finish, sampled.logprob, sampled.top)))
            if finish:
                finished.append(seq)
            else:
                seq.next_token = token
        elapsed = time.perf_counter() - started
        self._budget.observe(decoding, n - decoding, elapsed)
        if n == decoding:
            self.decode_steps += 1
            self.decode_seconds += elapsed
            self.sample_seconds += started + elapsed - decoded
        # Release before posting, so that a client that sees its last token also sees its slot free.
        for seq in finished:
            self._release(seq)
        self._post(events)

    def _turn(self) -> list[Sequence]:
        """The running sequences of the adapter set whose turn it is (all of them when they share one)."""
        groups: dict[str | None, list[Sequence]] = {}
        for seq in self._running:
            if seq.prefilled == len(seq.prompt) or (seq.prefilled < len(seq.prompt) and seq.fork_from is None):
                groups.setdefault(seq.adapter, []).append(seq)
        self._groups = tuple(groups)
        if len(groups) <= 1:
            return next(iter(groups.values()), [])
        key = min(groups, key=lambda k: self._turns.get(k, -1))
        return groups[key]

    def _count_turn(self, chosen: str | None) -> None:
        # Every other set that had work this step waits one step more; the chosen one's wait ends.
        waited = self._skipped.pop(chosen, 0)
        self.turn_waits[min(waited, TURN_WAIT_BUCKETS - 1)] += 1
        self._skipped = {k: self._skipped.get(k, 0) + 1 for k in self._groups if k != chosen}

    def _score(self, score_at: list[tuple[Sequence, int, int]]) -> list[tuple[Sequence, Event]]:
        """Score this step's prompt positions; a prompt's scores are posted once all of it is prefilled."""
        events: list[tuple[Sequence, Event]] = []
        for seq, idx, token in score_at:
            seq.prompt_scores += score_rows(self._ctx, [(idx, token)], self._n_vocab, seq.prompt_logprobs or 0)
        for seq in dict.fromkeys(s for s, _, _ in score_at):
            if seq.prefilled == len(seq.prompt):
                events.append((seq, PromptScores(seq.prompt_scores)))
                seq.prompt_scores = []
        return events

    def _fail_batch(self, sample_at: list[tuple[Sequence, int]], rc: int) -> None:
        log.error("llama_decode failed with status %d; failing the %d sequences in the batch", rc, len(sample_at))
        self._fail_running(f"llama_decode failed with status {rc}")

    def _fail_running(self, message: str) -> None:
        # Their KV cells may be half-written: drop them along with the sequences.
        victims = list(self._running)
        self._post([(seq, Failure(message)) for seq in victims])
        for seq in victims:
            slot = seq.slot
            self._release(seq)
            if slot is not None:
                L.llama_memory_seq_rm(self._mem, slot.seq_id, -1, -1)
                slot.tokens.clear()

    def _release(self, seq: Sequence) -> None:
        # The slot keeps its KV cells and token list so a later prompt with the same prefix can reuse them.
        if seq in self._running:
            self._running.remove(seq)
        if seq.slot is not None:
            seq.slot.seq = None
            seq.slot.last_used = next(self._clock)
            seq.slot = None
        if isinstance(seq.sampler, SequenceSampler):
            seq.sampler.free()
        seq.sampler = None
        if seq.adapter is not None and self._loras is not None:
            self._loras.release_forgotten(self.adapters_in_use())

    @staticmethod
    def _post(events: list[tuple[Sequence, Event]]) -> None:
        if not events:
            return
        loop = events[0][0].loop
        try:
            loop.call_soon_threadsafe(_deliver, events)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


def _deliver(events: list[tuple[Sequence, Event]]) -> None:
    for seq, event in events:
        seq.out.put_nowait(event)
