"""The engine protocol: the one seam between the services and any inference library.

Services hand an engine token ids, sampling parameters and an output constraint (a :class:`Guide`, stated the way
clients state it) and read back deltas; they never see llama.cpp, vLLM or torch, nor a grammar format. Engines that
serve text implement :class:`TextEngine`; sentence encoders (embeddings, and cross-encoders that score
query/passage pairs) implement :class:`EncoderEngine`, and own how their inputs are laid out.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

FinishReason = Literal["stop", "length"]
GuideKind = Literal["json", "regex", "choice", "grammar", "tool_calls"]


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick each next token. Neutral values disable a stage. ``max_tokens`` 0 scores the prompt only."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    logit_bias: Mapping[int, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Guide:
    """A constraint on the output, as the client stated it; each engine compiles it its own way.

    ``spec`` by kind: ``json`` a JSON schema (dict); ``regex`` a pattern; ``choice`` a list of strings; ``grammar``
    a GBNF grammar; ``tool_calls`` a dict with ``functions`` (``[name, parameters schema or None]`` pairs),
    ``parallel`` (several calls allowed), and ``open``/``close``, the text around each call's
    ``{"name": ..., "arguments": ...}`` object. ``param`` is the request field that carried it, for errors.
    With a ``trigger`` the constraint holds from where that text first appears in the output (free text before);
    without one it holds from the first token.
    """

    kind: GuideKind
    spec: Any
    param: str
    trigger: str | None = None

    def key(self) -> str:
        """A stable hash of what the guide constrains, for caching what an engine compiles from it."""
        text = json.dumps([self.kind, self.spec, self.trigger], sort_keys=True, separators=(",", ":"), default=str)
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """One sequence to generate: the prompt as token ids, how to sample, where to stop, and what may be output."""

    request_id: str
    prompt_tokens: list[int]
    params: SamplingParams
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    # The constraint every choice must follow (already checked with ``TextEngine.check_guide``).
    guide: Guide | None = None
    # Report logprobs with this many alternatives per token (0: the sampled token's only); None: no logprobs.
    logprobs: int | None = None
    # Independent choices of the same prompt; the engine prefills the prompt once and shares it.
    n: int = 1
    # The LoRA adapter to generate with, by the name the engine loaded it under; None: the base model.
    adapter: str | None = None
    # Score the prompt: each prompt token's logprob given the tokens before it, with this many alternatives (0:
    # the token's own only), in the first delta of choice 0. None: the prompt is not scored, and costs nothing more.
    prompt_logprobs: int | None = None


@dataclass(frozen=True, slots=True)
class PromptSegment:
    """A piece of a rendered chat prompt: the template's own markup, whose special-token text becomes special
    tokens, or client content (``markup`` false), which is always tokenized as plain text, so that a client who
    types ``<|im_end|>`` gets the characters, never the control token."""

    text: str
    markup: bool


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A generated token's text bytes and logprob, with the most likely alternatives (token bytes, logprob)."""

    token_id: int
    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass(slots=True)
class GenerationDelta:
    """What a sequence produced since the last delta, plus running usage."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    # Which of the request's ``n`` choices this delta belongs to; usage fields count that choice only.
    index: int = 0
    # One entry per generated token in this delta when logprobs were requested (end-of-turn tokens excluded).
    logprobs: list[TokenLogprob] | None = None
    # With ``prompt_logprobs``: one entry per prompt token, None for the first (nothing precedes it).
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # The stop string that ended the choice, when one did.
    stop_string: str | None = None


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What the services need to know about the loaded model."""

    id: str
    context_length: int
    vocab_size: int
    chat_template: str | None
    bos_token: str
    eos_token: str
    architecture: str
    path: str


@dataclass(frozen=True, slots=True)
class EngineStats:
    """A snapshot of the engine's load, for health, admission and metrics."""

    running: int
    waiting: int
    slots: int
    kv_used: int
    kv_total: int
    prefix_hit_tokens: int
    steps: int
    # LoRA adapters: how many are loaded, and which the running and the waiting sequences use.
    adapters_loaded: int = 0
    running_adapters: tuple[str, ...] = ()
    waiting_adapters: tuple[str, ...] = ()
    # Adapter sets take turns at decoding: how many turns came after a wait of 0, 1, 2, ... decode steps.
    turn_waits: tuple[int, ...] = ()


