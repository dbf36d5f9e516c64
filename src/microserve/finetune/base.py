"""The base model a LoRA is trained for: where its weights are, its tokenizer, chat template and shape.

A base is a catalog model or a GGUF file (the form microserve serves; transformers dequantizes the GGUF for
training, and the tokenizer is llama.cpp's own, reading the same file the server reads), or a Hugging Face model
directory (``config.json`` + safetensors + tokenizer files).
"""

from __future__ import annotations

import ctypes
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microserve.catalog.peft_gguf import AdapterError, BaseFacts
from microserve.services.chat_template import ChatTemplate


class BaseModelError(Exception):
    """The base model cannot be trained on; the message says why."""


@dataclass(frozen=True, slots=True)
class BaseModel:
    """A resolved base model."""

    spec: str  # what the user named: catalog id, GGUF path or directory
    model_id: str  # the served model's id (the adapter's ``base_model_name_or_path``)
    path: Path  # the GGUF file or the Hugging Face directory
    is_gguf: bool
    template_family: str | None
    facts: BaseFacts
    context_length: int | None
    chat_template: str | None = None  # the GGUF's own, or the tokenizer directory's


class QuietLlamaLogs:
    """Drops llama.cpp's log lines (a vocabulary load prints about a hundred) in a command-line process.

    Not for the server: its engine routes the log through its own capture, which this would replace.
    """

    def __init__(self) -> None:
        import llama_cpp as L

        @L.llama_log_callback
        def silent(level: int, text: bytes, user_data: Any) -> None:
            return None

        self._callback = silent  # llama.cpp keeps the pointer: the callback must outlive every call
        L.llama_log_set(silent, ctypes.c_void_p(0))


class GgufTokenizer:
    """llama.cpp's tokenizer of a GGUF file (vocabulary only), as the llama.cpp engine tokenizes."""

    def __init__(self, path: Path) -> None:
        import llama_cpp as L

        L.llama_backend_init()
        params = L.llama_model_default_params()
        params.vocab_only = True
        model = L.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise BaseModelError(f"llama.cpp could not read the vocabulary of {path}")
        self._lib = L
        self._model = model
        self._vocab = L.llama_model_get_vocab(model)
        self.bos_token = self._special(L.llama_vocab_bos(self._vocab))
        self.eos_token = self._special(L.llama_vocab_eos(self._vocab))
        self.eos_id = int(L.llama_vocab_eos(self._vocab))
        self.add_bos = bool(L.llama_vocab_get_add_bos(self._vocab))

    def _special(self, token: int) -> str:
        if token < 0:
            return ""
        buf = ctypes.create_string_buffer(128)
        n = self._lib.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of ``text``, special tokens written as text parsed (as the server does)."""
        L = self._lib
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (L.llama_token * capacity)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, True)
        if n < 0:
            capacity = -n
            buf = (L.llama_token * capacity)()
            n = L.llama_tokenize(self._vocab, data, len(data), buf, capacity, add_special, True)
        return list(buf[:n])

    def close(self) -> None:
        """Free llama.cpp's copy of the vocabulary."""
        if self._model:
            self._lib.llama_model_free(self._model)
            self._model = None


class HfTokenizer:
    """A Hugging Face tokenizer directory's tokenizer."""

    def __init__(self, path: Path) -> None:
        from transformers import AutoTokenizer

        self._tok = AutoTokenizer.from_pretrained(str(path))
        self.bos_token = self._tok.bos_token or ""
        self.eos_token = self._tok.eos_token or ""
        if self._tok.eos_token_id is None:
            raise BaseModelError(f"the tokenizer in {path} has no end-of-sequence token")
        self.eos_id = int(self._tok.eos_token_id)
        probe = self._tok("a", add_special_tokens=True)["input_ids"]
        self.add_bos = bool(self._tok.bos_token_id is not None and probe and probe[0] == self._tok.bos_token_id)
        self.chat_template: str | None = getattr(self._tok, "chat_template", None)

    def encode(self, text: str, *, add_special: bool) -> list[int]:
        """Token ids of ``text``; added special tokens written as text are parsed."""
        return list(self._tok(text, add_special_tokens=add_special)["input_ids"])

    def close(self) -> None:
        """Nothing to free."""


