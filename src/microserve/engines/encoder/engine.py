"""The sentence encoder engine: a model directory, its tokenizer, and a dynamically batched forward pass."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from microserve.engines.base import EncoderInfo, EncoderInput, EncoderKind, EncoderStats
from microserve.engines.encoder.batching import DynamicBatcher
from microserve.engines.encoder.model_dir import WordTokenizer, read_layout
from microserve.errors import NotReady
from microserve.hardware import usable_cores

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EncoderConfig:
    """How to load and batch one encoder model."""

    path: str
    model_id: str
    kind: EncoderKind
    cache_dir: Path
    threads: int | None = None
    max_batch: int = 32
    max_wait_ms: float = 5.0
    workers: int | None = None


def split_threads(threads: int, workers: int | None) -> tuple[int, int]:
    """``(workers, threads per worker)`` for ``threads`` cores.

    Small encoders run faster as two single-threaded passes side by side than as one pass across two threads:
    a pass synchronises its threads at every layer, and a thread that loses its core to the event loop stalls the
    other. Two workers is the default; more would multiply the weights' memory for little gain.
    """
    count = workers or (2 if threads >= 2 else 1)
    count = max(1, min(count, threads))
    return count, max(1, threads // count)


def _length(item: EncoderInput) -> int:
    return len(item.token_ids)


class SentenceEncoder:
    """Embeddings (bi-encoder) or pair scores (cross-encoder) for token sequences, batched across requests."""

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        self._info: EncoderInfo | None = None
        self._tokenizer: WordTokenizer | None = None
        self._batcher: DynamicBatcher[EncoderInput, list[float]] | None = None

    @property
    def info(self) -> EncoderInfo:
        """The loaded model's facts; only valid once ``ready``."""
        if self._info is None:
            raise NotReady("the encoder is still loading")
        return self._info

    @property
    def ready(self) -> bool:
        """True once the model is loaded and warmed up."""
        return self._batcher is not None

    def _load(self) -> tuple[EncoderInfo, WordTokenizer, DynamicBatcher[EncoderInput, list[float]]]:
        from microserve.engines.encoder.onnx_backend import OnnxForward
        from microserve.engines.encoder.onnx_export import exported_model

        path = Path(self.config.path)
        layout = read_layout(path)
        tokenizer = WordTokenizer(path)
        onnx_path = exported_model(path, self.config.kind, self.config.cache_dir)
        workers, threads = split_threads(self.config.threads or usable_cores(), self.config.workers)
        forwards = [
            OnnxForward(onnx_path, self.config.kind, layout, threads=threads, pad_id=tokenizer.pad_id)
            for _ in range(workers)
        ]
        probe = [self._single(tokenizer, tokenizer.encode("warm up"))]
        # Every session runs once before the first request, so none pays its set-up inside a request.
        warm = [forward(probe) for forward in forwards]
        info = EncoderInfo(
            id=self.config.model_id,
            kind=self.config.kind,
            context_length=layout.max_tokens,
            vocab_size=tokenizer.vocab_size,
            dimensions=len(warm[0][0]),
            backend=forwards[0].name,
            path=str(path),
            single_prefix=tokenizer.layout.single[0],
            single_suffix=tokenizer.layout.single[1],
            pair_overhead=tokenizer.layout.pair_overhead,
        )
        batcher: DynamicBatcher[EncoderInput, list[float]] = DynamicBatcher(
            forwards,
            max_batch=self.config.max_batch,
            max_wait_s=self.config.max_wait_ms / 1000,
            name=f"encoder-{self.config.model_id}",
            # A pass pads every row to its longest, so passes are filled with inputs of like length.
            size=_length,
        )
        return info, tokenizer, batcher

    async def start(self) -> None:
        """Load the weights in a thread (the event loop keeps serving) and start the batching thread."""
        info, tokenizer, batcher = await asyncio.to_thread(self._load)
        batcher.start()
        self._info, self._tokenizer = info, tokenizer
        self._batcher = batcher
        log.info(
            "encoder %s ready: %s, %d dims, %d tokens, backend %s",
            info.id,
            info.kind,
            info.dimensions,
            info.context_length,
            info.backend,
        )

    async def shutdown(self) -> None:
        """Stop the batching thread; waiting requests fail rather than hang."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            await asyncio.to_thread(batcher.stop)

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens and without truncation."""
        return self._tokenizer_or_raise().encode(text)

    @staticmethod
    def _single(tokenizer: WordTokenizer, ids: Sequence[int]) -> EncoderInput:
        tokens, types = tokenizer.layout.lay_out_single(list(ids))
        return EncoderInput(tokens, types)

    def _tokenizer_or_raise(self) -> WordTokenizer:
        if self._tokenizer is None:
            raise NotReady("the encoder is still loading")
        return self._tokenizer

    def single(self, ids: Sequence[int]) -> EncoderInput:
        """One text's ids with the special tokens and segment ids the model's tokenizer gives a single text."""
        return self._single(self._tokenizer_or_raise(), ids)

    def pair(self, first: Sequence[int], second: Sequence[int]) -> EncoderInput:
        """A pair laid out as the model's tokenizer lays out pairs."""
        tokens, types = self._tokenizer_or_raise().layout.lay_out_pair(list(first), list(second))
        return EncoderInput(tokens, types)

    async def encode(self, inputs: Sequence[EncoderInput]) -> list[list[float]]:
        """Rows for ``inputs``, sharing forward passes with concurrent requests."""
        if self._batcher is None:
            raise NotReady("the encoder is still loading")
        return await self._batcher.submit(inputs)

    def stats(self) -> EncoderStats:
        """Forward passes and inputs so far; their ratio is the mean batch size."""
        batcher = self._batcher
        if batcher is None:
            return EncoderStats(forward_passes=0, inputs=0, waiting=0, max_batch=self.config.max_batch)
        return EncoderStats(
            forward_passes=batcher.forward_passes,
            inputs=batcher.inputs,
            waiting=batcher.waiting,
            max_batch=batcher.max_batch,
        )