@runtime_checkable
class TextEngine(Protocol):
    """An engine that generates text from token ids."""

    @property
    def info(self) -> ModelInfo: ...

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Load the model and run a warm-up decode; ``ready`` is true afterwards."""

    async def shutdown(self) -> None:
        """Stop the engine and free the model."""

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` with the model's tokenizer."""
        ...

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a prompt: special-token markup parsed, and the BOS token added where the model wants one,
        unless the text already starts with it (a chat template that renders its own BOS)."""
        ...

    def encode_segments(self, segments: Sequence[PromptSegment]) -> list[int]:
        """Token ids of a prompt given as segments: special-token text becomes special tokens in markup segments
        only, content segments are tokenized as plain text; BOS as :meth:`encode_prompt` adds it."""
        ...

    def token_ids(self, text: str) -> list[int]:
        """Ids of a special-token string (``<end_of_turn>``); empty if the vocabulary lacks it."""
        ...

    def detokenize(self, ids: Sequence[int]) -> str:
        """The text that token ids spell, as generated text spells it (special tokens render as nothing)."""
        ...

    def check_request(self, request: GenerationRequest) -> None:
        """Raise InvalidRequest for what this engine cannot serve (an empty prompt, prompt plus completion beyond
        the context, an adapter it has not loaded). Services call it while preparing a request, so that such a
        request is a 400 before any response (a stream's 200) has started."""
        ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationDelta]:
        """Stream deltas of every choice until all finish; closing the iterator cancels the sequences."""
        ...

    async def check_guide(self, guide: Guide) -> None:
        """Compile ``guide`` off the event loop and cache it; raise InvalidRequest (naming ``guide.param``) if the
        engine cannot enforce it."""
        ...

    async def load_adapter(self, name: str, path: str) -> None:
        """Make the LoRA adapter at ``path`` (in the engine's own format) available as ``name``; raise
        InvalidRequest naming the reason if the engine cannot apply it to its model."""
        ...

    async def unload_adapter(self, name: str) -> None:
        """Forget the adapter ``name``; sequences already running on it finish first."""
        ...

    def stats(self) -> EngineStats:
        """Current load."""
        ...


EncoderKind = Literal["embedding", "cross-encoder"]


@dataclass(frozen=True, slots=True)
class EncoderInput:
    """One sequence for an encoder, special tokens included: ids, and segment ids (1 marks a pair's second text)."""

    token_ids: list[int]
    type_ids: list[int] | None = None


@dataclass(frozen=True, slots=True)
class EncoderInfo:
    """What the services need to know about a loaded encoder."""

    id: str
    kind: EncoderKind
    context_length: int  # most tokens per sequence, special tokens included
    vocab_size: int
    dimensions: int  # embedding width; 1 for a cross-encoder's score
    backend: str
    path: str
    # The special tokens the model's tokenizer puts before and after one text, and how many a pair adds.
    single_prefix: tuple[int, ...] = ()
    single_suffix: tuple[int, ...] = ()
    pair_overhead: int = 0

    @property
    def single_overhead(self) -> int:
        """Special tokens around one text."""
        return len(self.single_prefix) + len(self.single_suffix)


@dataclass(frozen=True, slots=True)
class EncoderStats:
    """Counters of the encoder's dynamic batching."""

    forward_passes: int
    inputs: int
    waiting: int
    max_batch: int


@runtime_checkable
class EncoderEngine(Protocol):
    """An engine that maps token sequences to unit embeddings or to relevance logits, batching concurrent calls."""

    @property
    def info(self) -> EncoderInfo: ...

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Load the model and run a warm-up pass; ``ready`` is true afterwards."""

    async def shutdown(self) -> None:
        """Stop the batching thread and free the model."""

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens and without truncation."""
        ...

    def single(self, ids: Sequence[int]) -> EncoderInput:
        """One text's ids laid out as the model's tokenizer lays out a single text (special tokens, segment ids)."""
        ...

    def pair(self, first: Sequence[int], second: Sequence[int]) -> EncoderInput:
        """A query/passage pair laid out as the model's tokenizer lays out pairs (BERT: ``[CLS] a [SEP] b [SEP]``
        with segment ids 0/1; RoBERTa/XLM-R: ``<s> a </s></s> b </s>`` without segment ids)."""
        ...

    async def encode(self, inputs: Sequence[EncoderInput]) -> list[list[float]]:
        """One result row per input: a unit embedding, or ``[logit]`` for a cross-encoder."""
        ...

    def stats(self) -> EncoderStats:
        """Batching counters."""
        ...


def check_prompt(prompt: Sequence[int], *, vocab_size: int, context_length: int, max_tokens: int) -> None:
    """The 400s every text engine gives while a request is prepared: an empty prompt, a token id outside the
    vocabulary, or a prompt and completion longer than the context (in OpenAI's words and code)."""
    from microserve.errors import InvalidRequest

    if not prompt:
        raise InvalidRequest("the prompt is empty: it has no tokens", param="prompt")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise InvalidRequest(f"the prompt holds a token id outside [0, {vocab_size})", param="prompt")
    if len(prompt) + max_tokens > context_length:
        raise InvalidRequest(
            f"This model's maximum context length is {context_length} tokens, but {len(prompt)} prompt tokens "
            f"plus {max_tokens} completion tokens were requested.",
            param="max_tokens",
            code="context_length_exceeded",
        )