def resolve_base(spec: str, cache_dir: Path, *, catalog_dir: Path | None = None, offline: bool = False) -> BaseModel:
    """The base model ``spec`` names; raises :class:`BaseModelError` when it cannot be trained on."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return _hf_directory(spec, path)
    from microserve.catalog.manifest import find_manifest
    from microserve.catalog.resolve import lookup
    from microserve.catalog.store import ArtifactError, ModelStore

    try:
        manifest = lookup(spec, None, catalog_dir).manifest
        ggufs = [p for p in manifest.profiles if p.format == "gguf"]
        # A derived profile holds the same weights as the file it is made from (transformers dequantizes either to
        # the same floats), so training reads the original and makes nothing first.
        profile = next((p for p in ggufs if manifest.parent(p) is None), ggufs[0] if ggufs else None)
        if profile is None:
            raise BaseModelError(f"model {manifest.id} has no GGUF profile to train from")
        gguf = ModelStore(cache_dir, offline=offline).ensure(manifest, profile)
    except ArtifactError as exc:
        raise BaseModelError(str(exc)) from exc
    if manifest.task not in ("chat", "completion"):
        raise BaseModelError(f"model {manifest.id} is a {manifest.task} model; adapters are for text generation")
    from microserve.catalog.gguf_index import GgufFormatError, read_index

    try:
        index = read_index(gguf)
        facts = BaseFacts.from_fields(index.fields, {n: t.shape for n, t in index.tensors.items()}, gguf)
    except (AdapterError, GgufFormatError, OSError) as exc:
        raise BaseModelError(f"cannot read {gguf}: {exc}") from exc
    template = index.fields.get("tokenizer.chat_template")
    context = index.fields.get(f"{facts.architecture}.context_length")
    if facts.architecture not in ("llama", "gemma3"):
        raise BaseModelError(
            f"model {manifest.id} is a `{facts.architecture}` model; microserve trains adapters for llama and gemma3"
        )
    builtin = find_manifest(spec, catalog_dir) is not None
    return BaseModel(
        spec=spec,
        model_id=manifest.id if builtin else gguf.stem,
        path=gguf,
        is_gguf=True,
        template_family=manifest.template_family,
        facts=facts,
        context_length=int(context) if context is not None else None,
        chat_template=str(template) if template else None,
    )


def _hf_directory(spec: str, path: Path) -> BaseModel:
    try:
        config: dict[str, Any] = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise BaseModelError(f"{path} is not a Hugging Face model directory (config.json: {exc})") from exc
    try:
        facts = BaseFacts.from_hf_config(config)
    except AdapterError as exc:
        raise BaseModelError(str(exc)) from exc
    text = {**config, **config.get("text_config", {})}
    return BaseModel(
        spec=spec,
        model_id=str(config.get("_name_or_path") or path.name),
        path=path,
        is_gguf=False,
        template_family="gemma" if facts.architecture == "gemma3" else None,
        facts=facts,
        context_length=text.get("max_position_embeddings"),
    )


def open_tokenizer(base: BaseModel) -> GgufTokenizer | HfTokenizer:
    """The tokenizer the served model uses."""
    return GgufTokenizer(base.path) if base.is_gguf else HfTokenizer(base.path)


def chat_template(base: BaseModel, tokenizer: GgufTokenizer | HfTokenizer) -> ChatTemplate:
    """The chat template the server applies to this base: its own, else its family's, else ChatML."""
    own = base.chat_template if base.is_gguf else getattr(tokenizer, "chat_template", None)
    return ChatTemplate.choose(own, base.template_family, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token)
